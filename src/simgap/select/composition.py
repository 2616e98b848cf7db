"""What pruning removed: per split, its kept and removed pool points counted by what they are
(on the world: the ground truth of every pool sample, ``ground_truth/pool.parquet``), and a few
removed points at several scores (the margin over the threshold for a gap-matched split, the
similarity to the benchmarks for near / far / coreset) with their captions, for the galleries
that stand in for the ground truth on real data.

Written as ``analysis/composition.json``::

    {"pool": N, "ground_truth": true, "groups": {"kind": [...], "caption": [...]},
     "splits": {"<split>": {"policy", "benchmarks", "kept", "removed", "score",
                            "counts": {"kind": {"sketch": [kept, removed], ...}, ...},
                            "examples": [{"key", "source", "caption", "score", "quantile",
                                          "kind", "noise"}, ...]}}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simgap.store import Store

GROUPS = {"kind": "kind", "caption": "caption"}  # composition group -> ground-truth column
QUANTILES = (1.0, 0.75, 0.5, 0.25, 0.0)  # of the removed points' scores: the examples shown
SCORES = {"gapmatch": "margin", "near": "similarity", "far": "similarity", "coreset": "similarity"}


def counts(values: np.ndarray, kept: np.ndarray) -> dict[str, list[int]]:
    """category -> [kept, removed], categories sorted."""
    out = {}
    for category in sorted(set(values.tolist())):
        mine = values == category
        out[str(category)] = [int((mine & kept).sum()), int((mine & ~kept).sum())]
    return out


def pick_removed(kept: np.ndarray, score: np.ndarray | None) -> list[tuple[float, int]]:
    """(quantile, row) of removed points to show: with a score, the removed point at each of
    :data:`QUANTILES` of the removed points' scores (highest first, ties to the lowest row);
    without one, points evenly spaced in row order. A row is shown once."""
    removed = np.flatnonzero(~kept)
    if not len(removed):
        return []
    if score is None:
        order = removed
    else:
        s = score[removed]
        order = removed[np.lexsort((removed, -s))]  # highest score first, stable on row
    picks: list[tuple[float, int]] = []
    for q in QUANTILES:
        row = int(order[round((1 - q) * (len(order) - 1))])
        if row not in [r for _, r in picks]:
            picks.append((q, row))
    return picks


def _rows_meta(pool: Store, rows: Sequence[int]) -> dict[int, dict[str, Any]]:
    """key, source and caption of a few pool rows, reading only the shards that hold them."""
    out: dict[int, dict[str, Any]] = {}
    for shard in pool.shards:
        mine = [r for r in rows if shard.offset <= r < shard.offset + shard.rows]
        if not mine:
            continue
        table = pool.read_keys(shard.name)
        for r in mine:
            row = {c: table.column(c)[r - shard.offset].as_py() for c in table.column_names}
            out[r] = {k: row.get(k) for k in ("key", "source", "caption")}
    return out


def split_composition(
    pool: Store,
    kept: np.ndarray,
    truth: Mapping[str, np.ndarray] | None,
    score: np.ndarray | None,
) -> dict[str, Any]:
    """One split: kept / removed counts, by ground-truth group when known, and removed
    examples at several scores."""
    out: dict[str, Any] = {"kept": int(kept.sum()), "removed": int((~kept).sum())}
    if truth is not None:
        out["counts"] = {g: counts(truth[column], kept) for g, column in GROUPS.items()}
    picks = pick_removed(kept, score)
    meta = _rows_meta(pool, [r for _, r in picks])
    examples = []
    for q, row in picks:
        example = {
            **meta[row],
            "quantile": q,
            "score": None if score is None else float(score[row]),
        }
        if truth is not None:
            example |= {"kind": str(truth["kind"][row]), "noise": str(truth["caption"][row])}
        examples.append(example)
    out["examples"] = examples
    return out


def truth_by_row(pool: Store, truth: pa.Table) -> dict[str, np.ndarray]:
    """The ground-truth columns in pool-store row order; a pool key the ground truth lacks is an
    error (the store is not of this world)."""
    index = {k: i for i, k in enumerate(truth.column("key").to_pylist())}
    keys = pool.keys()
    missing = [k for k in keys if k not in index]
    if missing:
        raise ValueError(
            f"{pool.path}: {len(missing)} pool keys are not in the world's ground truth "
            f"(first: {missing[0]})"
        )
    rows = np.array([index[k] for k in keys], dtype=np.int64)
    return {
        column: np.array(truth.column(column).to_pylist(), dtype=object)[rows]
        for column in set(GROUPS.values())
    }


def composition(
    pool: Store,
    splits: Mapping[str, tuple[str, tuple[str, ...], np.ndarray | Callable[[], np.ndarray]]],
    scores: Callable[[str, str], np.ndarray],
    truth: pa.Table | None,
) -> dict[str, Any]:
    """Every split's composition. ``splits``: name -> (policy, benchmarks, kept mask over pool
    rows, or a function that reads it: one split's mask in memory at a time); ``scores``: (score
    kind "margin" / "similarity", benchmark) -> per-row values (the pool scans' row margin and
    row max, :func:`scan_scores`); ``truth``: the world's ``ground_truth/pool.parquet``, or
    None."""
    by_row = truth_by_row(pool, truth) if truth is not None else None
    out: dict[str, Any] = {"pool": pool.rows, "ground_truth": by_row is not None, "splits": {}}
    if by_row is not None:
        out["groups"] = {g: sorted(set(by_row[c].tolist())) for g, c in GROUPS.items()}
    for name, (policy, benchmarks, kept) in splits.items():
        kind = SCORES.get(policy) if benchmarks else None
        score = None
        if kind is not None:
            score = np.maximum.reduce([np.asarray(scores(kind, b), np.float32) for b in benchmarks])
        entry = {"policy": policy, "benchmarks": list(benchmarks), "score": kind}
        mask = kept() if callable(kept) else kept
        out["splits"][name] = entry | split_composition(pool, mask, by_row, score)
    return out


def scan_scores(scan: Path) -> Callable[[str, str], np.ndarray]:
    """(score kind, benchmark) -> the pool scan's per-row field: ``margin`` (row margin) or
    ``similarity`` (row max), that benchmark's column of the one scan of every benchmark
    (``scans/pool``). Read on first use and kept, one column at a time: a LAION pool's column
    is 800 MB per benchmark."""
    from simgap.scan.layout import benchmark_rows
    from simgap.select.build import match_parts, scan_parts

    cache: dict[tuple[str, str], np.ndarray] = {}

    def score(kind: str, bench: str) -> np.ndarray:
        if (kind, bench) not in cache:
            (part,) = match_parts(scan_parts((Path(scan),), "pool-"), [bench], str(scan))
            field = "margin" if kind == "margin" else "max"
            cache[kind, bench] = benchmark_rows(part.folder, field, part.index)
        return cache[kind, bench]

    return score
