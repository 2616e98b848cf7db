"""The paper's experiment as cached stages: world → similarity model → embed → scan → select →
materialize → train → evaluate → report.

Each stage's result is cached in ``stages/<name>.json`` under a key of its inputs (its config plus
the keys of the stages it reads); a rerun skips stages whose key is unchanged and redoes the
rest, so a killed run resumes where it stopped and a changed knob redoes only what depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simgap import __version__
from simgap.data.sources import read_classnames
from simgap.embed import embed
from simgap.evaluate import evaluate_benchmark
from simgap.io import read_json, write_json, write_npy, write_parquet
from simgap.models import ModelSpec, load_model
from simgap.parallel import Executor, make_engine
from simgap.report import build_report
from simgap.scan import load_scan, scan_store
from simgap.select import far_pruned, gapmatch, random_split, union_score
from simgap.splits import materialize, write_split
from simgap.store import Store, check_compatible, open_store
from simgap.train import Recipe, train
from simgap.world import BENCHMARKS, WorldConfig, generate_world

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExperimentConfig:
    world: WorldConfig = WorldConfig()
    similarity_recipe: Recipe = Recipe(epochs=5, lr=1e-3)
    train_recipe: Recipe = Recipe(epochs=5, lr=1e-3)
    # Splits trained and evaluated; every split is built, sized and plotted regardless.
    train_splits: tuple[str, ...] = ("full", "combined", "combined-random", "coreset")
    coreset_fraction: float = 0.5
    reference_caption: str = "a photo of a {c}"
    topk: int = 10
    seed: int = 0
    engine: str = "local"
    workers: int = 1
    train_parallel: int = 2  # trainings run side by side
    train_threads: int | None = 1  # CPU threads per training process (None: torch's default)
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs stages with caching; records each stage's key, result and wall time."""

    def __init__(self, run_dir: Path, log: Log):
        self.dir = Path(run_dir)
        self.log = log
        self.timings: dict[str, float] = {}
        self.keys: dict[str, str] = {}

    def stage(
        self, name: str, inputs: Any, fn: Callable[[], Any], after: tuple[str, ...] = ()
    ) -> Any:
        key = _key(inputs, [self.keys[a] for a in after])
        path = self.dir / "stages" / f"{name}.json"
        if path.exists():
            cached = read_json(path)
            if cached.get("key") == key:
                self.keys[name] = key
                self.timings[name] = cached["seconds"]
                self.log(f"[cached] {name}")
                return cached["result"]
        self.log(f"[run] {name}")
        start = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - start, 3)
        write_json(path, {"key": key, "result": result, "seconds": seconds})
        self.keys[name] = key
        self.timings[name] = seconds
        self.log(f"[done] {name} in {seconds:.1f}s")
        return result


def _benchmarks(world: Path) -> list[str]:
    """The world's benchmarks in the paper's order (ImageNet val, V2, Sketch, R, A, ObjectNet)."""
    present = read_json(world / "world.json")["benchmarks"]
    return [b for b in BENCHMARKS if b in present]


def _pool_pattern(world: Path) -> str:
    return "::".join(str(p) for p in sorted((world / "pool").glob("*.tar")))


def _test_embeddings(run: Path, bench: str) -> tuple[Store, np.ndarray]:
    store = open_store(run / "stores" / f"bench-{bench}")
    return store, store.embeddings()


def scan_benchmarks(run: Path, benchmarks: list[str], topk: int, log: Log) -> dict[str, Any]:
    """Per benchmark: thresholds (NN similarity to the reference set), then the pool scanned
    against them (per-row max and margin, per-test pool NN)."""
    reference, pool = open_store(run / "stores" / "reference"), open_store(run / "stores" / "pool")
    removed = {}
    for bench in benchmarks:
        tests_store, tests = _test_embeddings(run, bench)
        check_compatible(reference, pool, tests_store)
        ref = scan_store(reference, tests, topk=topk, out_dir=run / "scans" / f"reference-{bench}")
        thresholds = ref.topk_sim[:, 0].copy()
        res = scan_store(
            pool, tests, thresholds=thresholds, topk=topk, out_dir=run / "scans" / f"pool-{bench}"
        )
        removed[bench] = int((res.row_margin > 0).sum())
        log(f"scan {bench}: {len(tests)} tests, {removed[bench]} pool rows above threshold")
    return {"removed": removed}


def _split_meta(name: str, policy: str, benchmarks: list[str], **params: Any) -> dict[str, Any]:
    return {"name": name, "policy": policy, "benchmarks": benchmarks, "params": params}


def select_splits(
    run: Path, benchmarks: list[str], coreset_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Every split of the demo: gap-matched per benchmark and combined, a size-matched random
    control for each, the far-pruned coreset, and the full pool. The reference set is added to
    every split when it is trained (the paper's setting)."""
    pool = open_store(run / "stores" / "pool")
    keys = np.array(pool.keys(), dtype=object)
    scans = {b: load_scan(run / "scans" / f"pool-{b}") for b in benchmarks}
    masks: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    masks["full"] = (np.ones(len(keys), bool), _split_meta("full", "full", []))
    for b in benchmarks:
        masks[b] = (gapmatch([scans[b].row_margin]), _split_meta(b, "gapmatch", [b]))
    masks["combined"] = (
        gapmatch([scans[b].row_margin for b in benchmarks]),
        _split_meta("combined", "gapmatch", benchmarks),
    )
    n_core = int(round(coreset_fraction * len(keys)))
    score = union_score([scans[b].row_max for b in benchmarks])
    masks["coreset"] = (
        far_pruned(score, n_core),
        _split_meta("coreset", "far", benchmarks, fraction=coreset_fraction),
    )
    for i, name in enumerate([*benchmarks, "combined", "coreset"]):
        mask, _ = masks[name]
        control_seed = seed + 1 + i
        masks[f"{name}-random"] = (
            random_split(len(keys), int(mask.sum()), control_seed),
            {
                **_split_meta(f"{name}-random", "random", [], seed=control_seed),
                "control_of": name,
            },
        )
    # Every split is made from the same inputs: fingerprint them once.
    fingerprints = {
        "pool": _key(pool.manifest),
        "scans": {
            b: _key(read_json(run / "scans" / f"pool-{b}" / "scan.json")) for b in benchmarks
        },
    }
    splits = []
    for name, (mask, meta) in masks.items():
        meta = {"control_of": None, **meta, "pool_size": len(keys), "reference_added": True}
        meta["fingerprints"] = fingerprints
        splits.append(write_split(run / "splits" / name, list(keys[mask]), meta))
        write_npy(run / "splits" / name / "mask.npy", mask)
    return splits


def check_and_gaps(run: Path, benchmarks: list[str], splits: list[str]) -> dict[str, Any]:
    """Rescan each split against each benchmark: the split's NN similarity per test point (the gap
    figure) and the gap-matching guarantee, checked rather than assumed."""
    pool = open_store(run / "stores" / "pool")
    results: dict[str, Any] = {}
    for bench in benchmarks:
        tests_store, tests = _test_embeddings(run, bench)
        thresholds = load_scan(run / "scans" / f"reference-{bench}").topk_sim[:, 0]
        pool_nn = load_scan(run / "scans" / f"pool-{bench}").topk_sim[:, 0]
        table = tests_store.keys_table()
        columns = {
            "test_key": table.column("key"),
            "label": table.column("label"),
            "reference": pa.array(thresholds, pa.float32()),
            "pool": pa.array(pool_nn, pa.float32()),
        }
        for name in splits:
            mask = np.load(run / "splits" / name / "mask.npy")
            kept_nn = _masked_nn(pool, tests, mask)
            # The pool part only: with the reference set added, the split's NN similarity is
            # max(reference, this), which for a gap-matched split is the reference exactly.
            columns[name] = pa.array(kept_nn, pa.float32())
            meta = read_json(run / "splits" / name / "split.json")
            if meta["policy"] == "gapmatch" and bench in meta["benchmarks"]:
                violations = int((kept_nn > thresholds).sum())
                results.setdefault(name, {"violations": 0, "tests": 0})
                results[name]["violations"] += violations
                results[name]["tests"] += len(tests)
        write_parquet(run / "gaps" / f"{bench}.parquet", pa.table(columns))
    for name, check in results.items():
        meta_path = run / "splits" / name / "split.json"
        meta = read_json(meta_path)
        meta["guarantee"] = {**check, "holds": check["violations"] == 0}
        write_json(meta_path, meta)
        if check["violations"]:
            raise RuntimeError(
                f"split {name}: {check['violations']} test points have a pool neighbour above "
                "their threshold; the gap-matching guarantee does not hold"
            )
    return results


def _masked_nn(pool: Store, tests: np.ndarray, mask: np.ndarray) -> np.ndarray:
    offsets = {s.name: (s.offset, s.rows) for s in pool.shards}

    def keep(shard: str) -> np.ndarray:
        start, rows = offsets[shard]
        return mask[start : start + rows]

    if not mask.any():
        return np.full(len(tests), -np.inf, np.float32)
    return scan_store(pool, tests, topk=1, keep=keep).topk_sim[:, 0]


def evaluate_split(run: Path, world: Path, split: str, recipe: Recipe, ckpt: str) -> dict:
    loaded = load_model(ModelSpec(arch=recipe.model, checkpoint=ckpt))
    templates = [t for t in (world / "templates.txt").read_text().splitlines() if t.strip()]
    out = {"split": split, "checkpoint": ckpt, "benchmarks": {}}
    for bench in _benchmarks(world):
        res = evaluate_benchmark(loaded, world / "benchmarks" / bench, templates)
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
    return out


def run_experiment(run_dir: Path, cfg: ExperimentConfig, log: Log = print) -> dict[str, Any]:
    run = Path(run_dir)
    if run.is_dir() and any(run.iterdir()) and not (run / "stages").is_dir():
        # Resuming writes into the folder: never mix a run into someone else's files.
        raise ValueError(f"{run}: folder is not empty and is not a simgap run; choose another")
    run.mkdir(parents=True, exist_ok=True)
    r = Runner(run, log)
    world = run / "world"
    executor = Executor(make_engine(cfg.engine, cfg.workers))

    info = r.stage("world", cfg.section("world"), lambda: generate_world(cfg.world, world, log))
    benchmarks = _benchmarks(world)
    pool_samples = info["counts"]["pool"]

    sim_ckpt = r.stage(
        "similarity-model",
        cfg.section("similarity_recipe"),
        lambda: str(
            train(
                cfg.similarity_recipe,
                _pool_pattern(world),
                pool_samples,
                run / "models",
                "similarity",
                log,
                threads=cfg.train_threads,
            )
        ),
        after=("world",),
    )
    spec = ModelSpec(arch=cfg.similarity_recipe.model, checkpoint=sim_ckpt)
    sources = {"reference": world / "reference", "pool": world / "pool"}
    sources |= {f"bench-{b}": world / "benchmarks" / b for b in benchmarks}
    for name, source in sources.items():
        r.stage(
            f"embed-{name}",
            {"source": str(source)},
            lambda name=name, source=source: embed(
                source,
                run / "stores" / name,
                spec,
                executor,
                cfg.device,
                progress=log,
            ).manifest["rows"],
            after=("similarity-model",),
        )
    embeds = tuple(f"embed-{n}" for n in sources)
    r.stage(
        "scan",
        {"topk": cfg.topk},
        lambda: scan_benchmarks(run, benchmarks, cfg.topk, log),
        after=embeds,
    )
    made = r.stage(
        "select",
        {"coreset_fraction": cfg.coreset_fraction, "seed": cfg.seed},
        lambda: select_splits(run, benchmarks, cfg.coreset_fraction, cfg.seed),
        after=("scan",),
    )
    # A list, not a dict: the cache stores JSON with sorted keys, and split order is shown.
    splits = {meta["name"]: meta for meta in made}
    r.stage(
        "gaps",
        list(splits),
        lambda: check_and_gaps(run, benchmarks, list(splits)),  # the order select made them in
        after=("select",),
    )

    unknown = [s for s in cfg.train_splits if s not in splits]
    if unknown:
        raise ValueError(f"train_splits names {unknown}, which are not splits: {list(splits)}")

    def train_and_evaluate(split: str) -> None:
        shards = r.stage(
            f"materialize-{split}",
            {"caption": cfg.reference_caption},
            lambda: materialize(
                run / "splits" / split,
                _pool_pattern(world),
                run / "shards" / split,
                reference=world / "reference",
                caption_template=cfg.reference_caption,
                executor=executor,
            ),
            after=("select",),
        )
        ckpt = r.stage(
            f"train-{split}",
            cfg.section("train_recipe"),
            lambda: str(
                train(
                    cfg.train_recipe,
                    shards["shards"],
                    shards["samples"],
                    run / "train",
                    split,
                    lambda m: log(f"[{split}] {m}"),
                    threads=cfg.train_threads,
                )
            ),
            after=(f"materialize-{split}",),
        )
        r.stage(
            f"evaluate-{split}",
            {},
            lambda: evaluate_split(run, world, split, cfg.train_recipe, ckpt),
            after=(f"train-{split}",),
        )

    # Each training is its own process: on a small machine, several single-threaded trainings
    # side by side use the cores better than one multi-threaded training of a tiny model.
    with ThreadPoolExecutor(max(1, cfg.train_parallel)) as pool:
        list(pool.map(train_and_evaluate, cfg.train_splits))

    write_json(
        run / "run.json",
        {
            "config": {
                **json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                "benchmarks": benchmarks,
            },
            "versions": _versions(),
            "timings": r.timings,
            "world": info,
        },
    )
    paths = {k: str(v) for k, v in build_report(run).items()}
    return {"timings": r.timings, "report": paths, "splits": splits}


def _versions() -> dict[str, str]:
    import open_clip
    import torch

    return {
        "simgap": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
    }


__all__ = ["ExperimentConfig", "Runner", "run_experiment", "read_classnames"]
