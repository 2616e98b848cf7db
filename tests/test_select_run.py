"""`simgap run` makes its splits with `simgap select`'s code: same keys and split.json for the
same policy and parameters on the same stores, and the same guarantee check, which stops the run.

The run's stores and scans are made here (small stores, the run's own scan stage), then the
runner's split stages run on them: no world, no embedding, no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from simgap.cli import main as cli_main
from simgap.experiment import Data, config, scan_grid, split_specs
from simgap.experiment.engines import Executors
from simgap.experiment.plan import _split_stages
from simgap.experiment.runner import Runner, Stage, execute
from simgap.parallel import Executor, LocalEngine
from simgap.scan import KernelConfig
from simgap.select.build import guarantee
from simgap.store import StoreWriter, normalize_fp16, write_store

MODEL = {"arch": "test", "checkpoint_sha256": "0"}
BENCHMARKS = ["alpha", "beta"]
DATA = Data(
    reference="", pool="", pool_store="", benchmarks=dict.fromkeys(BENCHMARKS, ""), templates=""
)

CONFIG = """
seed = 7
[splits.gapmatch]
per_benchmark = true
combined = true
controls = true
[splits.near]
sizes = [0.25]
[splits.far]
sizes = [0.5]
[splits.random]
sizes = [0.3]
[splits.coreset]
fraction = 0.4
control = false
[splits.semdedup]
n_clusters = 4
eps = 0.3
rule = "any"
control = false
[splits.image_based]
n_clusters = 4
control = false
"""


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _make_run(run: Path) -> None:
    """stores/{pool, reference, bench-*} and the scan stage's scans/pool (+ reference)."""
    rng = np.random.default_rng(11)
    pool = _unit(rng, 240)
    pool[200:] = pool[:40] + 0.05 * _unit(rng, 40)  # near-duplicates for semdedup to find
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    write_store(run / "stores" / "pool", pool, [f"p{i:04d}" for i in range(240)], MODEL, 80)
    write_store(
        run / "stores" / "reference", _unit(rng, 50), [f"r{i:03d}" for i in range(50)], MODEL
    )
    for b in BENCHMARKS:
        # A benchmark store carries labels (the gap tables list them).
        writer = StoreWriter(run / "stores" / f"bench-{b}", MODEL, 16, {"kind": "array"})
        keys = pa.table(
            {"key": [f"{b}-{i:03d}" for i in range(10)], "label": [i % 3 for i in range(10)]}
        )
        writer.finish([writer.write_shard("00000", normalize_fp16(_unit(rng, 10)), keys)])
    scan_grid(run, DATA, BENCHMARKS, 2, KernelConfig(), Executor(LocalEngine(1)), lambda _: None)


def _run_splits(cfg: config.Config, run: Path) -> list:
    """The runner's select and gaps stages of ``cfg`` (the scan stage's outputs exist)."""
    specs = split_specs(cfg, BENCHMARKS)
    scanned = Stage("scan", {}, lambda r: {})
    one = Executors.every(Executor(LocalEngine(1)))
    stages = [scanned, *_split_stages(cfg, run, DATA, specs, BENCHMARKS, lambda _: None, one)]
    execute(Runner(run, stages, lambda _: None), 1)
    return specs


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    run = tmp_path_factory.mktemp("select-run") / "run"
    _make_run(run)
    (run / "stages").mkdir()
    cfg = config.parse(CONFIG, "select.toml")
    return run, cfg, {s.name: s for s in _run_splits(cfg, run)}


def _select_args(run: Path, name: str, spec, seed: int) -> list[str]:
    """The `simgap select` command line that should make the runner's split ``name``."""
    stores, scans = run / "stores", run / "scans"
    benches = [str(stores / f"bench-{b}") for b in spec.benchmarks]
    pool_scans = [str(scans / "pool")]  # one scan of every benchmark: picked by name
    if spec.policy == "gapmatch":
        ref_scans = [str(scans / "pool" / "reference")]
        return ["--benchmarks", *benches, "--scans", *pool_scans, "--reference",
                str(stores / "reference"), "--reference-scans", *ref_scans]  # fmt: skip
    if spec.policy in ("near", "far", "coreset"):
        size = str(spec.params["fraction"])
        return ["--benchmarks", *benches, "--scans", *pool_scans, "--size", size]
    if spec.policy == "semdedup":
        p = spec.params
        return ["--clusters", str(p["clusters"]), "--eps", str(p["eps"]), "--rule", p["rule"],
                "--seed", str(seed)]  # fmt: skip
    if spec.policy == "image-based":
        return ["--reference", str(stores / "reference"), "--clusters",
                str(spec.params["clusters"]), "--seed", str(seed)]  # fmt: skip
    if spec.policy == "random" and not spec.control_of:
        return ["--size", str(spec.params["fraction"]), "--seed", str(spec.seed)]
    return []


def test_run_and_select_make_the_same_splits(made, tmp_path, capsys):
    run, cfg, specs = made
    policies = {s.policy for s in specs.values()}
    assert policies == {"full", "gapmatch", "near", "far", "random", "coreset", "semdedup",
                        "image-based"}  # fmt: skip
    for name, spec in specs.items():
        if spec.control_of:
            continue
        out = tmp_path / name  # same folder name: split.json names the split by its folder
        args = ["select", spec.policy, str(run / "stores" / "pool"), "-o", str(out)]
        args.append("--add-reference" if spec.reference else "--no-add-reference")
        assert cli_main(args + _select_args(run, name, spec, cfg.seed)) == 0, name
        ours = run / "splits" / name
        assert (ours / "keys.txt").read_bytes() == (out / "keys.txt").read_bytes(), name
        # The whole split.json: policy, params, seed, sizes, full-sha256 fingerprints of every
        # store and scan, the guarantee with its 'equal' half.
        assert json.loads((ours / "split.json").read_text()) == json.loads(
            (out / "split.json").read_text()
        ), name
        if spec.policy == "semdedup":
            assert (ours / "clusters.parquet").read_bytes() == (
                out / "clusters.parquet"
            ).read_bytes()
    capsys.readouterr()
    combined = json.loads((run / "splits" / "combined" / "split.json").read_text())
    fp = combined["fingerprints"]
    assert set(fp) == {"pool", "benchmarks", "reference", "reference_scans", "scans"}
    assert all(len(h) == 64 for h in [fp["pool"], fp["reference"], *fp["scans"].values()])
    g = combined["guarantee"]
    assert g["holds"] and g["tests"] == 20 and g["equal"] == 20 and g["violations"] == 0
    assert 0 < combined["size"] < 240
    dedup = json.loads((run / "splits" / "semdedup" / "split.json").read_text())
    assert dedup["params"] == {"clusters": 4, "eps": 0.3, "rule": "any"} and dedup["seed"] == 7
    assert dedup["removed"] >= 40  # at least the planted near-duplicates
    # A control: the random policy at its split's size, with the runner's per-split seed.
    control = json.loads((run / "splits" / "alpha-random" / "split.json").read_text())
    alpha = json.loads((run / "splits" / "alpha" / "split.json").read_text())
    assert control["control_of"] == "alpha" and control["size"] == alpha["size"]
    assert (
        control["params"] == {"size": alpha["size"]}
        and control["seed"] == specs["alpha-random"].seed
    )
    out = tmp_path / "ctrl"
    args = ["random", run / "stores" / "pool", "-o", out, "--size", alpha["size"], "--seed",
            control["seed"]]  # fmt: skip
    assert cli_main(["select", *map(str, args)]) == 0
    assert (out / "keys.txt").read_bytes() == (
        run / "splits" / "alpha-random" / "keys.txt"
    ).read_bytes()


def test_the_gaps_stage_stops_on_a_broken_guarantee(made, tmp_path, monkeypatch):
    run0, cfg, _ = made
    run = tmp_path / "run"
    shutil.copytree(run0 / "stores", run / "stores")
    shutil.copytree(run0 / "scans", run / "scans")
    (run / "stages").mkdir()
    only = config.override(
        cfg,
        {
            "splits.full": False,
            "splits.gapmatch.per_benchmark": False,
            "splits.near.sizes": [],
            "splits.far.sizes": [],
            "splits.random.sizes": [],
            "splits.coreset.fraction": 0.0,
            "splits.semdedup.n_clusters": 0,
            "splits.image_based.n_clusters": 0,
        },
    )
    import simgap.select.build as build

    # A policy bug that keeps every pool point: the rescan finds test points it is too close to.
    real = build.gapmatch
    monkeypatch.setattr(build, "gapmatch", lambda margins: np.ones(len(margins[0]), bool))
    with pytest.raises(RuntimeError) as err:
        _run_splits(only, run)
    msg = str(err.value)
    assert msg.startswith("split combined: the gap-matching guarantee does not hold: ")
    assert "\n" not in msg and "test points have a split neighbour above" in msg
    meta = json.loads((run / "splits" / "combined" / "split.json").read_text())
    assert meta["guarantee"]["holds"] is False and meta["guarantee"]["violations"] > 0
    assert not (run / "stages" / "gaps.json").exists()  # not recorded as done

    # The 'equal' half: thresholds from a scan of another reference set than the one added.
    monkeypatch.setattr(build, "gapmatch", real)
    shutil.rmtree(run / "stages")  # the stub scan stage cannot see the stores change
    shutil.rmtree(run / "stores" / "reference")
    rng = np.random.default_rng(99)
    ref = rng.standard_normal((50, 16)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    write_store(run / "stores" / "reference", ref, [f"r{i:03d}" for i in range(50)], MODEL)
    with pytest.raises(RuntimeError, match="differ from it with the reference set added") as err:
        _run_splits(only, run)
    assert str(err.value).startswith("split combined: ")
    g = json.loads((run / "splits" / "combined" / "split.json").read_text())["guarantee"]
    assert g["violations"] == 0 and g["equal"] < g["tests"] and g["holds"] is False


def test_guarantee_verdict():
    thr = [np.array([0.5, 0.7], np.float32)]
    assert guarantee([np.array([0.5, 0.1], np.float32)], thr)["holds"]
    bad = guarantee([np.array([0.6, 0.1], np.float32)], thr)
    assert not bad["holds"] and bad["violations"] == 1 and bad["max_excess"] == pytest.approx(0.1)
    ok = guarantee([np.array([0.5, 0.1], np.float32)], thr, [thr[0]])
    assert ok["holds"] and ok["equal"] == 2
    off = guarantee([np.array([0.5, 0.1], np.float32)], thr, [np.array([0.4, 0.6], np.float32)])
    assert not off["holds"] and off["equal"] == 1 and off["violations"] == 0
    empty = guarantee([np.full(2, -np.inf, np.float32)], thr, [thr[0]])
    assert empty["holds"] and empty["max_excess"] is None
