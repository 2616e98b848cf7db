"""The captioned pool of the world (webdataset shards with parquet metadata) and its ground
truth: what each pool sample is, and which test image each planted near-duplicate copies."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
from PIL import Image

from simgap.data.tarwrite import tar_bytes
from simgap.io import write_bytes, write_parquet
from simgap.world.captions import caption_noise, clean_caption, pool_caption
from simgap.world.labelled import benchmark_image, jpeg_bytes
from simgap.world.plan import (
    DISTRACTOR,
    NEAR,
    PART_POOL,
    WorldConfig,
    WorldPlan,
    benchmark_key,
    part_rng,
    pool_key,
    world_plan,
)
from simgap.world.render import near_duplicate, render_distractor, render_image

# The world's parquet files were first written with pyarrow's default (snappy); keeping it keeps
# every world's bytes (and GENERATOR_VERSION) unchanged.
WORLD_PARQUET = "snappy"


def _pool_sample(cfg: WorldConfig, plan: WorldPlan, index: int) -> tuple[bytes, str, str, int]:
    """Pool sample `index` -> (jpeg bytes, caption, domain, label)."""
    kind = plan.pool_kinds[index]
    caption_rng = part_rng(cfg, PART_POOL, index, 1)
    if kind == NEAR:
        bench, test_index = plan.near_picks[index]
        label, test = benchmark_image(cfg, plan, bench, test_index)
        # Start from the test image as stored (JPEG-decoded), re-encode at another quality.
        stored = Image.open(io.BytesIO(jpeg_bytes(test, cfg.jpeg_quality))).convert("RGB")
        copy = near_duplicate(stored, part_rng(cfg, PART_POOL, index, 2))
        quality = int(part_rng(cfg, PART_POOL, index, 3).integers(70, 86))
        caption = clean_caption(bench, label, plan.classnames, caption_rng)
        return jpeg_bytes(copy, quality), caption, bench, label
    rng = part_rng(cfg, PART_POOL, index)
    if kind == DISTRACTOR:
        img = render_distractor(rng, cfg.image_size)
        caption = pool_caption(kind, -1, cfg, plan.classnames, caption_rng)
        return jpeg_bytes(img, cfg.jpeg_quality), caption, kind, -1
    label = int(rng.integers(cfg.n_classes))
    img = render_image(kind, label, rng, cfg.image_size)
    caption = pool_caption(kind, label, cfg, plan.classnames, caption_rng)
    return jpeg_bytes(img, cfg.jpeg_quality), caption, kind, label


def write_pool_shard(cfg: WorldConfig, plan: WorldPlan, shard: int, out: Path) -> int:
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
    write_parquet(out / "pool" / f"{shard:05d}.parquet", table, compression=WORLD_PARQUET)
    return stop - start


def write_near_duplicates(plan: WorldPlan, out: Path) -> None:
    slots = sorted(plan.near_picks)
    table = pa.table(
        {
            "pool_key": pa.array([pool_key(i) for i in slots], pa.string()),
            "benchmark": pa.array([plan.near_picks[i][0] for i in slots], pa.string()),
            "test_key": pa.array([benchmark_key(*plan.near_picks[i]) for i in slots], pa.string()),
        }
    )
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    write_parquet(
        out / "ground_truth" / "near_duplicates.parquet", table, compression=WORLD_PARQUET
    )


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
        if kind == NEAR:
            bench, test_index = plan.near_picks[index]
            label = plan.benchmark_labels[bench][test_index // plan.benchmark_per_class]
            row = (bench, label, "clean", benchmark_key(bench, test_index))
        elif kind == DISTRACTOR:
            row = (kind, -1, "distractor", None)
        else:
            label = int(part_rng(cfg, PART_POOL, index).integers(cfg.n_classes))
            noise = caption_noise(kind, part_rng(cfg, PART_POOL, index, 1).random(), cfg)
            row = (kind, label, noise, None)
        for col, value in zip(cols, (pool_key(index), kind, *row), strict=True):
            cols[col].append(value)
    types = {"label": pa.int64()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def write_pool_truth(cfg: WorldConfig, out: Path) -> None:
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    table = pool_ground_truth(cfg)
    write_parquet(out / "ground_truth" / POOL_TRUTH, table, compression=WORLD_PARQUET)
