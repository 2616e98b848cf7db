"""`simgap run` scans the whole grid in two passes over the pool (one for every benchmark, one
for every split's check), and every split equals what `simgap select` makes from the same
stores: the paper's grid on a small world, with a given similarity model, nothing trained."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from simgap.cli import main as cli_main
from simgap.experiment import config, run_config
from simgap.models import ModelSpec, load_model
from simgap.store import Store

GRID = """
name = "grid"
seed = 2
[sources.world]
seed = 5
scale = 0.05
[similarity]
train_on_pool = false
checkpoint = "{checkpoint}"
[splits.gapmatch]
per_benchmark = true
combined = true
controls = true
[splits.near]
sizes = [0.25, 0.5]
[splits.far]
sizes = [0.25, 0.5]
[splits.random]
sizes = [0.5]
[splits.coreset]
fraction = 0.5
[train]
splits = []
[analysis]
audit = "off"
"""


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    ckpt = root / "similarity.pt"
    torch.manual_seed(0)
    loaded = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    torch.save({"state_dict": loaded.model.state_dict()}, ckpt)
    cfg = config.parse(GRID.replace("{checkpoint}", str(ckpt)), str(root / "grid.toml"))
    run = root / "run"
    reads: Counter[tuple[str, str]] = Counter()
    real = Store.read_emb

    def counted(self: Store, shard: str) -> np.ndarray:
        reads[(self.path.name, shard)] += 1
        return real(self, shard)

    mp = pytest.MonkeyPatch()
    mp.setattr(Store, "read_emb", counted)
    try:
        result = run_config(cfg, run, lambda _: None, report=False)
    finally:
        mp.undo()
    return run, cfg, result, reads


def test_the_grid_reads_the_pool_twice(grid):
    run, _, result, reads = grid
    splits = {s.name for s in result["splits"]}
    assert len(splits) >= 20  # 6 per-benchmark + combined, controls, near/far/random, coreset
    pool = {shard: n for (store, shard), n in reads.items() if store == "pool"}
    assert pool, "the pool was never read"
    # Every pool shard: once by the scan (every benchmark), once by the check (every split).
    assert set(pool.values()) == {2}, pool
    reference = {n for (store, _), n in reads.items() if store == "reference"}
    # The thresholds, the reference NN of the 'equal' check, and the similarity model's class
    # separation (k-NN of the reference embeddings: an analysis, not a scan pass).
    assert reference == {3}
    doc = json.loads((run / "scans" / "pool" / "scan.json").read_text())
    assert [b["name"] for b in doc["benchmarks"]] == [
        f"bench-{b}" for b in ("photo", "photo-v2", "sketch", "rendition", "hard", "pose")
    ]
    for name in splits:
        meta = json.loads((run / "splits" / name / "split.json").read_text())
        if meta["policy"] == "gapmatch":
            assert meta["guarantee"]["holds"] and meta["guarantee"]["equal"] > 0, name
        for b in ("photo", "pose"):
            nn = np.load(run / "gaps" / "by-split" / name / f"{b}.npy")
            assert nn.dtype == np.float32 and len(nn) > 0


def _brute_nn(run: Path, split: str, bench: str) -> np.ndarray:
    from simgap.store import open_store

    pool = open_store(run / "stores" / "pool")
    keys = set((run / "splits" / split / "keys.txt").read_text().split())
    kept = np.array([k in keys for k in pool.keys()])
    tests = open_store(run / "stores" / f"bench-{bench}").embeddings().astype(np.float64)
    sims = (pool.embeddings().astype(np.float64)[kept] @ tests.T).astype(np.float32)
    return sims.max(0) if kept.any() else np.full(len(tests), -np.inf, np.float32)


def test_the_check_pass_equals_brute_force(grid):
    run = grid[0]
    for split, bench in (("combined", "sketch"), ("near-0.25", "photo"), ("coreset", "hard")):
        got = np.load(run / "gaps" / "by-split" / split / f"{bench}.npy")
        np.testing.assert_array_equal(got, _brute_nn(run, split, bench), err_msg=split)


def test_every_split_equals_simgap_select(grid, tmp_path):
    run, _, result, _ = grid
    stores, scan = run / "stores", run / "scans" / "pool"
    for spec in result["splits"]:
        if spec.control_of or spec.policy in ("full", "random"):
            continue
        benches = [str(stores / f"bench-{b}") for b in spec.benchmarks]
        args = ["select", spec.policy, str(stores / "pool"), "-o", str(tmp_path / spec.name),
                "--benchmarks", *benches, "--scans", str(scan)]  # fmt: skip
        if spec.policy == "gapmatch":
            args += ["--reference", str(stores / "reference"),
                     "--reference-scans", str(scan / "reference")]  # fmt: skip
        else:
            args += ["--size", str(spec.params["fraction"])]
        assert cli_main(args) == 0, spec.name
        ours, theirs = run / "splits" / spec.name, tmp_path / spec.name
        assert (ours / "keys.txt").read_bytes() == (theirs / "keys.txt").read_bytes(), spec.name
        mine = json.loads((ours / "split.json").read_text())
        cli = json.loads((theirs / "split.json").read_text())
        assert mine == cli, spec.name  # guarantee included: the run's check pass = select's


def test_dry_run_prints_passes_and_estimates_per_scanning_stage(tmp_path, capsys):
    assert cli_main(["run", "paper-laion", "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "scanning on cuda (cuda rates: projected, not measured" in out
    assert "pool 200,000,000 rows, reference 1,281,167, 166,963 test points, d=640" in out
    # 2 x 2e8 x 166,963 x 640 + 2 x 1,281,167 x 166,963 x 640 FLOP.
    assert (
        "scan: 1 pass over the reference set + 1 over the pool (every benchmark at once), "
        "43.0 PFLOP" in out
    )
    assert "gaps: 1 pass over the pool checking 74 splits at once" in out
    assert "embed-pool: 1 pass over the pool's images" in out
    # A run whose stores exist: their sizes, and this CPU's measured rate.
    assert cli_main(["run", "paper-world", "--dry-run", "--run-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "scanning on cpu (cpu rates: measured" in out
    assert "sizes from the world's config: pool 12,000 rows, reference 1,800" in out


def test_estimates_use_the_runs_stores(grid, capsys):
    run, cfg, _, _ = grid
    from simgap.experiment.estimate import sizes_of
    from simgap.store import open_store

    sizes = sizes_of(cfg, run)
    assert sizes.source == "the run's stores"
    assert sizes.pool == open_store(run / "stores" / "pool").rows and sizes.dim == 64


def test_scan_splits_equals_brute_force_per_split(tmp_path):
    """Every split's NN similarity and row in one pass: shards of different sizes (one empty),
    duplicate rows across shards (ties: the lower row), an empty split, on two engines."""
    from test_scan_engines import make_store, unit_fp16

    from simgap.parallel import Executor, LocalEngine
    from simgap.scan.run import scan_splits, split_masks

    rng = np.random.default_rng(3)
    x = unit_fp16(rng.standard_normal((300, 16)))
    x[200:210] = x[:10]  # the same rows in another shard
    t = unit_fp16(rng.standard_normal((25, 16)))
    store = make_store(tmp_path / "base", x, [120, 0, 100, 80])
    keys = np.array(store.keys())
    kept = [rng.random(300) < f for f in (0.5, 0.1, 1.0)] + [np.zeros(300, bool)]
    kept[2][:10] = False  # the originals dropped: their duplicates are the neighbours
    masks = split_masks(store, [sorted(keys[k]) for k in kept])
    sim, row = scan_splits(store, t, masks, tmp_path / "one")
    exact = (x.astype(np.float64) @ t.astype(np.float64).T).astype(np.float32)
    for s, k in enumerate(kept):
        if not k.any():
            assert np.isneginf(sim[s]).all() and (row[s] == -1).all()
            continue
        masked = np.where(k[:, None], exact, -np.inf)
        np.testing.assert_array_equal(sim[s], masked.max(0))
        np.testing.assert_array_equal(row[s], masked.argmax(0))  # the lowest row among ties
    pool_sim, pool_row = scan_splits(store, t, masks, tmp_path / "pool", executor=Executor(
        LocalEngine(2)))  # fmt: skip
    assert np.array_equal(pool_sim, sim) and np.array_equal(pool_row, row)
