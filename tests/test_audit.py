"""The contamination audit against brute force, with planted near-duplicates as ground truth."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simgap.cli import main as cli_main
from simgap.select import audit
from simgap.store import write_store

MODEL = {"arch": "test", "checkpoint_sha256": "0"}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A base set with near-duplicates of some test points of two benchmarks."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(3)
    d = 32
    tests = {b: _unit(rng.standard_normal((20, d))) for b in ("sketch", "photo")}
    base = [_unit(rng.standard_normal((200, d)))]
    truth = []
    for b, t in tests.items():
        for i in range(0, 20, 4):  # every 4th test point has a near-duplicate in the base set
            truth.append((f"p{200 + len(truth):04d}", b, f"{b}-{i:03d}"))
            base.append(_unit(t[i : i + 1] + 0.05 * rng.standard_normal((1, d))))
    base_store = write_store(
        root / "pool", np.concatenate(base), [f"p{i:04d}" for i in range(210)], MODEL, 64
    )
    stores = {
        b: write_store(root / f"bench-{b}", t, [f"{b}-{i:03d}" for i in range(20)], MODEL)
        for b, t in tests.items()
    }
    gt = pa.table(
        {k: [r[i] for r in truth] for i, k in enumerate(("pool_key", "benchmark", "test_key"))}
    )
    pq.write_table(gt, root / "truth.parquet")
    return root, base_store, stores, gt


def test_audit_equals_brute_force_and_scores_ground_truth(planted, tmp_path):
    root, base, stores, gt = planted
    b = base.embeddings().astype(np.float32)
    bkeys = base.keys()
    for thr in (0.5, 0.9):
        report = audit(stores, base, thr, gt, tmp_path / str(thr))
        pairs = pq.read_table(tmp_path / str(thr) / "pairs.parquet")
        want = []
        for name, store in stores.items():
            sims = store.embeddings().astype(np.float32) @ b.T
            tk = store.keys()
            hits = set()
            for t, r in zip(*np.nonzero(sims > np.float32(thr)), strict=True):
                want.append((name, tk[t], bkeys[r]))
                hits.add(t)
            r = report["benchmarks"][name]
            assert r["tests"] == 20 and r["contaminated"] == len(hits)
            assert r["fraction"] == len(hits) / 20
        got = list(
            zip(
                *(pairs.column(c).to_pylist() for c in ("benchmark", "test_key", "base_key")),
                strict=True,
            )
        )
        assert got == sorted(want) and report["pairs"] == len(want)
        assert (np.array(pairs.column("similarity")) > thr).all()
        on_disk = json.loads((tmp_path / str(thr) / "audit.json").read_text())
        assert on_disk == json.loads(json.dumps(report))
    # At 0.9 only the planted pairs remain: precision and recall 1; at 0.5 precision drops.
    g = audit(stores, base, 0.9, gt)["ground_truth"]
    assert (g["tp"], g["fp"], g["fn"], g["precision"], g["recall"]) == (10, 0, 0, 1.0, 1.0)
    low = audit(stores, base, 0.5, gt)["ground_truth"]
    assert low["recall"] == 1.0 and low["precision"] < 1.0 and low["fp"] > 0
    high = audit(stores, base, 0.9999, gt)["ground_truth"]
    assert high["tp"] == 0 and high["fn"] == 10 and high["recall"] == 0.0


def test_audit_cli(planted, tmp_path, capsys):
    root, *_ = planted
    code = cli_main(
        [
            "audit",
            str(root / "pool"),
            "--benchmarks",
            str(root / "bench-sketch"),
            str(root / "bench-photo"),
            "--threshold",
            "0.9",
            "--ground-truth",
            str(root / "truth.parquet"),
            "-o",
            str(tmp_path / "a"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "sketch: 5/20 test points (25.00%)" in out and "precision 1.000, recall 1.000" in out
    bad = pa.table({"key": ["x"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    code = cli_main(
        [
            "audit",
            str(root / "pool"),
            "--benchmarks",
            str(root / "bench-sketch"),
            "--ground-truth",
            str(tmp_path / "bad.parquet"),
            "-o",
            str(tmp_path / "b"),
        ]
    )
    assert code == 2 and "lacks column" in capsys.readouterr().err
