"""The whole experiment end to end on a tiny world, then a rerun that must hit every cache."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from simgap.experiment import ExperimentConfig, run_experiment
from simgap.report import summary_table
from simgap.splits import read_split
from simgap.store import open_store
from simgap.train import Recipe
from simgap.world import WorldConfig

pytestmark = pytest.mark.slow

TINY = ExperimentConfig(
    world=WorldConfig(seed=3, scale=0.05),
    similarity_recipe=Recipe(epochs=1, batch_size=32),
    train_recipe=Recipe(epochs=1, batch_size=32),
    train_splits=("full", "combined", "combined-random"),
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    logs: list[str] = []
    result = run_experiment(run, TINY, logs.append)
    return run, result, logs


def test_every_stage_ran_and_wrote_its_outputs(demo_run):
    run, result, _ = demo_run
    stages = set(result["timings"])
    for name in [
        "world",
        "similarity-model",
        "embed-pool",
        "embed-reference",
        "scan",
        "select",
        "gaps",
        "train-full",
        "train-combined",
        "evaluate-combined-random",
    ]:
        assert name in stages
    benchmarks = ["photo", "photo-v2", "sketch", "rendition", "hard", "pose"]
    for b in benchmarks:
        assert open_store(run / "stores" / f"bench-{b}").rows > 0
        ev = json.loads((run / "eval" / "combined.json").read_text())["benchmarks"][b]
        assert 0.0 <= ev["top1"] <= 1.0 and ev["n"] > 0
    html = (run / "report" / "report.html").read_text()
    assert "combined-random" in html and "data:image/png;base64," in html
    assert "combined" in summary_table(run)


def test_gapmatch_splits_are_consistent_with_the_brute_force(demo_run):
    """Recompute the combined split from the stored embeddings with numpy alone."""
    run, _, _ = demo_run
    pool = open_store(run / "stores" / "pool")
    ref = open_store(run / "stores" / "reference").embeddings().astype(np.float32)
    base = pool.embeddings().astype(np.float32)
    remove = np.zeros(pool.rows, bool)
    for b in ["photo", "photo-v2", "sketch", "rendition", "hard", "pose"]:
        tests = open_store(run / "stores" / f"bench-{b}").embeddings().astype(np.float32)
        thr = (tests @ ref.T).max(axis=1)
        remove |= ((base @ tests.T) > thr[None, :]).any(axis=1)
        gaps = pq.read_table(run / "gaps" / f"{b}.parquet").to_pydict()
        np.testing.assert_allclose(np.array(gaps["reference"], np.float32), thr, atol=1e-6)
        assert (np.array(gaps["combined"]) <= thr).all()
    keys = np.array(pool.keys())
    kept, meta = read_split(run / "splits" / "combined")
    assert kept == set(keys[~remove])
    assert meta["guarantee"]["holds"] and meta["guarantee"]["violations"] == 0
    control, cmeta = read_split(run / "splits" / "combined-random")
    assert len(control) == len(kept) and cmeta["control_of"] == "combined"
    full, _ = read_split(run / "splits" / "full")
    assert len(full) == pool.rows


def test_rerun_hits_every_cache_and_keeps_bytes(demo_run):
    run, result, _ = demo_run
    before = {p: p.read_bytes() for p in (run / "splits").rglob("*") if p.is_file()}
    before |= {p: p.read_bytes() for p in (run / "eval").glob("*.json")}
    logs: list[str] = []
    run_experiment(run, TINY, logs.append)
    assert not [m for m in logs if m.startswith("[run]")], logs
    assert before == {p: p.read_bytes() for p in before}
