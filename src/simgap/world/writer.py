"""Write the built-in world directory (layout: docs/CONTRACTS.md, "World directory").

The world mirrors the paper in miniature: a labelled `photo` reference set (ImageNet-train), a
captioned pool mixing every domain plus class-less images and planted near-duplicates of test
images (LAION), and six benchmarks, one per domain (ImageNet val, -V2, -Sketch, -R, -A, ObjectNet).

Every image is a pure function of (seed, part, index), every file is written atomically
(`simgap.io`: a temporary file, fsynced, renamed), and tars, JPEGs and parquet files carry no
timestamps: the same `WorldConfig` gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from simgap.data.tarwrite import tar_bytes
from simgap.io import write_bytes
from simgap.parallel import Executor, LocalEngine
from simgap.types import Log
from simgap.world.render import (
    CLASSNAMES,
    DOMAINS,
    MAX_CLASSES,
    near_duplicate,
    render_distractor,
    render_image,
)

GENERATOR_VERSION = "simgap-world/1"

BENCHMARKS: tuple[str, ...] = DOMAINS  # one benchmark per domain, named after it

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

# Seed-sequence tags that keep the random streams of the world's parts independent.
_PART_REFERENCE = 1
_PART_POOL = 2
_PART_POOL_PLAN = 3
_PART_SUBSETS = 4
_PART_NEAR_PICKS = 5
_PART_BENCHMARK = 10  # + benchmark index

_DISTRACTOR = "distractor"
_NEAR = "near-duplicate"

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
        (_DISTRACTOR, 0.05),
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
        if not kinds <= set(DOMAINS) | {_DISTRACTOR} or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"pool_mix kinds must be among {DOMAINS + (_DISTRACTOR,)}, weights >= 0"
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


def _rng(cfg: WorldConfig, *tags: int) -> np.random.Generator:
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
            rng = _rng(cfg, _PART_SUBSETS, b, attempt)
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
    kinds: list[str] = [_NEAR] * n_near
    for (kind, _), n in zip(
        cfg.pool_mix, _allocate(n_pool - n_near, [w for _, w in cfg.pool_mix]), strict=True
    ):
        kinds += [kind] * n
    order = _rng(cfg, _PART_POOL_PLAN).permutation(len(kinds))
    pool_kinds = tuple(kinds[i] for i in order)

    # Near-duplicates come from every benchmark in turn (round robin over those with unused
    # test images), distinct test images within each.
    per_bench_near = dict.fromkeys(BENCHMARKS, 0)
    for _ in range(n_near):
        open_benches = [b for b in BENCHMARKS if per_bench_near[b] < bench_sizes[b]]
        per_bench_near[min(open_benches, key=per_bench_near.__getitem__)] += 1
    near_rng = _rng(cfg, _PART_NEAR_PICKS)
    picks: list[tuple[str, int]] = []
    for name, n in per_bench_near.items():
        chosen = near_rng.choice(bench_sizes[name], n, replace=False)
        picks += [(name, int(i)) for i in sorted(chosen)]
    near_rng.shuffle(picks)
    near_slots = [i for i, k in enumerate(pool_kinds) if k == _NEAR]
    return WorldPlan(
        classnames=CLASSNAMES[: cfg.n_classes],
        reference_per_class=_scaled(cfg.reference_per_class, cfg.scale),
        benchmark_labels=subsets,
        benchmark_per_class=per_bench,
        pool_kinds=pool_kinds,
        near_picks=dict(zip(near_slots, picks, strict=True)),
    )


# --------------------------------------------------------------------------------------------
# Keys and images (pure)


def reference_key(index: int) -> str:
    return f"r{index:07d}"


def pool_key(index: int) -> str:
    return f"p{index:07d}"


def benchmark_key(name: str, index: int) -> str:
    return f"{name}-{index:05d}"


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _benchmark_image(
    cfg: WorldConfig, plan: WorldPlan, name: str, index: int
) -> tuple[int, Image.Image]:
    """Test image `index` of benchmark `name` (class-major order) and its global label."""
    label = plan.benchmark_labels[name][index // plan.benchmark_per_class]
    rng = _rng(cfg, _PART_BENCHMARK + BENCHMARKS.index(name), index)
    return label, render_image(name, label, rng, cfg.image_size)


# --------------------------------------------------------------------------------------------
# Captions (pure)

_STYLE_CAPTIONS: dict[str, tuple[str, ...]] = {
    "photo": (
        "a photo of a {c}",
        "photo of my {c} on the table",
        "{c} in the garden",
        "close-up of a {c}",
        "a {c} outside on a sunny day",
        "my new {c}",
        "a picture of a {c}",
        "the {c} we found today",
    ),
    "photo-v2": (
        "a photo of a {c} indoors",
        "{c}, evening light",
        "a dim photo of a {c}",
        "warm photo of the {c}",
        "snapshot of a {c}",
        "a {c} at home",
    ),
    "sketch": (
        "a sketch of a {c}",
        "pencil drawing of a {c}",
        "{c} line art",
        "hand drawn {c} doodle",
        "black and white sketch of a {c}",
        "how to draw a {c}",
    ),
    "rendition": (
        "cartoon {c} drawing",
        "a painting of a {c}",
        "{c} clipart",
        "colorful {c} illustration",
        "{c} sticker design",
        "cute cartoon {c}",
        "{c} icon vector art",
    ),
    "hard": (
        "a small {c} in a messy room",
        "cluttered desk with a {c}",
        "can you spot the {c}",
        "{c} among other things",
        "a {c} half hidden behind stuff",
        "junk pile with a {c}",
    ),
    "pose": (
        "upside down {c}",
        "a {c} lying on its side",
        "weird angle photo of a {c}",
        "tilted {c} on the floor",
        "{c} on my bed",
        "a {c} on the kitchen tiles",
    ),
}

_NO_CLASS_CAPTIONS: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of this thing", "untitled", "look what i found", "nice day outside"),
    "photo-v2": ("evening at home", "indoor shot", "untitled photo"),
    "sketch": ("pencil drawing", "my sketchbook page", "line art study"),
    "rendition": ("cartoon illustration", "colorful clipart", "sticker design"),
    "hard": ("my messy room", "so much stuff", "cluttered desk"),
    "pose": ("on the floor", "weird angle", "bedroom photo"),
}

_DISTRACTOR_CAPTIONS = (
    "abstract texture background",
    "seamless pattern wallpaper",
    "noise texture",
    "random stuff on the floor",
    "colorful abstract art",
    "doodles on paper",
    "fabric pattern",
    "background image",
)

_EXTRA_WORDS = (
    "free shipping",
    "stock image",
    "HD",
    "4k wallpaper",
    "best price",
    "#art",
    "2019",
    "for sale",
    "high quality",
    "download",
    "| pinterest",
    "new",
)


def _decorate(text: str, rng: np.random.Generator) -> str:
    """Web-caption noise: trailing junk words and inconsistent capitalisation."""
    n_extra = int(rng.choice([0, 0, 1, 2]))
    words = [text] + [str(w) for w in rng.choice(_EXTRA_WORDS, n_extra, replace=False)]
    text = " ".join(words)
    return text[:1].upper() + text[1:] if rng.random() < 0.5 else text


def _caption_noise(kind: str, u: float, cfg: WorldConfig) -> str:
    """Which caption a pool sample of ``kind`` gets, from its caption stream's first draw ``u``:
    ``clean`` (its class word), ``no-class``, ``wrong-class``, or ``distractor`` (no class)."""
    if kind == _DISTRACTOR:
        return "distractor"
    if u < cfg.no_class_caption_fraction:
        return "no-class"
    if u < cfg.no_class_caption_fraction + cfg.wrong_class_caption_fraction:
        return "wrong-class"
    return "clean"


def _caption(
    kind: str, label: int, cfg: WorldConfig, classnames: Sequence[str], rng: np.random.Generator
) -> str:
    """A noisy caption: style words of the domain, sometimes the wrong or no class word."""
    if kind == _DISTRACTOR:
        return _decorate(str(rng.choice(_DISTRACTOR_CAPTIONS)), rng)
    noise = _caption_noise(kind, rng.random(), cfg)
    if noise == "no-class":
        return _decorate(str(rng.choice(_NO_CLASS_CAPTIONS[kind])), rng)
    word = classnames[label]
    if noise == "wrong-class":
        other = int(rng.integers(len(classnames) - 1))
        word = classnames[other + (other >= label)]
    return _decorate(str(rng.choice(_STYLE_CAPTIONS[kind])).format(c=word), rng)


def _clean_caption(
    kind: str, label: int, classnames: Sequence[str], rng: np.random.Generator
) -> str:
    return _decorate(str(rng.choice(_STYLE_CAPTIONS[kind])).format(c=classnames[label]), rng)


# --------------------------------------------------------------------------------------------
# File writing


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _lines(items: Sequence[str]) -> bytes:
    return ("\n".join(items) + "\n").encode("utf-8")


def _write_reference_class(cfg: WorldConfig, plan: WorldPlan, label: int, out: Path) -> int:
    folder = out / "reference" / plan.classnames[label]
    folder.mkdir(parents=True, exist_ok=True)
    start = label * plan.reference_per_class
    for index in range(start, start + plan.reference_per_class):
        img = render_image("photo", label, _rng(cfg, _PART_REFERENCE, index), cfg.image_size)
        write_bytes(folder / f"{reference_key(index)}.jpg", _jpeg(img, cfg.jpeg_quality))
    return plan.reference_per_class


def _write_benchmark(cfg: WorldConfig, plan: WorldPlan, name: str, out: Path) -> int:
    root = out / "benchmarks" / name
    labels = plan.benchmark_labels[name]
    for label in labels:
        (root / plan.classnames[label]).mkdir(parents=True, exist_ok=True)
    n = len(labels) * plan.benchmark_per_class
    for index in range(n):
        label, img = _benchmark_image(cfg, plan, name, index)
        path = root / plan.classnames[label] / f"{benchmark_key(name, index)}.jpg"
        write_bytes(path, _jpeg(img, cfg.jpeg_quality))
    write_bytes(root / "classnames.txt", _lines([plan.classnames[i] for i in labels]))
    return n


def _pool_sample(cfg: WorldConfig, plan: WorldPlan, index: int) -> tuple[bytes, str, str, int]:
    """Pool sample `index` -> (jpeg bytes, caption, domain, label)."""
    kind = plan.pool_kinds[index]
    caption_rng = _rng(cfg, _PART_POOL, index, 1)
    if kind == _NEAR:
        bench, test_index = plan.near_picks[index]
        label, test = _benchmark_image(cfg, plan, bench, test_index)
        # Start from the test image as stored (JPEG-decoded), re-encode at another quality.
        stored = Image.open(io.BytesIO(_jpeg(test, cfg.jpeg_quality))).convert("RGB")
        copy = near_duplicate(stored, _rng(cfg, _PART_POOL, index, 2))
        quality = int(_rng(cfg, _PART_POOL, index, 3).integers(70, 86))
        caption = _clean_caption(bench, label, plan.classnames, caption_rng)
        return _jpeg(copy, quality), caption, bench, label
    rng = _rng(cfg, _PART_POOL, index)
    if kind == _DISTRACTOR:
        img = render_distractor(rng, cfg.image_size)
        caption = _caption(kind, -1, cfg, plan.classnames, caption_rng)
        return _jpeg(img, cfg.jpeg_quality), caption, kind, -1
    label = int(rng.integers(cfg.n_classes))
    img = render_image(kind, label, rng, cfg.image_size)
    caption = _caption(kind, label, cfg, plan.classnames, caption_rng)
    return _jpeg(img, cfg.jpeg_quality), caption, kind, label


def _write_pool_shard(cfg: WorldConfig, plan: WorldPlan, shard: int, out: Path) -> int:
    start = shard * cfg.shard_size
    stop = min(start + cfg.shard_size, len(plan.pool_kinds))
    members: list[tuple[str, bytes]] = []
    rows: dict[str, list] = {"key": [], "caption": [], "domain": [], "label": [], "status": []}
    for index in range(start, stop):
        key = pool_key(index)
        jpg, caption, domain, label = _pool_sample(cfg, plan, index)
        meta = {
            "key": key,
            "caption": caption,
            "domain": domain,
            "label": label,
            "width": cfg.image_size,
            "height": cfg.image_size,
            "status": "success",
        }
        members += [
            (f"{key}.jpg", jpg),
            (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")),
            (f"{key}.txt", caption.encode("utf-8")),
        ]
        for col, value in zip(rows, (key, caption, domain, label, "success"), strict=True):
            rows[col].append(value)
    table = pa.table(
        {
            "key": pa.array(rows["key"], pa.string()),
            "caption": pa.array(rows["caption"], pa.string()),
            "domain": pa.array(rows["domain"], pa.string()),
            "label": pa.array(rows["label"], pa.int64()),
            "status": pa.array(rows["status"], pa.string()),
        }
    )
    write_bytes(out / "pool" / f"{shard:05d}.tar", tar_bytes(sorted(members)))
    write_bytes(out / "pool" / f"{shard:05d}.parquet", _parquet_bytes(table))
    return stop - start


def _write_near_duplicates(plan: WorldPlan, out: Path) -> None:
    slots = sorted(plan.near_picks)
    table = pa.table(
        {
            "pool_key": pa.array([pool_key(i) for i in slots], pa.string()),
            "benchmark": pa.array([plan.near_picks[i][0] for i in slots], pa.string()),
            "test_key": pa.array([benchmark_key(*plan.near_picks[i]) for i in slots], pa.string()),
        }
    )
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    write_bytes(out / "ground_truth" / "near_duplicates.parquet", _parquet_bytes(table))


POOL_TRUTH = "pool.parquet"  # in ground_truth/: what each pool sample is


def pool_ground_truth(cfg: WorldConfig) -> pa.Table:
    """What each pool sample is, drawn from the same random streams as its image and caption
    (without rendering either): ``kind`` (its domain, ``distractor`` or ``near-duplicate``),
    ``domain`` (a near-duplicate's: the benchmark it copies), ``label`` (-1: no class),
    ``caption`` (``clean``, ``no-class``, ``wrong-class``, ``distractor``; a near-duplicate's
    caption is clean) and, for a near-duplicate, the benchmark test image it copies."""
    plan = world_plan(cfg)
    cols: dict[str, list] = {k: [] for k in ("key", "kind", "domain", "label", "caption", "copy")}
    for index, kind in enumerate(plan.pool_kinds):
        if kind == _NEAR:
            bench, test_index = plan.near_picks[index]
            label = plan.benchmark_labels[bench][test_index // plan.benchmark_per_class]
            row = (bench, label, "clean", benchmark_key(bench, test_index))
        elif kind == _DISTRACTOR:
            row = (kind, -1, "distractor", None)
        else:
            label = int(_rng(cfg, _PART_POOL, index).integers(cfg.n_classes))
            noise = _caption_noise(kind, _rng(cfg, _PART_POOL, index, 1).random(), cfg)
            row = (kind, label, noise, None)
        for col, value in zip(cols, (pool_key(index), kind, *row), strict=True):
            cols[col].append(value)
    types = {"label": pa.int64()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def _write_pool_truth(cfg: WorldConfig, out: Path) -> None:
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    table = pool_ground_truth(cfg)
    write_bytes(out / "ground_truth" / POOL_TRUTH, _parquet_bytes(table))


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
        n = _write_reference_class(cfg, plan, int(task.arg), out)
        return f"reference {plan.classnames[int(task.arg)]}: {n} images"
    if task.part == "benchmark":
        n = _write_benchmark(cfg, plan, str(task.arg), out)
        return f"benchmark {task.arg}: {n} images"
    n = _write_pool_shard(cfg, plan, int(task.arg), out)
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
            _write_pool_truth(cfg, out)  # a world written before this file existed
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
    write_bytes(out / "classnames.txt", _lines(plan.classnames))
    write_bytes(out / "templates.txt", _lines(TEMPLATES))

    # Biggest slices first, so a process pool ends evenly loaded.
    n_shards = -(-n_pool // cfg.shard_size)
    tasks = [WorldSlice(cfg, str(out), "pool", i) for i in range(n_shards)]
    tasks += [WorldSlice(cfg, str(out), "benchmark", name) for name in BENCHMARKS]
    tasks += [WorldSlice(cfg, str(out), "reference", label) for label in range(cfg.n_classes)]
    Executor(LocalEngine(workers)).map(write_slice, tasks, lambda _i, _n, message: report(message))
    _write_near_duplicates(plan, out)
    _write_pool_truth(cfg, out)

    info = _world_info(cfg, plan)
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_bytes(out / "world.json", text.encode("utf-8"))
    report(f"world written to {out}")
    return json.loads(text)
