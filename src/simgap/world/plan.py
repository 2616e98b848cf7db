"""What goes where in the built-in world, from its config alone (no image drawn): the config,
the plan (classes, counts, pool kinds, planted near-duplicates), the random streams and the keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simgap.world.render import DOMAINS
from simgap.world.shapes import CLASSNAMES, MAX_CLASSES

BENCHMARKS: tuple[str, ...] = DOMAINS  # one benchmark per domain, named after it

# Seed-sequence tags that keep the random streams of the world's parts independent.
PART_REFERENCE = 1
PART_POOL = 2
_PART_POOL_PLAN = 3
_PART_SUBSETS = 4
_PART_NEAR_PICKS = 5
PART_BENCHMARK = 10  # + benchmark index

DISTRACTOR = "distractor"
NEAR = "near-duplicate"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world; equal configs give byte-identical worlds.

    Counts are given at scale 1 and multiplied by `scale` (at least 1 per class, 1 pool sample).
    """

    seed: int = 0
    scale: float = 1.0
    n_classes: int = 10
    image_size: int = 64
    shard_size: int = 500
    jpeg_quality: int = 90
    reference_per_class: int = 60
    pool_size: int = 4000
    benchmark_per_class: int = 30
    # Share of each kind of pool image (the near-duplicates come on top, out of the same total).
    pool_mix: tuple[tuple[str, float], ...] = (
        ("photo", 0.35),
        ("photo-v2", 0.10),
        ("sketch", 0.15),
        ("rendition", 0.15),
        ("hard", 0.10),
        ("pose", 0.10),
        (DISTRACTOR, 0.05),
    )
    near_duplicate_fraction: float = 0.02
    wrong_class_caption_fraction: float = 0.10
    no_class_caption_fraction: float = 0.10
    # Benchmarks that, like ImageNet-R / -A / ObjectNet, use only a share of the classes.
    class_subsets: tuple[tuple[str, float], ...] = (
        ("rendition", 0.7),
        ("hard", 0.7),
        ("pose", 0.8),
    )

    def __post_init__(self) -> None:
        # Normalise types so that configs read back from JSON/YAML (lists, ints for floats)
        # compare, hash and serialise exactly like the defaults.
        for name in (
            "seed",
            "n_classes",
            "image_size",
            "shard_size",
            "jpeg_quality",
            "reference_per_class",
            "pool_size",
            "benchmark_per_class",
        ):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in (
            "scale",
            "near_duplicate_fraction",
            "wrong_class_caption_fraction",
            "no_class_caption_fraction",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("pool_mix", "class_subsets"):
            pairs = tuple((str(k), float(w)) for k, w in getattr(self, name))
            object.__setattr__(self, name, pairs)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 2 <= self.n_classes <= MAX_CLASSES:
            raise ValueError(f"n_classes must be in 2..{MAX_CLASSES}, got {self.n_classes}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        kinds = {k for k, _ in self.pool_mix}
        weights = [w for _, w in self.pool_mix]
        if not kinds <= set(DOMAINS) | {DISTRACTOR} or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"pool_mix kinds must be among {DOMAINS + (DISTRACTOR,)}, weights >= 0"
            )
        if not {b for b, _ in self.class_subsets} <= set(BENCHMARKS):
            raise ValueError(f"class_subsets must name benchmarks among {BENCHMARKS}")


@dataclass(frozen=True)
class WorldPlan:
    """What goes where: derived from the config alone, before any image is drawn."""

    classnames: tuple[str, ...]
    reference_per_class: int
    benchmark_labels: dict[str, tuple[int, ...]]  # benchmark -> its classes (global labels)
    benchmark_per_class: int
    pool_kinds: tuple[str, ...]  # per pool index: a domain, "distractor" or "near-duplicate"
    near_picks: dict[int, tuple[str, int]]  # pool index -> (benchmark, test index)


def _scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder, ties to first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return [int(c) for c in counts]


def part_rng(cfg: WorldConfig, *tags: int) -> np.random.Generator:
    """The random stream of one part of the world (a `PART_*` tag and an index)."""
    return np.random.default_rng([cfg.seed, *tags])


def _class_subsets(cfg: WorldConfig) -> dict[str, tuple[int, ...]]:
    fractions = dict(cfg.class_subsets)
    subsets: dict[str, tuple[int, ...]] = {}
    for b, name in enumerate(BENCHMARKS):
        if name not in fractions:
            subsets[name] = tuple(range(cfg.n_classes))
            continue
        k = min(cfg.n_classes, max(2, round(fractions[name] * cfg.n_classes)))
        # Redraw while the subset repeats another one: the subset benchmarks should differ, as
        # ImageNet-R's and ImageNet-A's classes do. Bounded, since small worlds may have no choice.
        for attempt in range(100):
            rng = part_rng(cfg, _PART_SUBSETS, b, attempt)
            pick = tuple(sorted(int(i) for i in rng.choice(cfg.n_classes, k, replace=False)))
            if pick not in subsets.values() or k == cfg.n_classes:
                break
        subsets[name] = pick
    return subsets


@functools.lru_cache(maxsize=4)
def world_plan(cfg: WorldConfig) -> WorldPlan:
    """The world's classes, counts and assignments, from its config alone (no image drawn)."""
    subsets = _class_subsets(cfg)
    per_bench = _scaled(cfg.benchmark_per_class, cfg.scale)
    n_pool = _scaled(cfg.pool_size, cfg.scale)
    bench_sizes = {name: len(subsets[name]) * per_bench for name in BENCHMARKS}
    n_near = min(round(cfg.near_duplicate_fraction * n_pool), sum(bench_sizes.values()))
    kinds: list[str] = [NEAR] * n_near
    for (kind, _), n in zip(
        cfg.pool_mix, _allocate(n_pool - n_near, [w for _, w in cfg.pool_mix]), strict=True
    ):
        kinds += [kind] * n
    order = part_rng(cfg, _PART_POOL_PLAN).permutation(len(kinds))
    pool_kinds = tuple(kinds[i] for i in order)

    # Near-duplicates come from every benchmark in turn (round robin over those with unused
    # test images), distinct test images within each.
    per_bench_near = dict.fromkeys(BENCHMARKS, 0)
    for _ in range(n_near):
        open_benches = [b for b in BENCHMARKS if per_bench_near[b] < bench_sizes[b]]
        per_bench_near[min(open_benches, key=per_bench_near.__getitem__)] += 1
    near_rng = part_rng(cfg, _PART_NEAR_PICKS)
    picks: list[tuple[str, int]] = []
    for name, n in per_bench_near.items():
        chosen = near_rng.choice(bench_sizes[name], n, replace=False)
        picks += [(name, int(i)) for i in sorted(chosen)]
    near_rng.shuffle(picks)
    near_slots = [i for i, k in enumerate(pool_kinds) if k == NEAR]
    return WorldPlan(
        classnames=CLASSNAMES[: cfg.n_classes],
        reference_per_class=_scaled(cfg.reference_per_class, cfg.scale),
        benchmark_labels=subsets,
        benchmark_per_class=per_bench,
        pool_kinds=pool_kinds,
        near_picks=dict(zip(near_slots, picks, strict=True)),
    )


# --------------------------------------------------------------------------------------------
# Keys (pure)


def reference_key(index: int) -> str:
    return f"r{index:07d}"


def pool_key(index: int) -> str:
    return f"p{index:07d}"


def benchmark_key(name: str, index: int) -> str:
    return f"{name}-{index:05d}"
