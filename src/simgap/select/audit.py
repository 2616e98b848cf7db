"""Contamination audit: which test points have a near-duplicate in a base set.

A pair (test point, base row) is a near-duplicate when their similarity is strictly above the
threshold. The exact scan screens the base set (per-row margin against a constant threshold);
only the rows it flags are re-read to list their pairs, so the cost is one scan.

Outputs (``out_dir``): ``audit.json`` {"threshold", "benchmarks": {name: {"tests",
"contaminated", "fraction"}}, "pairs", "base"} (+ "ground_truth": precision/recall/tp/fp/fn at the
pair level when the injected pairs are given) and ``pairs.parquet`` (benchmark, test_key,
base_key, similarity), sorted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simgap.io import sha256_bytes, write_json, write_parquet
from simgap.store import Store, check_compatible

# Chosen on the world (see the README's audit section for the measurement behind it).
DEFAULT_THRESHOLD = 0.95


def store_name(store: Store) -> str:
    """A benchmark's name from its store folder (``stores/bench-sketch`` → ``sketch``)."""
    name = store.path.name
    return name[len("bench-") :] if name.startswith("bench-") else name


def audit(
    tests: Mapping[str, Store] | Store,
    base: Store,
    threshold: float = DEFAULT_THRESHOLD,
    ground_truth: pa.Table | None = None,
    out_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Audit every benchmark in ``tests`` (name → store, or one store named by its folder)
    against ``base``; ``ground_truth`` has columns pool_key, benchmark, test_key."""
    from simgap.scan import scan_store

    if isinstance(tests, Store):
        tests = {store_name(tests): tests}
    if not tests:
        raise ValueError("audit needs at least one benchmark store")
    check_compatible(base, *tests.values())
    names = list(tests)
    embs = [tests[n].embeddings() for n in names]
    keys = [np.array(tests[n].keys(), dtype=object) for n in names]
    bench_of = np.concatenate([np.full(len(e), i, np.int32) for i, e in enumerate(embs)])
    test_keys = np.concatenate(keys)
    emb = np.concatenate(embs)
    thr = np.float32(threshold)
    res = scan_store(
        base, emb, thresholds=np.full(len(emb), thr, np.float32), topk=0, progress=progress
    )
    pairs = _pairs(base, emb.astype(np.float32), res.row_margin, thr)
    table = pa.table(
        {
            "benchmark": pa.array([names[bench_of[t]] for t, _, _ in pairs], pa.string()),
            "test_key": pa.array([test_keys[t] for t, _, _ in pairs], pa.string()),
            "base_key": pa.array([k for _, k, _ in pairs], pa.string()),
            "similarity": pa.array([s for _, _, s in pairs], pa.float32()),
        }
    ).sort_by([("benchmark", "ascending"), ("test_key", "ascending"), ("base_key", "ascending")])
    hit = np.zeros(len(emb), bool)
    hit[[t for t, _, _ in pairs]] = True
    report: dict[str, Any] = {
        "threshold": float(threshold),
        "benchmarks": {},
        "pairs": table.num_rows,
        "base": {"rows": base.rows, "shards_sha256": [s.sha256 for s in base.shards]},
    }
    for i, n in enumerate(names):
        sel = bench_of == i
        c = int(hit[sel].sum())
        report["benchmarks"][n] = {
            "tests": int(sel.sum()),
            "contaminated": c,
            "fraction": c / max(int(sel.sum()), 1),
        }
    if ground_truth is not None:
        report["ground_truth"] = score_pairs(table, ground_truth, names)
    if out_dir is not None:
        write_parquet(Path(out_dir) / "pairs.parquet", table)
        write_json(Path(out_dir) / "audit.json", report)
    return report


def _pairs(
    base: Store, tests: np.ndarray, margin: np.ndarray, thr: np.float32
) -> list[tuple[int, str, float]]:
    """(test index, base key, similarity) of every pair above ``thr`` among the flagged rows."""
    out = []
    for s in base.shards:
        rows = np.flatnonzero(margin[s.offset : s.offset + s.rows] > 0)
        if not len(rows):
            continue
        emb = np.asarray(base.read_emb(s.name)[rows], np.float32)
        shard_keys = base.read_keys(s.name).column("key").to_pylist()
        sims = emb @ tests.T
        for r, t in zip(*np.nonzero(sims > thr), strict=True):
            out.append((int(t), shard_keys[rows[r]], float(sims[r, t])))
    return out


def score_pairs(found: pa.Table, truth: pa.Table, benchmarks: list[str]) -> dict[str, Any]:
    """Pair-level precision and recall of the audit against injected near-duplicates."""
    for col in ("pool_key", "benchmark", "test_key"):
        if col not in truth.column_names:
            raise ValueError(f"ground truth lacks column {col!r} (has {truth.column_names})")
    want = set(benchmarks)
    true = {
        (b, t, p)
        for b, t, p in zip(
            truth.column("benchmark").to_pylist(),
            truth.column("test_key").to_pylist(),
            truth.column("pool_key").to_pylist(),
            strict=True,
        )
        if b in want
    }
    got = set(
        zip(
            found.column("benchmark").to_pylist(),
            found.column("test_key").to_pylist(),
            found.column("base_key").to_pylist(),
            strict=True,
        )
    )
    tp = len(got & true)
    fp, fn = len(got) - tp, len(true) - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / len(got) if got else 1.0,
        "recall": tp / len(true) if true else 1.0,
        "truth_sha256": sha256_bytes("\n".join("\t".join(x) for x in sorted(true)).encode()),
    }
