"""What ``simgap run CONFIG --dry-run`` says about the scanning stages before anything runs: per
stage the passes over the pool, the GEMM work, and a time estimate for the configured device.

Sizes come from the run's stores where they exist, else from the world's config, else (real
sources not yet embedded) from the paper's setup: a 2x10^8 pool, ImageNet-train and the six
benchmarks' published sizes. Rates are stated with their source in every printout; a CUDA rate is
a projection, never a measurement, until ``benchmarks/scan.py --device cuda`` has been run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from simgap.experiment.config import Config
from simgap.experiment.specs import SplitSpec, benchmarks_of
from simgap.io import read_json
from simgap.layout import RunLayout, bench_store_name

# Published test-set sizes of the paper's benchmarks, and ImageNet-train (the reference set).
PAPER_TESTS = {
    "imagenet-val": 50_000,
    "imagenet-v2": 10_000,
    "imagenet-sketch": 50_889,
    "imagenet-r": 30_000,
    "imagenet-a": 7_500,
    "objectnet": 18_574,
}
PAPER_REFERENCE = 1_281_167
PAPER_POOL = 200_000_000  # LAION-200M, the paper's pool


@dataclass(frozen=True)
class Rates:
    """Per device (one GPU, or this CPU): the scan's effective GEMM rate and the read rate."""

    scan_tflops: float
    read_gbs: float
    source: str
    embed_images_s: float
    embed_source: str


RATES = {
    "cpu": Rates(
        0.039,
        0.5,
        "measured: benchmarks/scan.py on the 2-core AVX2 development machine, scan_gflops 39.2 "
        "at 1M x 512 x 8,192 tests (README); read rate assumed",
        2065.0,
        "measured for simgap-tiny only: benchmarks/embed.py on the development machine",
    ),
    "cuda": Rates(
        485.0,
        2.0,
        "projected, not measured: 0.7 (the target of benchmarks/scan.py's ratio_vs_bf16_matmul)"
        " x 0.7 x 989 TFLOP/s (H100 SXM dense bf16 datasheet peak; a large torch bf16 GEMM "
        "reaches ~70 % of it); 2 GB/s read per GPU task from shared storage (assumed)",
        2500.0,
        "projected: 2,500 images/s per GPU, the best published clip-retrieval figure (ViT-B/32); "
        "a ViT-B/16+ at 240 px is slower",
    ),
}


@dataclass(frozen=True)
class Sizes:
    pool: int
    reference: int
    tests: int
    dim: int
    source: str


def sizes_of(cfg: Config, run: Path) -> Sizes | None:
    """Rows of the pool, the reference set and all benchmarks' tests, and the embedding dim."""
    layout = RunLayout(run)
    names = ["pool", "reference", *(bench_store_name(b) for b in benchmarks_of(cfg))]
    manifests = [layout.store(n) / "manifest.json" for n in names]
    if all(m.is_file() for m in manifests):
        docs = [read_json(m) for m in manifests]
        rows = [int(d["rows"]) for d in docs]
        return Sizes(rows[0], rows[1], sum(rows[2:]), int(docs[0]["dim"]), "the run's stores")
    dim = _dim(cfg.similarity.model)
    if cfg.sources.kind == "world":
        from simgap.world.plan import world_plan  # the world's counts, from its config alone

        w = cfg.sources.world
        plan = world_plan(w)
        tests = sum(len(c) * plan.benchmark_per_class for c in plan.benchmark_labels.values())
        reference = plan.reference_per_class * len(plan.classnames)
        return Sizes(len(plan.pool_kinds), reference, tests, dim, "the world's config")
    known = [PAPER_TESTS.get(b) for b in benchmarks_of(cfg)]
    if None in known:
        return None
    return Sizes(PAPER_POOL, PAPER_REFERENCE, sum(known), dim, "the paper's setup (assumed)")


def _dim(model: str) -> int:
    try:
        import open_clip

        return int(open_clip.get_model_config(model)["embed_dim"])
    except Exception:  # noqa: BLE001 - an unknown or local-dir model: assume CLIP's 512
        return 512


def kept_fraction(spec: SplitSpec, specs: dict[str, SplitSpec]) -> float:
    """The pool fraction a split keeps, known before it is made; at most 1 (gap-matched and
    dedup splits depend on the data: their upper bound)."""
    if spec.control_of:
        return kept_fraction(specs[spec.control_of], specs)
    return float(spec.params.get("fraction", 1.0))


def scan_lines(cfg: Config, run: Path, splits: list[SplitSpec], stages: list[str]) -> list[str]:
    """Per scanning stage: passes over the pool, work and time on ``[scan].device``."""
    kind = "cuda" if cfg.scan.device.startswith("cuda") else "cpu"
    rates = RATES[kind]
    sizes = sizes_of(cfg, run)
    by_name = {s.name: s for s in splits}
    work = sum(kept_fraction(s, by_name) for s in splits)  # check pass, in pool-equivalents
    lines = [f"scanning on {cfg.scan.device} ({kind} rates: {rates.source}):"]
    if sizes is None:
        lines.append("  sizes unknown (a benchmark outside the paper's six): passes only")
        lines.append("  scan: 1 pass over the reference set, 1 over the pool")
        lines.append(f"  gaps: 1 pass over the pool ({len(splits)} splits at once)")
        return lines
    pool_bytes = sizes.pool * sizes.dim * 2
    lines.append(
        f"  sizes from {sizes.source}: pool {sizes.pool:,} rows, reference {sizes.reference:,}, "
        f"{sizes.tests:,} test points, d={sizes.dim}; one pass reads {pool_bytes / 1e9:,.1f} GB"
    )
    ref_flop = 2.0 * sizes.reference * sizes.tests * sizes.dim
    pool_flop = 2.0 * sizes.pool * sizes.tests * sizes.dim
    scan_s = _seconds(ref_flop + pool_flop, sizes.reference * sizes.dim * 2 + pool_bytes, rates)
    lines.append(
        f"  scan: 1 pass over the reference set + 1 over the pool (every benchmark at once), "
        f"{_flop(ref_flop + pool_flop)}: {_human(scan_s)} on one {kind} device"
    )
    check_flop = work * pool_flop
    check_s = _seconds(check_flop, pool_bytes, rates)
    lines.append(
        f"  gaps: 1 pass over the pool checking {len(splits)} splits at once; GEMM work "
        f"{work:.1f} pool-equivalents (the splits' kept fractions, gap-matched and dedup splits "
        f"counted as 1: an upper bound), {_flop(check_flop)}: "
        f"{_human(check_s)} on one {kind} device"
    )
    if "embed-pool" in stages:
        embed_s = sizes.pool / rates.embed_images_s
        lines.append(
            f"  embed-pool: 1 pass over the pool's images: {_human(embed_s)} on one {kind} "
            f"device ({rates.embed_source})"
        )
    lines.append(
        "  select: no pass over the pool (splits come from the scan's per-row outputs); "
        "semdedup / image-based: k-means over the pool's embeddings"
    )
    return lines


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x / 1e6:,.1f} MFLOP"


def _seconds(flop: float, read_bytes: float, rates: Rates) -> float:
    # Reading and computing overlap (the scan prefetches): the slower one sets the time.
    return max(flop / (rates.scan_tflops * 1e12), read_bytes / (rates.read_gbs * 1e9))


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"~{math.ceil(seconds)} s"
    if seconds < 2 * 3600:
        return f"~{seconds / 60:,.0f} min"
    return f"~{seconds / 3600:,.1f} h"
