"""The whole experiment end to end on a tiny world, then a rerun that must hit every cache."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from simgap import config
from simgap.experiment import run_config
from simgap.report import summary_table
from simgap.splits import read_split
from simgap.store import open_store

pytestmark = pytest.mark.slow

# The shipped demo config, made tiny: the demo is `simgap run demo`.
TINY = config.override(
    config.load("demo"),
    {
        "sources.world.seed": 3,
        "sources.world.scale": 0.05,
        "similarity.recipe.epochs": 1,
        "similarity.recipe.batch_size": 32,
        "train.recipe.epochs": 1,
        "train.recipe.batch_size": 32,
        "train.splits": ["combined", "coreset"],
    },
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    logs: list[str] = []
    result = run_config(TINY, run, logs.append)
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
        "select-combined",
        "select-coreset-random",
        "gaps",
        "select-full",
        "train-combined",
        "evaluate-coreset",
    ]:
        assert name in stages
    benchmarks = ["photo", "photo-v2", "sketch", "rendition", "hard", "pose"]
    for b in benchmarks:
        assert open_store(run / "stores" / f"bench-{b}").rows > 0
        ev = json.loads((run / "eval" / "combined.json").read_text())["benchmarks"][b]
        assert 0.0 <= ev["top1"] <= 1.0 and ev["n"] > 0
    info = json.loads((run / "run.json").read_text())
    assert info["config_text"] == config.shipped_path("demo").read_text()
    assert info["config"]["overrides"]["sources.world.scale"] == 0.05
    assert info["config"]["benchmarks"] == benchmarks
    assert set(info["timings"]) == stages and info["versions"]["torch"]
    assert info["wall_seconds"] > 0 and info["finished"] >= info["started"]
    html = (run / "report" / "report.html").read_text()
    assert "combined-random" in html and "data:image/png;base64," in html
    assert "combined" in summary_table(run)


def test_gapmatch_splits_are_consistent_with_the_brute_force(demo_run):
    """Recompute the combined split from the stored embeddings with numpy alone."""
    run, _, _ = demo_run
    pool = open_store(run / "stores" / "pool")
    # The scan's numerics: each similarity is the exact product of the fp16 vectors (float64
    # here) rounded once to float32, and comparisons are between those float32 values. A float32
    # BLAS product can round a tie (pool row as similar as the threshold) either way.
    ref = open_store(run / "stores" / "reference").embeddings().astype(np.float64)
    base = pool.embeddings().astype(np.float64)
    remove = np.zeros(pool.rows, bool)
    for b in ["photo", "photo-v2", "sketch", "rendition", "hard", "pose"]:
        tests = open_store(run / "stores" / f"bench-{b}").embeddings().astype(np.float64)
        thr = (tests @ ref.T).max(axis=1).astype(np.float32)
        remove |= ((base @ tests.T).astype(np.float32) > thr[None, :]).any(axis=1)
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
    run_config(TINY, run, logs.append)
    assert not [m for m in logs if m.startswith("[run]")], logs
    assert before == {p: p.read_bytes() for p in before}


def test_a_resized_split_reruns_alone(demo_run):
    """Changing one split's size reruns that split's stages (and its control's), nothing else;
    its old shards and checkpoint are cleared, not reused."""
    run, _, _ = demo_run
    logs: list[str] = []
    run_config(config.override(TINY, {"splits.coreset.fraction": 0.4}), run, logs.append)
    ran = {m.removeprefix("[run] ") for m in logs if m.startswith("[run] ")}
    per_split = {f"select-{n}" for n in ("coreset", "coreset-random")}
    per_split |= {f"{s}-coreset" for s in ("materialize", "train", "evaluate")}
    assert ran == per_split | {"gaps", "analysis-robustness", "analysis-similarity"}
    assert "[cached] train-combined" in logs and "[clear] train/coreset: made for other inputs" in [
        m for m in logs if m.startswith("[clear]")
    ]
    pool = open_store(run / "stores" / "pool").rows
    kept, meta = read_split(run / "splits" / "coreset")
    assert len(kept) == round(0.4 * pool) and meta["params"]["fraction"] == 0.4
    record = json.loads((run / "stages" / "select-coreset.json").read_text())
    assert record["result"]["size"] == len(kept)
    control, _ = read_split(run / "splits" / "coreset-random")
    assert len(control) == len(kept)
    trained = json.loads((run / "train" / "coreset" / "simgap-train.json").read_text())
    assert trained["num_samples"] == len(kept) + open_store(run / "stores" / "reference").rows
