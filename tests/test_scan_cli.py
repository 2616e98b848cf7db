"""``simgap scan``: outputs per benchmark, and every bad input refused in one line (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simgap.cli import main
from simgap.scan import iter_scan_rows, load_scan, load_tests_table
from simgap.store import write_store

MODEL = {"arch": "test", "pretrained": "none"}


def unit_fp16(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float16)


def store(path, x, prefix, model=MODEL, shard_rows=100):
    return write_store(path, x, [f"{prefix}{i:04d}" for i in range(len(x))], model, shard_rows)


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(21)
    d = 12
    return {
        "base": store(tmp_path / "base", unit_fp16(rng.standard_normal((250, d))), "p"),
        "a": store(tmp_path / "bench-a", unit_fp16(rng.standard_normal((7, d))), "a"),
        "b": store(tmp_path / "bench-b", unit_fp16(rng.standard_normal((5, d))), "b"),
        "ref": store(tmp_path / "ref", unit_fp16(rng.standard_normal((60, d))), "r"),
        "rng": rng,
    }


def scan(capsys, base, *benchmarks, extra=()):
    code = main(["scan", str(base), "--benchmarks", *map(str, benchmarks), *extra])
    return code, capsys.readouterr()


def assert_error(code, captured, *fragments):
    assert code == 2
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("simgap: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], captured.err
    for f in fragments:
        assert f in errors[0], errors[0]


def test_scan_names_benchmarks_and_matches_bruteforce(stores, tmp_path, capsys):
    s = stores
    out = tmp_path / "out"
    extra = ["--thresholds-from", str(s["ref"].path), "--topk", "3", "-o", str(out)]
    code, cap = scan(capsys, s["base"].path, s["a"].path, s["b"].path, extra=extra)
    assert code == 0, cap.err
    assert "rows/s" in cap.err and "ETA" in cap.err
    table = load_tests_table(out)
    assert table.column("benchmark").to_pylist() == ["bench-a"] * 7 + ["bench-b"] * 5
    assert table.column("key").to_pylist() == s["a"].keys() + s["b"].keys()
    tests = np.concatenate([s["a"].embeddings(), s["b"].embeddings()]).astype(np.float64)
    thr = (tests @ s["ref"].embeddings().astype(np.float64).T).astype(np.float32).max(1)
    sims = (s["base"].embeddings().astype(np.float64) @ tests.T).astype(np.float32)
    np.testing.assert_array_equal(table.column("threshold").to_numpy(), thr)
    res = load_scan(out)
    # Per base row and per benchmark (one pass): max, argmax (a test index of the whole scan)
    # and margin over the thresholds.
    for i, span in enumerate((slice(0, 7), slice(7, 12))):
        np.testing.assert_array_equal(res.row_max[:, i], sims[:, span].max(1))
        np.testing.assert_array_equal(res.row_argmax[:, i], sims[:, span].argmax(1) + span.start)
        margin = (sims[:, span] - thr[span]).max(1)
        np.testing.assert_array_equal(res.row_margin[:, i], margin)
    meta = json.loads((out / "scan.json").read_text())
    assert meta["benchmarks"] == [
        {"name": "bench-a", "start": 0, "stop": 7},
        {"name": "bench-b", "start": 7, "stop": 12},
    ]
    np.testing.assert_array_equal(res.count_above, (sims > thr).sum(0))
    above = int(((sims > thr).any(1)).sum())
    assert f"{above} rows above a threshold" in cap.out
    assert json.loads((out / "reference" / "scan.json").read_text())["tests"] == 12


def test_refuses_different_dims(stores, tmp_path, capsys):
    other = store(tmp_path / "wide", unit_fp16(stores["rng"].standard_normal((4, 8))), "w")
    code, cap = scan(capsys, stores["base"].path, other.path, extra=["-o", str(tmp_path / "o")])
    assert_error(code, cap, "wide", "dim 8")


def test_refuses_different_models(stores, tmp_path, capsys):
    x = unit_fp16(stores["rng"].standard_normal((4, 12)))
    other = store(tmp_path / "other", x, "o", model={"arch": "other", "pretrained": "none"})
    code, cap = scan(capsys, stores["base"].path, other.path, extra=["-o", str(tmp_path / "o")])
    assert_error(code, cap, "other", "different similarity models")


def test_refuses_unnormalised_store(stores, tmp_path, capsys):
    manifest = stores["a"].path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["normalized"] = False
    manifest.write_text(json.dumps(doc))
    code, cap = scan(capsys, stores["base"].path, stores["a"].path, extra=["-o", str(tmp_path)])
    assert_error(code, cap, "bench-a", "not marked L2-normalised")


def test_refuses_nan_test_rows_naming_keys(stores, tmp_path, capsys):
    x = unit_fp16(stores["rng"].standard_normal((6, 12)))
    x[[1, 4], 3] = np.nan
    bad = store(tmp_path / "nan-bench", x, "n")
    code, cap = scan(capsys, stores["base"].path, bad.path, extra=["-o", str(tmp_path / "o")])
    assert_error(code, cap, "nan-bench", "2 test rows", "n0001, n0004")


def test_bad_base_rows_refused_or_skipped_and_counted(stores, tmp_path, capsys):
    x = unit_fp16(stores["rng"].standard_normal((150, 12)))
    x[120] *= np.float16(1.5)  # not unit-norm
    x[30, 0] = np.inf
    base = store(tmp_path / "bad-base", x, "q")
    a = stores["a"].path
    code, cap = scan(capsys, base.path, a, extra=["-o", str(tmp_path / "o1")])
    # The first shard holding a bad row is named, with its keys and count.
    assert_error(code, cap, "bad-base/emb/00000.npy", "1 rows", "q0030")

    out = tmp_path / "o2"
    code, cap = scan(capsys, base.path, a, extra=["-o", str(out), "--skip-bad", "--workers", "1"])
    assert code == 0, cap.err
    assert "2 bad base rows skipped" in cap.out
    meta = json.loads((out / "scan.json").read_text())
    assert meta["bad_rows"] == {"policy": "skip", "count": 2, "first_keys": ["q0030", "q0120"]}
    rows = np.concatenate([rec["max"] for _, _, rec in iter_scan_rows(out)])
    assert np.isnan(rows[[30, 120]]).all() and np.isfinite(np.delete(rows, [30, 120])).all()
    assert not np.isin(load_scan(out).topk_row, [30, 120]).any()


def test_refuses_duplicate_benchmark_names(stores, tmp_path, capsys):
    a = stores["a"].path
    code, cap = scan(capsys, stores["base"].path, a, a, extra=["-o", str(tmp_path / "o")])
    assert_error(code, cap, "distinct folder names")
