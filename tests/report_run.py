"""A small but complete run directory for the report tests: every file the report reads
(docs/CONTRACTS.md "Run directory" + this session's run-layout additions), written with the
project's real writers (StoreWriter, the scan front-end, parquet) and real images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from simgap.experiment import config
from simgap.scan.run import scan_benchmarks
from simgap.store import StoreWriter

BENCHMARKS = ("photo", "sketch", "rendition")
POOL_SIZE = 10_000
FRACTIONS = (0.25, 0.5)
# split -> (policy, benchmarks, size, control_of, params)
SPLITS = {
    "full": ("full", [], POOL_SIZE, None, {}),
    "combined": ("gapmatch", list(BENCHMARKS), 8_400, None, {}),
    "sketch": ("gapmatch", ["sketch"], 9_200, None, {}),
    "sketch-random": ("random", [], 9_200, "sketch", {"seed": 0}),
    **{
        f"{policy}-{f}": (policy, list(BENCHMARKS), int(f * POOL_SIZE), None, {"fraction": f})
        for policy in ("near", "far", "random")
        for f in FRACTIONS
    },
}
# split -> benchmark -> top-1; "combined" is not evaluated.
TOP1 = {
    "full": {"photo": 0.50, "sketch": 0.40, "rendition": 0.60},
    "sketch": {"photo": 0.4321, "sketch": 0.3012, "rendition": 0.5550},
    "sketch-random": {"photo": 0.4100, "sketch": 0.3500, "rendition": 0.5000},
    "near-0.25": {"photo": 0.45, "sketch": 0.36, "rendition": 0.52},
    "near-0.5": {"photo": 0.48, "sketch": 0.38, "rendition": 0.57},
    "far-0.25": {"photo": 0.20, "sketch": 0.15, "rendition": 0.25},
    "far-0.5": {"photo": 0.30, "sketch": 0.22, "rendition": 0.33},
    "random-0.25": {"photo": 0.35, "sketch": 0.28, "rendition": 0.41},
    "random-0.5": {"photo": 0.42, "sketch": 0.33, "rendition": 0.49},
}
SEPARATION = {
    "benchmark": "photo",
    "k": 10,
    "tests": 300,
    "reference": 600,
    "classes": 10,
    "chance": 0.1,
    "accuracy": {"mean": 0.62, "lo": 0.565, "hi": 0.673},
}
# The config that would make this run, in the current schema (simgap.experiment.config parses
# it: a schema change that drops a key breaks these tests instead of leaving them on a stale
# format).
CONFIG_TEXT = f"""# report test run
name = "report-run"
seed = 0

[sources]
kind = "real"

[sources.real]
reference = "/data/reference"
pool = "/data/pool/{{00000..00009}}.tar"

[sources.real.benchmarks]
{chr(10).join(f'{b} = "/data/{b}"' for b in BENCHMARKS)}

[splits.gapmatch]
per_benchmark = true
combined = true

[splits.near]
sizes = {list(FRACTIONS)}

[splits.far]
sizes = {list(FRACTIONS)}

[splits.random]
sizes = {list(FRACTIONS)}

[train]
splits = {json.dumps([s for s in TOP1])}

[analysis]
id_benchmark = "photo"
audit = "embedding"
"""
CONFIG = config.parse(CONFIG_TEXT, "report-run.toml")
AUDIT = {
    "threshold": 0.95,
    "benchmarks": {
        "photo": {"tests": 300, "contaminated": 12, "fraction": 0.04},
        "sketch": {"tests": 350, "contaminated": 0, "fraction": 0.0},
        "rendition": {"tests": 400, "contaminated": 3, "fraction": 0.0075},
    },
    "ground_truth": {"precision": 0.9375, "recall": 1.0, "tp": 15, "fp": 1, "fn": 0},
}
# Gallery: tiny stores with real images, scanned for real.
GALLERY_TESTS = 5
REFERENCE_IMAGES = 8
POOL_IMAGES = 12  # in two tar shards
DIM = 16


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def make_run(run: Path, gallery: bool = True) -> Path:
    """Write the whole run; `gallery=False` leaves out the stores and scans."""
    rng = np.random.default_rng(0)
    _run_json(run)
    _gaps(run, rng)
    _splits(run)
    _evals(run)
    _analysis(run, rng)
    _audit(run)
    _composition(run)
    if gallery:
        _stores_and_scans(run, np.random.default_rng(1))
    return run


def _run_json(run: Path) -> None:
    write_json(
        run / "run.json",
        {
            "config": {**config.to_json(CONFIG), "benchmarks": list(BENCHMARKS)},
            "config_text": CONFIG_TEXT,
            "versions": {"simgap": "0.1.0", "numpy": np.__version__},
            "timings": {"embed": 12.5, "scan": 3.25, "train": 80.0},
            "world": {"seed": 0, "scale": "tiny"},
        },
    )


def _gaps(run: Path, rng: np.random.Generator) -> None:
    for i, bench in enumerate(BENCHMARKS):
        n = 300 + 50 * i
        reference = rng.beta(5, 3, n).astype(np.float32)
        pool = np.minimum(reference + rng.uniform(0.02, 0.2, n), 1).astype(np.float32)
        columns = {
            "test_key": [f"{bench}-{j:05d}" for j in range(n)],
            "label": rng.integers(0, 10, n),
            "reference": reference,
            "pool": pool,
            # The reference set is part of every gap-matched split, so its NN similarity
            # equals the reference's on the benchmarks it was pruned for.
            "sketch": reference if bench == "sketch" else pool,
            "combined": reference,
            "sketch-random": np.maximum(pool - np.float32(0.01), reference),
        }
        (run / "gaps").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), run / "gaps" / f"{bench}.parquet")


def _splits(run: Path) -> None:
    for name, (policy, benches, size, control_of, params) in SPLITS.items():
        split = {
            "name": name,
            "policy": policy,
            "params": params,
            "benchmarks": benches,
            "size": size,
            "pool_size": POOL_SIZE,
            "reference_added": policy == "gapmatch",
            "control_of": control_of,
            "fingerprints": {},
        }
        if policy == "gapmatch":
            split["guarantee"] = {"holds": True, "tests": 1050, "violations": 0}
        write_json(run / "splits" / name / "split.json", split)


def _evals(run: Path) -> None:
    for split, scores in TOP1.items():
        benchmarks = {
            b: {
                "top1": t,
                "top5": min(1.0, t + 0.2),
                "mean_per_class_recall": t,
                "n": 300,
                "classes": 10,
            }
            for b, t in scores.items()
        }
        write_json(
            run / "eval" / f"{split}.json",
            {"split": split, "checkpoint": f"train/{split}/final.pt", "benchmarks": benchmarks},
        )


def robustness_doc() -> dict:
    """Line fitted to the random splits (ID: photo; OOD: mean of sketch and rendition)."""
    points = []
    for split in ("full", "sketch", "sketch-random", "near-0.5", "far-0.5", "random-0.5"):
        s = TOP1[split]
        points.append(
            {"split": split, "id_acc": s["photo"], "ood_acc": (s["sketch"] + s["rendition"]) / 2}
        )
    slope, intercept = 0.9, -0.1
    for p in points:
        logit = np.log(p["id_acc"] / (1 - p["id_acc"]))
        predicted = 1 / (1 + np.exp(-(slope * logit + intercept)))
        p["effective_robustness"] = float(p["ood_acc"] - predicted)
    return {
        "line": {
            "slope": slope,
            "intercept": intercept,
            "id_benchmark": "photo",
            "ood_benchmarks": ["sketch", "rendition"],
            "reference_models": ["random-0.5", "sketch-random", "full"],
        },
        "points": points,
    }


def _predictions(run: Path) -> None:
    """Per-test predictions with each split's TOP1 (rounded to whole test points), the test keys
    of the gap files: what the statistics read."""
    for split, scores in TOP1.items():
        for i, bench in enumerate(BENCHMARKS):
            n = 300 + 50 * i
            labels = np.arange(n) % 10
            hits = np.zeros(n, bool)
            hits[
                np.random.default_rng(len(split) + i).permutation(n)[: round(scores[bench] * n)]
            ] = 1
            path = run / "eval" / "predictions" / f"{split}-{bench}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = {
                "key": [f"{bench}-{j:05d}" for j in range(n)],
                "label": labels,
                "pred": np.where(hits, labels, (labels + 1) % 10),
            }
            pq.write_table(pa.table(table), path)


def _analysis(run: Path, rng: np.random.Generator) -> None:
    from simgap.analysis import Sampling, statistics_analysis

    write_json(run / "analysis" / "robustness.json", robustness_doc())
    write_json(run / "analysis" / "separation.json", SEPARATION)
    _predictions(run)
    sampling = Sampling(id_benchmark="photo", seeds=1, bootstrap=200, seed=0)
    statistics_analysis(run, sampling, list(TOP1), list(BENCHMARKS))
    rows = []
    for split in ("full", "sketch"):
        for bench in BENCHMARKS:
            edges = np.sort(rng.uniform(0.2, 1.0, 6))
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                rows.append(
                    {
                        "split": split,
                        "benchmark": bench,
                        "bin_lo": float(lo),
                        "bin_hi": float(hi),
                        "n": 30,
                        "accuracy": float(np.clip(hi - 0.2, 0, 1)),
                    }
                )
    pq.write_table(pa.Table.from_pylist(rows), run / "analysis" / "accuracy_by_similarity.parquet")


def _composition(run: Path) -> None:
    """analysis/composition.json (simgap.select.composition): kind counts as [kept, removed]."""
    kinds = ("photo", "sketch", "distractor")
    splits = {}
    for name, (policy, benches, size, _, _) in SPLITS.items():
        removed = POOL_SIZE - size
        sketch = min(removed, 2 * removed // 3) if policy in ("gapmatch", "near") else removed // 3
        per_kind = {"photo": removed - sketch - removed // 10, "sketch": sketch}
        per_kind["distractor"] = removed - per_kind["photo"] - sketch
        kept = {k: POOL_SIZE // 3 - per_kind[k] for k in kinds}
        kept["photo"] += POOL_SIZE - 3 * (POOL_SIZE // 3)
        counts = {k: [kept[k], per_kind[k]] for k in kinds}
        splits[name] = {
            "policy": policy,
            "benchmarks": benches,
            "score": None,
            "kept": size,
            "removed": removed,
            "counts": {"kind": counts, "caption": {"clean": [size, removed]}},
            "examples": [],
        }
    write_json(
        run / "analysis" / "composition.json",
        {
            "pool": POOL_SIZE,
            "ground_truth": True,
            "groups": {"kind": sorted(kinds), "caption": ["clean"]},
            "splits": splits,
        },
    )


def _audit(run: Path) -> None:
    write_json(run / "audit" / "audit.json", AUDIT)
    pairs = pa.table(
        {
            "benchmark": ["photo"] * 12 + ["rendition"] * 3,
            "test_key": [f"photo-{i:05d}" for i in range(12)]
            + [f"rendition-{i:05d}" for i in range(3)],
            "base_key": [f"p{i:07d}" for i in range(15)],
            "similarity": np.linspace(0.951, 0.999, 15).astype(np.float32),
        }
    )
    pq.write_table(pairs, run / "audit" / "pairs.parquet")


def _image(rng: np.random.Generator, size: int = 32) -> bytes:
    """A random colour field with a bright square: non-blank, different per call."""
    a = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 200, 3, dtype=np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    a[y : y + size // 2, x : x + size // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _file_store(run: Path, name: str, keys: list[str], rng: np.random.Generator) -> np.ndarray:
    """A one-shard store whose rows are image files (source = the file path)."""
    folder = run / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for key in keys:
        (folder / f"{key}.png").write_bytes(_image(rng))
        sources.append(str(folder / f"{key}.png"))
    emb = _unit(rng, len(keys))
    writer = StoreWriter(run / "stores" / name, {"arch": "test"}, DIM, {"kind": "files"})
    table = pa.table({"key": keys, "source": sources})
    writer.finish([writer.write_shard("00000", emb, table)])
    return emb


def _pool_store(run: Path, rng: np.random.Generator) -> np.ndarray:
    """A two-shard store whose rows live in webdataset tars (source = the tar)."""
    (run / "images").mkdir(parents=True, exist_ok=True)
    emb = _unit(rng, POOL_IMAGES)
    writer = StoreWriter(run / "stores" / "pool", {"arch": "test"}, DIM, {"kind": "tars"})
    records, half = [], POOL_IMAGES // 2
    for shard, rows in enumerate((range(0, half), range(half, POOL_IMAGES))):
        tar_path = run / "images" / f"pool-{shard:05d}.tar"
        keys = [f"p{i:07d}" for i in rows]
        with tarfile.open(tar_path, "w") as tar:
            for key in keys:
                for ext, data in (("png", _image(rng)), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        table = pa.table({"key": keys, "source": [str(tar_path)] * len(keys)})
        records.append(writer.write_shard(f"{shard:05d}", emb[rows.start : rows.stop], table))
    writer.finish(records)
    return emb


def _stores_and_scans(run: Path, rng: np.random.Generator) -> None:
    reference = _file_store(run, "reference", [f"r{i:07d}" for i in range(REFERENCE_IMAGES)], rng)
    pool = _pool_store(run, rng)
    del reference, pool
    for bench in BENCHMARKS:
        keys = [f"{bench}-{i:05d}" for i in range(GALLERY_TESTS)]
        _file_store(run, f"bench-{bench}", keys, rng)
    # The run's scan: one folder for every benchmark, with its reference pass.
    stores = run / "stores"
    scan_benchmarks(
        stores / "pool",
        [stores / f"bench-{b}" for b in BENCHMARKS],
        run / "scans" / "pool",
        reference=stores / "reference",
        topk=4,
    )
