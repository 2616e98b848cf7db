"""Write the built-in world directory (layout: docs/CONTRACTS.md, "World directory").

The world mirrors the paper in miniature: a labelled `photo` reference set (ImageNet-train), a
captioned pool mixing every domain plus class-less images and planted near-duplicates of test
images (LAION), and six benchmarks, one per domain (ImageNet val, -V2, -Sketch, -R, -A, ObjectNet).

Every image is a pure function of (seed, part, index), every file is written atomically
(`simgap.io`: a temporary file, fsynced, renamed), and tars, JPEGs and parquet files carry no
timestamps: the same `WorldConfig` gives the same bytes.

This module runs the world: it checks the folder, hands the slices (pool shards in `pool`,
benchmarks and reference classes in `labelled`) to the Executor and writes world.json last;
`plan` decides what goes where and `render` draws the images.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from simgap.io import write_bytes
from simgap.parallel import Executor, LocalEngine
from simgap.types import Log
from simgap.world.labelled import lines_bytes, write_benchmark, write_reference_class
from simgap.world.plan import BENCHMARKS, WorldConfig, WorldPlan, world_plan
from simgap.world.pool import (
    POOL_TRUTH,
    write_near_duplicates,
    write_pool_shard,
    write_pool_truth,
)
from simgap.world.render import DOMAINS

GENERATOR_VERSION = "simgap-world/1"

TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a photo of the small {c}.",
    "a sketch of a {c}.",
    "a drawing of the {c}.",
    "a cartoon {c}.",
    "a painting of a {c}.",
    "a photo of a {c} in a cluttered scene.",
    "a rotated photo of the {c}.",
    "itap of a {c}.",
)

# Files and folders this module writes at the top of a world directory.
_OWNED = {
    "world.json",
    "classnames.txt",
    "templates.txt",
    "reference",
    "pool",
    "benchmarks",
    "ground_truth",
}


def _config_json(cfg: WorldConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _world_info(cfg: WorldConfig, plan: WorldPlan) -> dict:
    n_pool = len(plan.pool_kinds)
    kinds = sorted(set(plan.pool_kinds))
    return {
        "generator": GENERATOR_VERSION,
        "config": _config_json(cfg),
        "seed": cfg.seed,
        "scale": cfg.scale,
        "image_size": cfg.image_size,
        "n_classes": cfg.n_classes,
        "classnames": list(plan.classnames),
        "domains": list(DOMAINS),
        "templates": list(TEMPLATES),
        "benchmarks": {
            name: {
                "domain": name,
                "labels": list(plan.benchmark_labels[name]),
                "classnames": [plan.classnames[i] for i in plan.benchmark_labels[name]],
                "per_class": plan.benchmark_per_class,
                "count": len(plan.benchmark_labels[name]) * plan.benchmark_per_class,
            }
            for name in BENCHMARKS
        },
        "counts": {
            "reference": plan.reference_per_class * cfg.n_classes,
            "reference_per_class": plan.reference_per_class,
            "pool": n_pool,
            "pool_shards": -(-n_pool // cfg.shard_size),
            "pool_by_kind": {k: plan.pool_kinds.count(k) for k in kinds},
            "near_duplicates": len(plan.near_picks),
            "benchmarks": {
                name: len(plan.benchmark_labels[name]) * plan.benchmark_per_class
                for name in BENCHMARKS
            },
        },
    }


def _existing_world(cfg: WorldConfig, out: Path) -> dict | None:
    """The finished world already in `out` for this config, or None after clearing a partial one.

    Raises ValueError if `out` holds a world of another config or files this module did not
    write: those are never overwritten.
    """
    if not out.exists():
        return None
    info_path = out / "world.json"
    if info_path.exists():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("generator") == GENERATOR_VERSION and info.get("config") == _config_json(cfg):
            return info
        raise ValueError(
            f"{out} already holds a world with another config or generator "
            f"({info.get('generator')}, {info.get('config')}); choose another folder"
        )
    foreign = [
        p.name
        for p in out.iterdir()
        if p.name not in _OWNED and not (p.name.startswith(".") and ".tmp" in p.name)
    ]
    if foreign:
        raise ValueError(f"{out} is not empty and not a world folder (holds {sorted(foreign)[:5]})")
    # An interrupted earlier run (no world.json): its files may belong to another config.
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return None


@dataclass(frozen=True)
class WorldSlice:
    """One independent slice of the world (a reference class, a benchmark, a pool shard):
    picklable, so any engine of the Executor can run it."""

    cfg: WorldConfig
    out: str
    part: str
    arg: int | str


def write_slice(task: WorldSlice) -> str:
    """Write one slice; returns its progress line."""
    cfg, plan, out = task.cfg, world_plan(task.cfg), Path(task.out)
    if task.part == "reference":
        n = write_reference_class(cfg, plan, int(task.arg), out)
        return f"reference {plan.classnames[int(task.arg)]}: {n} images"
    if task.part == "benchmark":
        n = write_benchmark(cfg, plan, str(task.arg), out)
        return f"benchmark {task.arg}: {n} images"
    n = write_pool_shard(cfg, plan, int(task.arg), out)
    return f"pool shard {int(task.arg):05d}: {n} samples"


def generate_world(
    cfg: WorldConfig,
    out_dir: Path,
    progress: Log | None = None,
    workers: int = 1,
) -> dict:
    """Write the world of `cfg` into `out_dir` and return the content of its world.json.

    Idempotent: a folder that already holds this world is left as is. world.json is written
    last, so its presence marks a complete world. `workers` > 1 renders slices in that many
    processes (the Executor's local engine); the bytes written do not depend on it.
    """
    out = Path(out_dir)
    existing = _existing_world(cfg, out)
    if existing is not None:
        if not (out / "ground_truth" / POOL_TRUTH).is_file():
            write_pool_truth(cfg, out)  # a world written before this file existed
        if progress:
            progress(f"world already complete in {out}")
        return existing
    report = progress or (lambda _msg: None)
    plan = world_plan(cfg)
    n_pool = len(plan.pool_kinds)
    if (
        n_pool > 10**7
        or max(len(v) * plan.benchmark_per_class for v in plan.benchmark_labels.values()) > 10**5
        or plan.reference_per_class * cfg.n_classes > 10**7
    ):
        raise ValueError(f"scale {cfg.scale} exceeds the fixed key widths of the world layout")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pool").mkdir(exist_ok=True)
    write_bytes(out / "classnames.txt", lines_bytes(plan.classnames))
    write_bytes(out / "templates.txt", lines_bytes(TEMPLATES))

    # Biggest slices first, so a process pool ends evenly loaded.
    n_shards = -(-n_pool // cfg.shard_size)
    tasks = [WorldSlice(cfg, str(out), "pool", i) for i in range(n_shards)]
    tasks += [WorldSlice(cfg, str(out), "benchmark", name) for name in BENCHMARKS]
    tasks += [WorldSlice(cfg, str(out), "reference", label) for label in range(cfg.n_classes)]
    Executor(LocalEngine(workers)).map(write_slice, tasks, lambda _i, _n, message: report(message))
    write_near_duplicates(plan, out)
    write_pool_truth(cfg, out)

    info = _world_info(cfg, plan)
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_bytes(out / "world.json", text.encode("utf-8"))
    report(f"world written to {out}")
    return json.loads(text)
