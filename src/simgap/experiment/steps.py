"""The stage bodies: each makes one thing (a split, its gaps, shards, a checkpoint, an
evaluation) from the run folder and the results of the stages it reads from."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.analysis import audit_analysis
from simgap.config import Config
from simgap.evaluate import evaluate_benchmark
from simgap.experiment.specs import (
    Data,
    SplitSpec,
    pool_shards,
    run_store,
    templates_of,
)
from simgap.io import write_json, write_npy, write_parquet
from simgap.models import ModelSpec, load_model
from simgap.parallel import Executor, LocalEngine, ThreadEngine
from simgap.scan.kernel import KernelConfig
from simgap.scan.layout import benchmark_scan, iter_scan_rows
from simgap.scan.run import (
    benchmark_groups,
    load_tests,
    scan_benchmarks,
    scan_splits,
    split_masks,
)
from simgap.select.build import (
    SelectConfig,
    guarantee,
    nearest,
    record_guarantee,
    select,
)
from simgap.splits import materialize, read_key_list
from simgap.train import (
    TrainError,
    final_checkpoint,
    torchrun_command,
    train,
)

Log = Callable[[str], None]
Results = dict[str, Any]


def select_config(
    run: Path, data: Data, spec: SplitSpec, reference_added: bool, results: Results
) -> SelectConfig:
    """The split as ``simgap select`` makes it, from the run's stores and scans."""
    benches = spec.benchmarks
    gapmatch = spec.policy == "gapmatch"
    size = results[f"select-{spec.control_of}"]["size"] if spec.control_of else None
    p = spec.params
    return SelectConfig(
        policy=spec.policy,
        pool=Path(data.pool_store) if data.pool_store else run / "stores" / "pool",
        out=run / "splits" / spec.name,
        benchmarks=tuple(run / "stores" / f"bench-{b}" for b in benches),
        scans=(run / POOL_SCAN,) if benches else (),
        reference=(
            run / "stores" / "reference" if spec.policy in ("gapmatch", "image-based") else None
        ),
        reference_scans=(run / REFERENCE_SCAN,) if gapmatch else (),
        size=p.get("fraction", size),
        seed=spec.seed or 0,
        add_reference=reference_added,
        check=False,  # the gaps stage checks every split's guarantee in one pass
        control_of=spec.control_of,
        **{k: p[k] for k in ("clusters", "eps", "rule") if k in p},
    )


def select_split(
    run: Path, data: Data, spec: SplitSpec, reference_added: bool, results: Results, log: Log
) -> dict[str, Any]:
    """Make one split with ``simgap select``'s code: ``splits/<name>/`` (keys, split.json)."""
    cfg = select_config(run, data, spec, reference_added, results)
    meta = select(cfg, log, pool=run_store(run, "pool", data))
    return {"size": meta["size"], "keys_sha256": meta["keys_sha256"]}


# ----------------------------------------------------------------------------- scan and gaps

POOL_SCAN = Path("scans") / "pool"  # the pool against every benchmark (simgap scan's layout)
REFERENCE_SCAN = POOL_SCAN / "reference"  # the thresholds: the reference set's NN similarities
CHECK_SCAN = Path("gaps") / "check"  # every split's NN similarities, from the written keys


def scan_grid(
    run: Path,
    data: Data,
    benchmarks: list[str],
    topk: int,
    kernel: KernelConfig,
    executor: Executor,
    log: Log,
) -> dict:
    """``simgap scan``'s front-end over the run's stores: one pass over the reference set (the
    thresholds), then one over the pool giving every row's max, argmax and margin per benchmark
    (every split is selected from it)."""
    reference, pool = run_store(run, "reference", data), run_store(run, "pool", data)
    stores = [run_store(run, f"bench-{b}", data) for b in benchmarks]
    scan_benchmarks(pool, stores, run / POOL_SCAN, reference, topk, kernel, executor, "error", log)
    above = np.zeros(len(benchmarks), np.int64)
    for _, _, rec in iter_scan_rows(run / POOL_SCAN):  # a shard at a time: 10^8 rows stream
        above += (rec["margin"] > 0).sum(axis=0)
    removed = {b: int(n) for b, n in zip(benchmarks, above, strict=True)}
    for b in benchmarks:
        log(f"scan {b}: {removed[b]} pool rows above threshold")
    return {"removed": removed}


def _bench_nn(run: Path, folder: Path, bench: str) -> np.ndarray:
    return benchmark_scan(run / folder, f"bench-{bench}").topk_sim[:, 0]


def check_splits(
    run: Path,
    data: Data,
    specs: list[SplitSpec],
    benchmarks: list[str],
    reference_added: bool,
    kernel: KernelConfig,
    executor: Executor,
    log: Log,
) -> dict[str, Any]:
    """Every split's gap check in one more pass over the pool, from its written keys: per split
    and test point its NN similarity (``gaps/by-split/<split>/<benchmark>.npy``, the gap
    figure), and for a gap-matched split the guarantee, checked rather than assumed (with
    ``simgap select``'s verdict). Then ``gaps/<benchmark>.parquet``."""
    pool = run_store(run, "pool", data)
    stores = [run_store(run, f"bench-{b}", data) for b in benchmarks]
    tests, info = load_tests(stores)
    groups = {name[len("bench-") :]: slice(a, b) for name, a, b in benchmark_groups(info)}
    keys = [read_key_list(run / "splits" / s.name, allow_empty=True) for s in specs]
    masks = split_masks(pool, keys)
    nn, _ = scan_splits(pool, tests, masks, run / CHECK_SCAN, kernel, executor, log)
    reference_nn = None
    if reference_added and any(s.policy == "gapmatch" for s in specs):
        # The reference set's own NN similarities, recomputed from the store that is added: the
        # 'equal' half holds only if the thresholds came from that same set.
        reference_nn = nearest(run_store(run, "reference", data), tests)
    verdicts = {}
    for i, spec in enumerate(specs):
        for b in benchmarks:
            write_npy(run / "gaps" / "by-split" / spec.name / f"{b}.npy", nn[i, groups[b]])
    for i, spec in enumerate(specs):
        if spec.policy != "gapmatch":
            continue
        checked = spec.benchmarks
        check = guarantee(
            [nn[i, groups[b]] for b in checked],
            [_bench_nn(run, REFERENCE_SCAN, b) for b in checked],
            None if reference_nn is None else [reference_nn[groups[b]] for b in checked],
        )
        verdicts[spec.name] = record_guarantee(run / "splits" / spec.name, check)["guarantee"]
    write_gaps(run, data, benchmarks, [s.name for s in specs])
    return verdicts


def write_gaps(run: Path, data: Data, benchmarks: list[str], splits: list[str]) -> dict:
    """``gaps/<benchmark>.parquet``: per test point its NN similarity to the reference set, the
    pool and every split (the pool part; with the reference added, the split's NN similarity is
    the max of this and the reference column)."""
    for bench in benchmarks:
        table = run_store(run, f"bench-{bench}", data).keys_table()
        columns = {
            "test_key": table.column("key"),
            "label": table.column("label"),
            "reference": pa.array(_bench_nn(run, REFERENCE_SCAN, bench), pa.float32()),
            "pool": pa.array(_bench_nn(run, POOL_SCAN, bench), pa.float32()),
        }
        for name in splits:
            columns[name] = pa.array(
                np.load(run / "gaps" / "by-split" / name / f"{bench}.npy"), pa.float32()
            )
        write_parquet(run / "gaps" / f"{bench}.parquet", pa.table(columns))
    return {"benchmarks": benchmarks, "splits": splits}


# ----------------------------------------------------------------------------- train, evaluate


def materialize_split(run: Path, data: Data, cfg: Config, split: str, executor: Executor) -> dict:
    # IO-bound: a local run copies on threads (no process start-up, fsyncs overlap copies).
    if isinstance(executor.engine, LocalEngine):
        executor = Executor(ThreadEngine(max(4, executor.engine.workers)), executor.retries)
    return materialize(
        run / "splits" / split,
        pool_shards(data),
        run / "shards" / split,
        reference=Path(data.reference) if cfg.reference.add_to_splits else None,
        caption_template=cfg.reference.caption,
        executor=executor,
    )


def train_split(run: Path, cfg: Config, split: str, shards: dict, log: Log) -> str:
    recipe = cfg.train.recipe
    if cfg.train.gpus > 1:
        return _torchrun(run, cfg, split, shards, log)
    ckpt = train(
        recipe,
        shards["shards"],
        shards["samples"],
        run / "train",
        split,
        lambda m: log(f"[{split}] {m}"),
        device=cfg.train.device,
        threads=cfg.train.threads or None,
    )
    return str(ckpt)


def _torchrun(run: Path, cfg: Config, split: str, shards: dict, log: Log) -> str:
    """One node, ``train.gpus`` ranks; the global batch is kept (simgap.train.torchrun_command)."""
    recipe = cfg.train.recipe
    cmd = torchrun_command(
        recipe, shards["shards"], shards["samples"], run / "train", split, cfg.train.gpus
    )
    log(f"[{split}] $ {cmd}")
    rc = subprocess.run(shlex.split(cmd), check=False).returncode
    final = final_checkpoint(run / "train", split, recipe)
    if rc != 0 or not final.is_file():
        raise TrainError(
            f"torchrun for split {split} exited with {rc}; see {run / 'train' / split}"
        )
    return str(final)


def evaluate_split(
    run: Path, data: Data, cfg: Config, split: str, ckpt: str, benchmarks: list[str]
) -> dict:
    loaded = load_model(
        ModelSpec(arch=cfg.train.recipe.model, checkpoint=ckpt), device=cfg.evaluate.device
    )
    templates = templates_of(data)
    out: dict[str, Any] = {"split": split, "checkpoint": ckpt, "benchmarks": {}}
    for bench in benchmarks:
        res = evaluate_benchmark(
            loaded, Path(data.benchmarks[bench]), templates, cfg.evaluate.batch_size
        )
        preds = res.pop("predictions")
        write_parquet(
            run / "eval" / "predictions" / f"{split}-{bench}.parquet",
            pa.table(
                {
                    "key": [p[0] for p in preds],
                    "label": [int(p[1]) for p in preds],
                    "pred": [int(p[2]) for p in preds],
                }
            ),
        )
        out["benchmarks"][bench] = res
    write_json(run / "eval" / f"{split}.json", out)
    return {b: r["top1"] for b, r in out["benchmarks"].items()}


# ----------------------------------------------------------------------------- analysis


def audit_step(run: Path, data: Data, cfg: Config, benchmarks: list[str], log: Log) -> dict:
    tests = {b: run_store(run, f"bench-{b}", data) for b in benchmarks}
    truth_path = run / "world" / "ground_truth" / "near_duplicates.parquet"
    truth = pq.read_table(truth_path) if cfg.sources.kind == "world" else None
    return audit_analysis(tests, run_store(run, "pool", data), cfg, truth, run / "audit", log)


def embed_source(
    run: Path, name: str, source: str, r: Results, sim: Any, executor: Executor, log: Log
) -> int:
    from simgap.embed import embed

    m = r["similarity-model"]
    spec = ModelSpec(arch=m["arch"], checkpoint=m["checkpoint"], pretrained=m["pretrained"])
    store = embed(
        source, run / "stores" / name, spec, executor, sim.device, sim.batch_size, progress=log
    )
    return store.manifest["rows"]
