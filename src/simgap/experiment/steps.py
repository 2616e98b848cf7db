"""The stage bodies: each makes one thing (a split, its gaps, shards, a checkpoint, an
evaluation) from the run folder and the results of the stages it reads from."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.analysis import (
    Sampling,
    audit_analysis,
    robustness_analysis,
    similarity_analysis,
    statistics_analysis,
)
from simgap.data.clip_benchmark import open_benchmark
from simgap.data.keylist import read_key_list
from simgap.evaluate import evaluate_benchmark
from simgap.experiment.config import Config
from simgap.experiment.specs import (
    Data,
    SplitSpec,
    pool_samples,
    pool_shards,
    reference_points_path,
    run_store,
    templates_of,
)
from simgap.io import fingerprint, read_json, write_json, write_npy, write_parquet
from simgap.layout import RunLayout, bench_store_name, benchmark_name
from simgap.materialize import materialize
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
    split_rows,
)
from simgap.select.splitfile import write_split
from simgap.separation import separation_analysis
from simgap.train import (
    GpuSlots,
    Recipe,
    TrainError,
    train,
)
from simgap.types import Log

Results = dict[str, Any]


def select_config(
    run: Path, data: Data, spec: SplitSpec, reference_added: bool, results: Results
) -> SelectConfig:
    """The split as ``simgap select`` makes it, from the run's stores and scans."""
    benches = spec.benchmarks
    gapmatch = spec.policy == "gapmatch"
    size = results[f"select-{spec.control_of}"]["size"] if spec.control_of else None
    p = spec.params
    layout = RunLayout(run)
    return SelectConfig(
        policy=spec.policy,
        pool=Path(data.pool_store) if data.pool_store else layout.store("pool"),
        out=layout.split(spec.name),
        benchmarks=tuple(layout.bench_store(b) for b in benches),
        scans=(layout.pool_scan,) if benches else (),
        reference=(
            layout.store("reference") if spec.policy in ("gapmatch", "image-based") else None
        ),
        reference_scans=(layout.reference_scan,) if gapmatch else (),
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
    stores = [run_store(run, bench_store_name(b), data) for b in benchmarks]
    scan = RunLayout(run).pool_scan
    scan_benchmarks(pool, stores, scan, reference, topk, kernel, executor, "error", log)
    above = np.zeros(len(benchmarks), np.int64)
    for _, _, rec in iter_scan_rows(scan):  # a shard at a time: 10^8 rows stream
        above += (rec["margin"] > 0).sum(axis=0)
    removed = {b: int(n) for b, n in zip(benchmarks, above, strict=True)}
    for b in benchmarks:
        log(f"scan {b}: {removed[b]} pool rows above threshold")
    return {"removed": removed}


def _bench_nn(scan: Path, bench: str) -> np.ndarray:
    return benchmark_scan(scan, bench_store_name(bench)).topk_sim[:, 0]


def check_splits(
    run: Path,
    data: Data,
    specs: list[SplitSpec],
    benchmarks: list[str],
    kernel: KernelConfig,
    executor: Executor,
    log: Log,
) -> dict[str, Any]:
    """Every split's gap check in one more pass over the pool, from its written keys: per split
    and test point its NN similarity (``gaps/by-split/<split>/<benchmark>.npy``, the gap
    figure), and for a gap-matched split the guarantee, checked rather than assumed (with
    ``simgap select``'s verdict). Then ``gaps/<benchmark>.parquet``."""
    layout = RunLayout(run)
    pool = run_store(run, "pool", data)
    stores = [run_store(run, bench_store_name(b), data) for b in benchmarks]
    tests, info = load_tests(stores)
    groups = {benchmark_name(name): slice(a, b) for name, a, b in benchmark_groups(info)}
    keys = [read_key_list(layout.split(s.name), allow_empty=True) for s in specs]
    masks = split_masks(pool, keys)
    nn, _ = scan_splits(pool, tests, masks, layout.check_scan, kernel, executor, log)
    reference_nn = None
    if any(s.policy == "gapmatch" and s.reference for s in specs):
        # The reference set's own NN similarities, recomputed from the store that is added: the
        # 'equal' half holds only if the thresholds came from that same set.
        reference_nn = nearest(run_store(run, "reference", data), tests)
    verdicts = {}
    for i, spec in enumerate(specs):
        for b in benchmarks:
            write_npy(layout.split_gap(spec.name, b), nn[i, groups[b]])
    for i, spec in enumerate(specs):
        if spec.policy != "gapmatch":
            continue
        checked = spec.benchmarks
        check = guarantee(
            [nn[i, groups[b]] for b in checked],
            [_bench_nn(layout.reference_scan, b) for b in checked],
            None if not spec.reference else [reference_nn[groups[b]] for b in checked],
        )
        verdicts[spec.name] = record_guarantee(layout.split(spec.name), check)["guarantee"]
    write_gaps(run, data, benchmarks, [s.name for s in specs])
    return verdicts


def write_gaps(run: Path, data: Data, benchmarks: list[str], splits: list[str]) -> dict:
    """``gaps/<benchmark>.parquet``: per test point its NN similarity to the reference set, the
    pool and every split (the pool part; with the reference added, the split's NN similarity is
    the max of this and the reference column)."""
    layout = RunLayout(run)
    for bench in benchmarks:
        table = run_store(run, bench_store_name(bench), data).keys_table()
        columns = {
            "test_key": table.column("key"),
            "label": table.column("label"),
            "reference": pa.array(_bench_nn(layout.reference_scan, bench), pa.float32()),
            "pool": pa.array(_bench_nn(layout.pool_scan, bench), pa.float32()),
        }
        for name in splits:
            columns[name] = pa.array(np.load(layout.split_gap(name, bench)), pa.float32())
        write_parquet(layout.gap_table(bench), pa.table(columns))
    return {"benchmarks": benchmarks, "splits": splits}


# ----------------------------------------------------------------------------- train, evaluate


def materialize_split(
    run: Path, data: Data, cfg: Config, split: str, executor: Executor, reference: bool
) -> dict:
    """The split's training shards, plus the reference set's (shuffled by the run's seed) when
    its family adds it."""
    # IO-bound: a local run copies on threads (no process start-up, fsyncs overlap copies).
    if isinstance(executor.engine, LocalEngine):
        executor = Executor(ThreadEngine(max(4, executor.engine.workers)), executor.retries)
    return materialize(
        RunLayout(run).split(split),
        pool_shards(data),
        RunLayout(run).shards(split),
        reference=Path(data.reference) if reference else None,
        caption_template=cfg.reference.caption,
        reference_seed=cfg.seed,
        executor=executor,
    )


def materialize_reference(run: Path, data: Data, cfg: Config, executor: Executor) -> dict:
    """The reference set alone, as training shards: the data of the reference-line models (the
    paper's ImageNet-trained models). An empty split plus the reference set, so the shards are
    the ones every split gets."""
    empty = RunLayout(run).reference_line / "split"
    if not (empty / "split.json").is_file():
        write_split(empty, [], {"name": "reference-only", "policy": "reference-only"})
    if isinstance(executor.engine, LocalEngine):
        executor = Executor(ThreadEngine(max(4, executor.engine.workers)), executor.retries)
    return materialize(
        empty,
        pool_shards(data),
        RunLayout(run).reference_line_shards,
        reference=Path(data.reference),
        caption_template=cfg.reference.caption,
        reference_seed=cfg.seed,
        executor=executor,
    )


def model_name(split: str, seed: int) -> str:
    """A trained model's name: the split's for seed 0 (the layout of single-seed runs), else
    ``<split>@s<k>``."""
    return split if seed == 0 else f"{split}@s{seed}"


def fit_batch(recipe: Recipe, samples: int, gpus: int) -> Recipe:
    """A reference-line model's recipe with its batch cut to the reference set when that is
    smaller (a small world's reference set can be smaller than the splits' batch), kept
    divisible over the ranks."""
    if samples >= recipe.batch_size:
        return recipe
    return dataclasses.replace(recipe, batch_size=max(gpus, samples - samples % gpus))


def seed_recipe(recipe: Recipe, seed: int) -> Recipe:
    return recipe if seed == 0 else dataclasses.replace(recipe, seed=recipe.seed + seed)


class SharedTrainings:
    """Trainings of identical inputs (the same key list, recipe and seed: in paper-laion,
    far-0.5 is the coreset) run once; the others reuse the checkpoint. Recorded in
    ``train/by-inputs/<hash>.json`` so a resumed run reuses it too; a lock per input hash makes
    a second chain wait for the first one's training instead of starting its own."""

    def __init__(self, run: Path):
        self.dir = RunLayout(run).train_by_inputs
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def once(self, inputs: Any, name: str, train_fn: Callable[[], str], log: Log) -> str:
        digest = fingerprint(inputs)[:16]
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            record = self.dir / f"{digest}.json"
            if record.is_file():
                done = read_json(record)
                if Path(done["checkpoint"]).is_file() and done["model"] != name:
                    log(
                        f"[{name}] same key list, recipe and seed as {done['model']}: reusing its "
                        "checkpoint"
                    )
                    return done["checkpoint"]
            ckpt = train_fn()
            write_json(record, {"model": name, "checkpoint": ckpt})
            return ckpt


def train_split(run: Path, cfg: Config, name: str, recipe: Recipe, shards: dict, log: Log) -> str:
    """Train one model (a split at one seed, or a reference-line model) into train/<name>."""
    if shards["samples"] < recipe.batch_size:
        # open_clip_train's epoch would hold no batch and never end.
        raise TrainError(
            f"{name}: {shards['samples']} training samples, fewer than one global batch "
            f"({recipe.batch_size}); lower train.recipe.batch_size"
        )
    # Its own GPU set (gpus ranks through torchrun when more than one; the global batch is
    # kept): trainings side by side never share a GPU.
    with gpu_slots(cfg).lease() as gpus:
        ckpt = train(
            recipe,
            shards["shards"],
            shards["samples"],
            RunLayout(run).train,
            name,
            lambda m: log(f"[{name}] {m}"),
            device=cfg.train.device,
            threads=cfg.train.threads or None,
            gpus=cfg.train.gpus,
            cuda_devices=gpus,
        )
    return str(ckpt)


_SLOTS: dict[tuple[str, int, int], GpuSlots] = {}
_SLOTS_LOCK = threading.Lock()


def gpu_slots(cfg: Config) -> GpuSlots:
    """The GPU sets of this process's trainings: one lender per training shape, so that
    trainings started from any stage (splits, reference-line models) share it."""
    key = (cfg.train.device, cfg.train.gpus, cfg.train.parallel)
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(key, GpuSlots.for_trainings(*key))


def evaluate_split(
    run: Path,
    data: Data,
    cfg: Config,
    name: str,
    ckpt: str,
    benchmarks: list[str],
    out: Path | None = None,
) -> dict:
    """Zero-shot top-1 of one model: ``<out>/<name>.json`` and its per-test predictions in
    ``<out>/predictions/<name>-<benchmark>.parquet`` (out: run/eval)."""
    out_dir = out or RunLayout(run).eval
    loaded = load_model(
        ModelSpec(arch=cfg.train.recipe.model, checkpoint=ckpt), device=cfg.evaluate.device
    )
    templates = templates_of(data)
    split, _, seed = name.partition("@s")
    doc: dict[str, Any] = {"split": split, "checkpoint": ckpt, "benchmarks": {}}
    if seed:
        doc["seed"] = int(seed)
    for bench in benchmarks:
        opened = open_benchmark(Path(data.benchmarks[bench]))
        res = evaluate_benchmark(loaded, opened, templates, cfg.evaluate.batch_size)
        res["classes"] = len(opened.classnames)  # chance = 1 / classes
        preds = res.pop("predictions")
        write_parquet(
            out_dir / "predictions" / f"{name}-{bench}.parquet",
            pa.table(
                {
                    "key": [p[0] for p in preds],
                    "label": [int(p[1]) for p in preds],
                    "pred": [int(p[2]) for p in preds],
                }
            ),
        )
        doc["benchmarks"][bench] = res
    # Seed 0 keeps eval/<split>.json; the other seeds sit in eval/seeds/ so readers of
    # eval/*.json still see one file per split.
    write_json(out_dir / ("seeds" if seed else "") / f"{name}.json", doc)
    return {b: r["top1"] for b, r in doc["benchmarks"].items()}


# ----------------------------------------------------------------------------- analysis


def composition_step(run: Path, data: Data, cfg: Config, specs: list[SplitSpec]) -> dict:
    """``analysis/composition.json``: what each split removed (select.composition)."""
    from simgap.select.composition import composition, scan_scores
    from simgap.world import pool_ground_truth

    layout = RunLayout(run)
    pool = run_store(run, "pool", data)
    splits = {
        s.name: (s.policy, s.benchmarks, lambda s=s: split_rows(pool, layout.split(s.name)))
        for s in specs
    }
    truth = None
    if cfg.sources.kind == "world":
        path = layout.world_truth("pool.parquet")
        truth = pq.read_table(path) if path.is_file() else pool_ground_truth(cfg.sources.world)
    out = composition(pool, splits, scan_scores(layout.pool_scan), truth)
    write_json(layout.composition, out)
    return {"splits": len(splits), "ground_truth": out["ground_truth"]}


def audit_step(run: Path, data: Data, cfg: Config, benchmarks: list[str], log: Log) -> dict:
    layout = RunLayout(run)
    tests = {b: run_store(run, bench_store_name(b), data) for b in benchmarks}
    truth_path = layout.world_truth("near_duplicates.parquet")
    truth = pq.read_table(truth_path) if cfg.sources.kind == "world" else None
    pool = run_store(run, "pool", data)
    a = cfg.analysis
    return audit_analysis(tests, pool, a.audit, a.audit_threshold, truth, layout.audit, log)


def train_similarity_model(
    run: Path, data: Data, cfg: Config, results: Results, log: Log
) -> dict[str, Any]:
    """The similarity model trained on the pool (similarity.train_on_pool)."""
    sim = cfg.similarity
    checkpoint = train(
        sim.recipe,
        pool_shards(data),
        pool_samples(data, results),
        RunLayout(run).models,
        "similarity",
        log,
        device=cfg.train.device,
        # It trains alone (no stage runs beside it): every core, not train.threads (the
        # setting for trainings side by side). 2 threads: 172 -> 106 ms a step at batch 128.
        threads=None,
    )
    return {"arch": sim.recipe.model, "checkpoint": str(checkpoint), "pretrained": None}


def embed_source(
    run: Path, name: str, source: str, r: Results, sim: Any, executor: Executor, log: Log
) -> int:
    from simgap.embed import embed

    m = r["similarity-model"]
    spec = ModelSpec(arch=m["arch"], checkpoint=m["checkpoint"], pretrained=m["pretrained"])
    store = embed(
        source, RunLayout(run).store(name), spec, executor, sim.device, sim.batch_size, progress=log
    )
    return store.manifest["rows"]


def separation_step(run: Path, data: Data, cfg: Config, bench: str) -> dict:
    """k-NN class separation of the similarity model on the ID benchmark (analysis/
    separation.json)."""
    classnames = list(open_benchmark(Path(data.benchmarks[bench])).classnames)
    return separation_analysis(
        run_store(run, "reference", data),
        run_store(run, bench_store_name(bench), data),
        classnames,
        bench,
        run,
        k=cfg.scan.topk,
        seed=cfg.seed,
    )


def sampling_of(cfg: Config) -> Sampling:
    """The settings the robustness and statistics analyses draw their intervals with."""
    a = cfg.analysis
    return Sampling(a.id_benchmark, cfg.train.seeds, a.bootstrap, cfg.seed)


def robustness_step(
    run: Path, cfg: Config, trained: list[str], evaluated: list[str], line: list[str]
) -> dict:
    """Effective robustness against the reference-line models, or the config's published
    points (analysis/robustness.json)."""
    points = reference_points_path(cfg) if cfg.analysis.reference_points else None
    return robustness_analysis(run, sampling_of(cfg), trained, evaluated, line, points)


def statistics_step(run: Path, cfg: Config, trained: list[str], evaluated: list[str]) -> dict:
    """Intervals, paired differences and the claims (analysis/statistics.json)."""
    return statistics_analysis(run, sampling_of(cfg), trained, evaluated)


def similarity_step(run: Path, cfg: Config, trained: list[str], evaluated: list[str]) -> dict:
    """Accuracy against NN similarity (analysis/accuracy_by_similarity.parquet)."""
    return similarity_analysis(run, trained, evaluated, cfg.analysis.bins)
