"""The runner in the default suite, small: a run killed at a stage boundary resumes to the same
bytes, the runner on Ray makes the same splits, and a dropped split's outputs are deleted.

One tiny world (no training: every stage up to the splits' gaps) keeps each run under a minute on
2 cores. The extended suite has the large forms (tests/test_run.py, test_kill.py).
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from simgap.experiment import config, run_config

from .faultlib import assert_same_tree, move_aside, record, run_and_kill

SMALL = """
name = "small"
seed = 1
[sources.world]
seed = 3
scale = 0.03
n_classes = 4
[similarity]
train_on_pool = false
checkpoint = "{checkpoint}"
[splits.gapmatch]
per_benchmark = false
[splits.near]
sizes = [0.5]
[train]
splits = []
"""
# Logs, timings and records that name input mtimes legitimately differ after a resume (see
# test_kill.RUN_VOLATILE); the report is not built here.
VOLATILE = (
    r"(^|/)run\.json$", r"^stages/", r"\.log$", r"^report/", r"^world/world\.json$",
    r"(^|/)\.?done/[^/]+\.json$", r"(^|/)\.index/",
)  # fmt: skip


@pytest.fixture(scope="module")
def small(workdir, checkpoint):
    path = workdir / "small-run.toml"
    path.write_text(SMALL.replace("{checkpoint}", str(checkpoint).replace("\\", "\\\\")))
    return path


def _keys(run, split: str) -> list[str]:
    return pq.read_table(run / "splits" / split / "keys.parquet").column("key").to_pylist()


@pytest.fixture(scope="module")
def reference(small, workdir):
    """The uninterrupted run, moved aside from where the killed run then runs (outputs record
    absolute paths, so both must run in the same place)."""
    run = workdir / "small-run"
    run_config(config.load(small), run, log=lambda _: None, report=False)
    return move_aside(run)


def test_killed_run_resumes_to_the_same_bytes(small, workdir, reference):
    run = workdir / "small-run"
    # The stage's record is written when it is done (the console's lines go to stdout).
    assert run_and_kill(
        ["run", small, "--run-dir", run],
        after_file=run / "stages" / "embed-pool.json",
        delay=0.5,
    )
    assert (run / "stages").is_dir() and not (run / "stages" / "gaps.json").exists()
    logs: list[str] = []
    run_config(config.load(small), run, log=logs.append, report=False)  # the resume
    assert "[cached] embed-reference" in logs
    assert_same_tree(reference, run, ignore=VOLATILE)
    record("kill", "run (small)", "survived", kills=1)


def test_runner_on_ray_makes_the_same_splits(small, workdir, reference):
    import ray

    run = workdir / "small-ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = config.override(config.load(small), {"engine.name": "ray"})
        run_config(cfg, run, log=lambda _: None, report=False)
    finally:
        ray.shutdown()
    # Threshold-decided splits by keys (Ray-made embeddings may differ in the last fp16 bit,
    # which can reorder the near ranking: see tests/test_run.py), near-0.5 by size.
    for split in ("full", "combined", "combined-random"):
        assert _keys(run, split) == _keys(reference, split), split
    assert len(_keys(run, "near-0.5")) == len(_keys(reference, "near-0.5"))


def test_a_dropped_split_is_deleted(small, workdir):
    run = workdir / "small-run"  # finished by the resume above (or from scratch here)
    logs: list[str] = []
    cfg = config.override(config.load(small), {"splits.near.sizes": [0.4]})
    run_config(cfg, run, log=logs.append, report=False)
    ran = {m.removeprefix("[run] ") for m in logs if m.startswith("[run] ")}
    # Only the new split's stages and what reads every split (no training: robustness is cached).
    assert ran == {"select-near-0.4", "gaps", "analysis-similarity", "analysis-composition"}, ran
    assert not (run / "splits" / "near-0.5").exists()
    assert not (run / "gaps" / "by-split" / "near-0.5").exists()
    assert not (run / "stages" / "select-near-0.5.json").exists()
    assert (run / "splits" / "near-0.4" / "keys.parquet").is_file()
    assert len(_keys(run, "near-0.4")) == round(0.4 * len(_keys(run, "full")))
