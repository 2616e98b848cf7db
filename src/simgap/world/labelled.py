"""The labelled image folders of the world: the `photo` reference set and the six benchmarks."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from simgap.io import write_bytes
from simgap.world.plan import (
    BENCHMARKS,
    PART_BENCHMARK,
    PART_REFERENCE,
    WorldConfig,
    WorldPlan,
    benchmark_key,
    part_rng,
    reference_key,
)
from simgap.world.render import render_image


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def benchmark_image(
    cfg: WorldConfig, plan: WorldPlan, name: str, index: int
) -> tuple[int, Image.Image]:
    """Test image `index` of benchmark `name` (class-major order) and its global label."""
    label = plan.benchmark_labels[name][index // plan.benchmark_per_class]
    rng = part_rng(cfg, PART_BENCHMARK + BENCHMARKS.index(name), index)
    return label, render_image(name, label, rng, cfg.image_size)


def lines_bytes(items: Sequence[str]) -> bytes:
    return ("\n".join(items) + "\n").encode("utf-8")


def write_reference_class(cfg: WorldConfig, plan: WorldPlan, label: int, out: Path) -> int:
    folder = out / "reference" / plan.classnames[label]
    folder.mkdir(parents=True, exist_ok=True)
    start = label * plan.reference_per_class
    for index in range(start, start + plan.reference_per_class):
        img = render_image("photo", label, part_rng(cfg, PART_REFERENCE, index), cfg.image_size)
        write_bytes(folder / f"{reference_key(index)}.jpg", jpeg_bytes(img, cfg.jpeg_quality))
    return plan.reference_per_class


def write_benchmark(cfg: WorldConfig, plan: WorldPlan, name: str, out: Path) -> int:
    root = out / "benchmarks" / name
    labels = plan.benchmark_labels[name]
    for label in labels:
        (root / plan.classnames[label]).mkdir(parents=True, exist_ok=True)
    n = len(labels) * plan.benchmark_per_class
    for index in range(n):
        label, img = benchmark_image(cfg, plan, name, index)
        path = root / plan.classnames[label] / f"{benchmark_key(name, index)}.jpg"
        write_bytes(path, jpeg_bytes(img, cfg.jpeg_quality))
    write_bytes(root / "classnames.txt", lines_bytes([plan.classnames[i] for i in labels]))
    return n
