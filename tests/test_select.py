import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from simgap.cli import main as cli_main
from simgap.data.tars import iter_samples
from simgap.data.tarwrite import write_tar
from simgap.materialize import materialize
from simgap.parallel import Executor, ExecutorError, LocalEngine
from simgap.scan import ScanOptions, scan_store
from simgap.select import (
    coreset,
    far_pruned,
    gapmatch,
    near_pruned,
    random_split,
    resolve_size,
    union_score,
)
from simgap.select.build import SelectConfig, check_guarantee, select
from simgap.select.policies import parse_size, split_seed
from simgap.select.splitfile import read_split, write_split
from simgap.store import write_store


def brute_gapmatch(pool, tests_by_bench, thresholds_by_bench):
    keep = np.ones(len(pool), bool)
    for tests, thr in zip(tests_by_bench, thresholds_by_bench, strict=True):
        sims = pool @ tests.T
        keep &= ~(sims > thr[None, :]).any(axis=1)
    return keep


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 3))
def test_gapmatch_equals_brute_force(seed, n_pool, n_bench):
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n_pool, 4)).astype(np.float32)
    tests = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(n_bench)]
    thrs = []
    margins = []
    for t in tests:
        sims = pool @ t.T
        # Some thresholds exactly equal to a similarity: strict '>' keeps that row.
        thr = rng.choice(sims.ravel(), size=len(t)).astype(np.float32)
        thrs.append(thr)
        margins.append((sims - thr[None, :]).max(axis=1))
    np.testing.assert_array_equal(gapmatch(margins), brute_gapmatch(pool, tests, thrs))


def test_near_far_order_and_ties():
    score = np.array([0.5, 0.9, 0.5, 0.1, 0.9], np.float32)
    near = near_pruned(score, 3)
    assert near.tolist() == [True, False, True, True, False]
    far = far_pruned(score, 3)
    # Ties at 0.5 are broken by row: row 0 before row 2.
    assert far.tolist() == [True, True, False, False, True]
    assert far_pruned(score, 2).tolist() == [False, True, False, False, True]
    assert not near_pruned(score, 0).any() and far_pruned(score, 5).all()
    with pytest.raises(ValueError, match="outside"):
        far_pruned(score, 6)


def test_union_and_random():
    a, b = np.array([0.1, 0.8]), np.array([0.5, 0.2])
    assert union_score([a, b]).tolist() == [0.5, 0.8]
    r1, r2 = random_split(100, 30, seed=7), random_split(100, 30, seed=7)
    assert r1.sum() == 30 and (r1 == r2).all()
    assert not (random_split(100, 30, seed=8) == r1).all()
    assert resolve_size(0.25, 200) == 50 and resolve_size(17, 200) == 17


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _pool(tmp_path, n_shards=3, per=4):
    folder = tmp_path / "pool"
    keys = []
    for s in range(n_shards):
        samples = []
        for i in range(per):
            k = f"p{s}{i:03d}"
            keys.append(k)
            samples.append((k, {"jpg": _jpeg(i), "txt": f"cap {k}".encode(), "json": b"{}"}))
        write_tar(folder / f"{s:05d}.tar", samples)
    return folder, keys


def test_materialize_keeps_every_member_and_counts(tmp_path):
    pool, keys = _pool(tmp_path)
    kept = keys[::2] + ["p_missing"]
    write_split(tmp_path / "split", kept, {"name": "t", "policy": "test"})
    got_keys, meta = read_split(tmp_path / "split")
    assert got_keys == set(kept) and meta["size"] == len(kept)
    ref = tmp_path / "ref"
    for cls in ["star", "circle"]:
        (ref / cls).mkdir(parents=True)
        (ref / cls / f"r-{cls}.jpg").write_bytes(_jpeg(1))
    (ref / "classnames.txt").write_text("star\ncircle\n")
    out = tmp_path / "out"
    summary = materialize(tmp_path / "split", str(pool), out, reference=ref)
    assert summary["kept"] == 6 and summary["missing"] == 1 and summary["reference"] == 2
    samples = [s for t in sorted(out.glob("*.tar")) for s in iter_samples(str(t))]
    assert sorted(k for k, _ in samples) == sorted(keys[::2] + ["r-star", "r-circle"])
    assert all(set(m) == {"jpg", "txt", "json"} for _, m in samples)
    captions = {k: m["txt"].decode() for k, m in samples}
    assert captions["r-circle"] == "a photo of a circle"
    assert captions[keys[0]] == f"cap {keys[0]}"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 8
    # A rerun reuses finished shards and gives the same bytes.
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    materialize(tmp_path / "split", str(pool), out, reference=ref)
    assert before == {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert pq.read_table(tmp_path / "split" / "keys.parquet").column("key").to_pylist() == sorted(
        kept
    )


def test_materialize_never_writes_hostile_members(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    with tarfile.open(pool / "00000.tar", "w") as tar:
        for name in ["../escape.txt", "/abs.txt", "good.txt"]:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    write_split(tmp_path / "split", ["good", "../escape", "/abs"], {"name": "h"})
    out = tmp_path / "out"
    summary = materialize(tmp_path / "split", str(pool), out)
    assert summary["kept"] == 1 and summary["skipped"]["unsafe_member"] == 2
    assert not (tmp_path / "escape.txt").exists()
    names = tarfile.open(out / "00000.tar").getnames()
    assert names == ["good.txt"]


def _fails_on_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return x * 10


def test_executor_runs_in_order_and_names_failures():
    ex = Executor(LocalEngine(1), retries=1)
    assert ex.map(_fails_on_odd, [0, 2, 4]) == [0, 20, 40]
    with pytest.raises(ExecutorError, match="odd 3"):
        ex.map(_fails_on_odd, [0, 3])


def test_executor_process_pool_equals_in_process():
    assert Executor(LocalEngine(2)).map(_fails_on_odd, [0, 2, 4, 6]) == [0, 20, 40, 60]


# ----------------------------------------------------------------------------- simgap select


MODEL = {"arch": "test", "checkpoint_sha256": "0"}


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small pool (3 shards), a reference set and two benchmarks, with scans made by the scan."""
    root = tmp_path_factory.mktemp("sel")
    rng = np.random.default_rng(5)
    pool = write_store(
        root / "pool", _unit(rng, 300), [f"p{i:04d}" for i in range(300)], MODEL, 100
    )
    ref = write_store(root / "reference", _unit(rng, 60), [f"r{i:03d}" for i in range(60)], MODEL)
    out = {"root": root, "pool": pool, "ref": ref, "bench": {}}
    for b in ("alpha", "beta"):
        store = write_store(
            root / f"bench-{b}", _unit(rng, 12), [f"{b}-{i:03d}" for i in range(12)], MODEL
        )
        tests = store.embeddings()
        thr = scan_store(ref, tests, options=ScanOptions(topk=1)).topk_sim[:, 0].copy()
        scan_store(ref, tests, options=ScanOptions(topk=1, out_dir=root / f"reference-{b}"))
        scan_store(pool, tests, thr, ScanOptions(topk=2, out_dir=root / f"pool-{b}"))
        out["bench"][b] = (store, tests.astype(np.float32), thr)
    return out


def _f32(store):
    return store.embeddings().astype(np.float32)


def _kept(folder):
    keys = (folder / "keys.txt").read_text().splitlines()
    assert keys == sorted(keys)
    assert pq.read_table(folder / "keys.parquet").column("key").to_pylist() == keys
    return keys


def _run(*args):
    assert cli_main(["select", *map(str, args)]) == 0


def test_select_gapmatch_combined_equals_brute_force_and_is_checked(world, tmp_path):
    root, pool = world["root"], world["pool"]
    p = _f32(pool)
    brute = np.ones(len(p), bool)
    for _, tests, thr in world["bench"].values():
        brute &= ~((p @ tests.T) > thr[None, :]).any(axis=1)
    want = sorted(np.array(pool.keys())[brute])
    assert 0 < len(want) < len(p)
    benches = [root / "bench-alpha", root / "bench-beta"]
    # Thresholds from the reference store, scores from a fresh scan ...
    _run(
        "gapmatch",
        root / "pool",
        "-o",
        tmp_path / "a",
        "--benchmarks",
        *benches,
        "--reference",
        root / "reference",
    )
    # ... or both from the scan outputs: same split, same bytes except the fingerprints.
    _run(
        "gapmatch",
        root / "pool",
        "-o",
        tmp_path / "b",
        "--benchmarks",
        *benches,
        "--scans",
        root / "pool-alpha",
        root / "pool-beta",
        "--reference-scans",
        root / "reference-alpha",
        root / "reference-beta",
    )
    assert _kept(tmp_path / "a") == want == _kept(tmp_path / "b")
    meta = json.loads((tmp_path / "a" / "split.json").read_text())
    assert meta["policy"] == "gapmatch" and meta["benchmarks"] == ["alpha", "beta"]
    assert meta["size"] == len(want) and meta["removed"] == 300 - len(want)
    assert meta["reference_added"] is True
    g = meta["guarantee"]
    assert g["holds"] and g["violations"] == 0 and g["tests"] == 24 and g["equal"] == 24
    assert set(meta["fingerprints"]) == {"pool", "benchmarks", "reference"}
    meta_b = json.loads((tmp_path / "b" / "split.json").read_text())
    assert set(meta_b["fingerprints"]["scans"]) == {"alpha", "beta"}
    # Same inputs, same bytes.
    before = {
        f: (tmp_path / "a" / f).read_bytes() for f in ("keys.parquet", "keys.txt", "split.json")
    }
    _run(
        "gapmatch",
        root / "pool",
        "-o",
        tmp_path / "a",
        "--benchmarks",
        *benches,
        "--reference",
        root / "reference",
    )
    assert before == {f: (tmp_path / "a" / f).read_bytes() for f in before}


def test_select_gapmatch_per_benchmark_without_reference(world, tmp_path):
    root, pool = world["root"], world["pool"]
    _, tests, thr = world["bench"]["alpha"]
    brute = ~((_f32(pool) @ tests.T) > thr[None, :]).any(axis=1)
    _run(
        "gapmatch",
        root / "pool",
        "-o",
        tmp_path / "s",
        "--benchmarks",
        root / "bench-alpha",
        "--reference",
        root / "reference",
        "--no-add-reference",
        "--control",
        "--seed",
        "4",
    )
    assert _kept(tmp_path / "s") == sorted(np.array(pool.keys())[brute])
    meta = json.loads((tmp_path / "s" / "split.json").read_text())
    assert meta["reference_added"] is False and "equal" not in meta["guarantee"]
    control = json.loads((tmp_path / "s-random" / "split.json").read_text())
    assert control["control_of"] == "s" and control["policy"] == "random"
    seed = split_seed(4, "s-random")
    assert control["size"] == meta["size"] and control["seed"] == seed != 4
    assert _kept(tmp_path / "s-random") == sorted(
        np.array(pool.keys())[random_split(300, meta["size"], seed)]
    )


def test_controls_are_seeded_by_name_as_the_runner_seeds_them(world, tmp_path):
    """`--control` once seeded every control with --seed (0): the controls of two splits were
    nested subsets of one permutation. Now each control's seed comes from its name, with the
    runner's rule (experiment.specs), so `simgap select` and `simgap run` make the same control."""
    from simgap.experiment.config import parse
    from simgap.experiment.specs import split_specs

    root = world["root"]
    for name, size in (("near", "0.5"), ("far", "0.25")):
        _run(
            name,
            root / "pool",
            "-o",
            tmp_path / name,
            "--size",
            size,
            "--control",
            "--scans",
            root / "pool-alpha",
        )
    near = set(_kept(tmp_path / "near-random"))
    far = set(_kept(tmp_path / "far-random"))
    assert len(near) == 150 and len(far) == 75
    assert not far <= near  # one permutation's prefixes would be nested
    cfg = parse("seed = 0\n[splits.coreset]\nfraction = 0.5\n", "x.toml")
    runner = {s.name: s.seed for s in split_specs(cfg, ["alpha"])}
    assert runner["coreset-random"] == split_seed(0, "coreset-random")
    meta = json.loads((tmp_path / "near-random" / "split.json").read_text())
    assert meta["seed"] == split_seed(0, "near-random")
    # The paper's family default: near splits (and their controls) are the pool alone.
    assert meta["reference_added"] is False


def test_guarantee_check_catches_a_broken_split(world, tmp_path, monkeypatch):
    root, pool = world["root"], world["pool"]
    _, tests, thr = world["bench"]["beta"]
    _run(
        "gapmatch",
        root / "pool",
        "-o",
        tmp_path / "ok",
        "--scans",
        root / "pool-beta",
        "--benchmarks",
        root / "bench-beta",
        "--reference",
        root / "reference",
    )
    kept = _kept(tmp_path / "ok")
    sims = _f32(pool) @ tests.T
    removed = [k for k, bad in zip(pool.keys(), (sims > thr).any(axis=1), strict=True) if bad]
    # Put one removed row back: the rescan must find the test point it is too close to.
    write_split(tmp_path / "broken", [*kept, removed[0]], {"name": "broken"})
    check = check_guarantee(pool, tmp_path / "broken", [tests], [thr])
    assert not check["holds"] and check["violations"] >= 1 and check["max_excess"] > 0
    assert check_guarantee(pool, tmp_path / "ok", [tests], [thr])["holds"]
    # A policy bug that keeps everything is caught by select itself, and reported.
    import simgap.select.build as build

    monkeypatch.setattr(build, "gapmatch", lambda margins: np.ones(len(margins[0]), bool))
    cfg = SelectConfig(
        "gapmatch",
        root / "pool",
        tmp_path / "bug",
        (root / "bench-beta",),
        reference=root / "reference",
    )
    with pytest.raises(RuntimeError, match="guarantee does not hold"):
        select(cfg)
    assert json.loads((tmp_path / "bug" / "split.json").read_text())["guarantee"]["holds"] is False


def test_select_near_far_coreset_random_by_size(world, tmp_path):
    root, pool = world["root"], world["pool"]
    p = _f32(pool)
    keys = np.array(pool.keys())
    score_a = (p @ world["bench"]["alpha"][1].T).max(axis=1)
    union = np.maximum(score_a, (p @ world["bench"]["beta"][1].T).max(axis=1))
    _run(
        "near",
        root / "pool",
        "-o",
        tmp_path / "near",
        "--size",
        "0.25",
        "--scans",
        root / "pool-alpha",
    )
    assert _kept(tmp_path / "near") == sorted(keys[np.argsort(score_a, kind="stable")[:75]])
    _run(
        "far",
        root / "pool",
        "-o",
        tmp_path / "far",
        "--size",
        "40",
        "--benchmarks",
        root / "bench-alpha",
        root / "bench-beta",
    )
    assert _kept(tmp_path / "far") == sorted(keys[np.argsort(-union, kind="stable")[:40]])
    _run(
        "coreset",
        root / "pool",
        "-o",
        tmp_path / "core",
        "--scans",
        root / "pool-alpha",
        root / "pool-beta",
    )
    core = json.loads((tmp_path / "core" / "split.json").read_text())
    assert core["size"] == 150 and core["params"] == {"fraction": 0.5}
    assert _kept(tmp_path / "core") == sorted(keys[np.argsort(-union, kind="stable")[:150]])
    _run("random", root / "pool", "-o", tmp_path / "rnd", "--size", "30", "--seed", "9")
    assert _kept(tmp_path / "rnd") == sorted(keys[random_split(300, 30, 9)])
    assert json.loads((tmp_path / "rnd" / "split.json").read_text())["seed"] == 9


def test_select_refuses_mismatched_inputs(world, tmp_path):
    root = world["root"]
    # The alpha scan paired with the beta benchmark: its recorded test hash differs.
    with pytest.raises(ValueError, match="test points"):
        select(
            SelectConfig(
                "gapmatch",
                root / "pool",
                tmp_path / "x",
                (root / "bench-beta",),
                (root / "pool-alpha",),
            )
        )
    with pytest.raises(ValueError, match="needs --size"):
        select(SelectConfig("near", root / "pool", tmp_path / "x", scans=(root / "pool-alpha",)))
    with pytest.raises(ValueError, match="thresholds"):
        select(SelectConfig("gapmatch", root / "pool", tmp_path / "x", (root / "bench-beta",)))


def test_size_parsing_and_coreset():
    assert parse_size("0.25") == 0.25 and parse_size("1000") == 1000
    assert resolve_size(1.0, 10) == 10 and resolve_size(0.0, 10) == 0
    with pytest.raises(ValueError, match="neither"):
        parse_size("a lot")
    with pytest.raises(ValueError, match="outside"):
        resolve_size(1.5, 10)
    score = np.array([0.2, 0.9, 0.5])
    assert coreset(score, 2).tolist() == [False, True, True]


def test_select_reads_one_scan_of_every_benchmark_made_by_simgap_scan(world, tmp_path):
    """`simgap scan` writes one folder for every benchmark; `simgap select --scans` picks each
    split's benchmarks from it by name, with the thresholds the scan recorded."""
    root, pool = world["root"], world["pool"]
    both = tmp_path / "both"
    benches = [root / "bench-alpha", root / "bench-beta"]
    scan_args = ["scan", root / "pool", "--benchmarks", *benches, "--thresholds-from",
                 root / "reference", "--topk", "2", "-o", both]  # fmt: skip
    assert cli_main([*map(str, scan_args)]) == 0
    p = _f32(pool)
    keys = np.array(pool.keys())
    _, tests, thr = world["bench"]["beta"]
    brute = ~((p @ tests.T) > thr[None, :]).any(axis=1)
    # beta alone, from the two-benchmark scan: its thresholds and margins only.
    _run("gapmatch", root / "pool", "-o", tmp_path / "g", "--scans", both, "--benchmarks",
         root / "bench-beta", "--reference", root / "reference")  # fmt: skip
    assert _kept(tmp_path / "g") == sorted(keys[brute])
    assert json.loads((tmp_path / "g" / "split.json").read_text())["guarantee"]["holds"]
    # Without stores: every benchmark of the scan, thresholds from its reference pass.
    _run("gapmatch", root / "pool", "-o", tmp_path / "c", "--scans", both, "--reference-scans",
         both / "reference", "--no-check")  # fmt: skip
    combined = np.ones(len(p), bool)
    for _, t, th in world["bench"].values():
        combined &= ~((p @ t.T) > th[None, :]).any(axis=1)
    assert _kept(tmp_path / "c") == sorted(keys[combined])
    _run("near", root / "pool", "-o", tmp_path / "n", "--scans", both, "--benchmarks",
         root / "bench-alpha", "--size", "0.25")  # fmt: skip
    score_a = (p @ world["bench"]["alpha"][1].T).max(axis=1)
    assert _kept(tmp_path / "n") == sorted(keys[np.argsort(score_a, kind="stable")[:75]])
    with pytest.raises(ValueError, match="no scan of benchmark"):
        select(SelectConfig("near", root / "pool", tmp_path / "x", (root / "reference",),
                            (both,), size=0.5))  # fmt: skip
