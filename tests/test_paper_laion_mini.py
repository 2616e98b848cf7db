"""`simgap run` on paper-laion-mini: the real setup's every code path but the GPU, end to end,
on CPU, in the real layouts (tests/laion_mini.py), and a rerun gives the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from laion_mini import STAND_INS, build, mini_config, mini_settings

from simgap.experiment import config, make_plan, run_config
from simgap.store import ClipRetrievalStore, open_store


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "sources.real.benchmarks":
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion-mini")
    paths = build(root)
    cfg = mini_config(paths)
    log: list[str] = []
    runs = [(root / "run", run_config(cfg, root / "run", log.append), log)]
    # The rerun: a fresh folder where only the trainings are carried over (their bytes are the
    # training's concern; a minute of CI each): everything else is made again.
    (root / "rerun" / "stages").mkdir(parents=True)
    for record in (root / "run" / "stages").glob("train-*.json"):
        shutil.copyfile(record, root / "rerun" / "stages" / record.name)
    log = []
    runs.append((root / "rerun", run_config(cfg, root / "rerun", log.append), log))
    return paths, cfg, runs


def test_the_config_is_paper_laion_but_paths_sizes_model_and_device(mini):
    paths, cfg, _ = mini
    ours, theirs = config.to_json(cfg), config.to_json(config.load("paper-laion"))
    for doc in (ours, theirs):
        del doc["path"], doc["overrides"]
    ours, theirs = _flat(ours), _flat(theirs)
    changed = {k for k in ours if ours[k] != theirs[k]}
    assert changed == set(mini_settings(paths))
    assert ours["splits.near.sizes"] == theirs["splits.near.sizes"]  # the authors' eight sizes


def test_every_stage_runs_on_the_real_layouts(mini):
    paths, cfg, runs = mini
    run, result, log = runs[0]
    stages = set(result["timings"])
    assert stages == {s.name for s in make_plan(cfg, run, lambda _: None).stages}  # all of them
    assert {"scan", "gaps", "audit", "train-combined", "evaluate-combined-random"} <= stages
    assert "embed-pool" not in stages  # the pool's clip-retrieval embeddings are read in place
    pool = open_store(paths["pool_embeddings"])
    assert isinstance(pool, ClipRetrievalStore) and not (run / "stores" / "pool").exists()
    scan = json.loads((run / "scans" / "pool" / "scan.json").read_text())
    assert scan["rows"] == pool.rows
    assert [b["name"] for b in scan["benchmarks"]] == [f"bench-{b}" for b in STAND_INS]
    reference = open_store(run / "stores" / "reference")
    keys = pq.read_table(run / "stores" / "reference" / "keys" / "00000.parquet")
    assert reference.rows > 0 and str(keys.column("key")[0]).startswith("n0")  # WordNet ids
    for name in STAND_INS:
        gaps = pq.read_table(run / "gaps" / f"{name}.parquet")
        assert {"reference", "pool", "combined", "near-0.125", "coreset"} <= set(gaps.column_names)
    evaluated = json.loads((run / "eval" / "combined.json").read_text())["benchmarks"]
    assert set(evaluated) == set(STAND_INS)
    assert Path(result["report"]["html"]).is_file()
    combined = json.loads((run / "splits" / "combined" / "split.json").read_text())
    assert combined["guarantee"]["holds"]


def test_a_rerun_gives_the_same_bytes(mini):
    _, _, runs = mini
    (a, _, _), (b, _, log) = runs
    assert "[cached] train-combined" in log and "[run] scan" in log and "[run] gaps" in log
    outputs = [
        "scans/pool/scan.json",
        "scans/pool/tests/tests.parquet",
        "gaps/imagenet-val.parquet",
        "gaps/objectnet.parquet",
        "splits/combined/keys.parquet",
        "splits/near-0.125/keys.parquet",
        "splits/coreset/split.json",
        "eval/combined.json",
    ]
    for rel in outputs:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for shard in sorted((a / "scans" / "pool" / "rows").glob("*.npy")):
        assert shard.read_bytes() == (b / "scans" / "pool" / "rows" / shard.name).read_bytes()
