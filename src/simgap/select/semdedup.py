"""SemDeDup (Abbas et al. 2023; the paper's LAION-400M → LAION-200M step, METHOD.md §4), with
memory bounded by a bucket of clusters rather than the store.

1. Spherical k-means (FAISS) trained on a seeded sample of the store.
2. One streamed pass assigns every row to its nearest centroid and spills (row, cluster,
   centroid similarity, fp16 embedding) to one of B bucket files (cluster mod B), B chosen so a
   bucket holds about ``bucket_rows`` rows.
3. Each bucket is loaded alone and every cluster in it deduplicated. "Earlier" means lower
   global row index.

Keep rules (``rule``):
- ``"kept"`` (default; the paper's "keep one per duplicate group"): walk the cluster in row order
  and keep a point iff its similarity to every point *kept so far* is ≤ 1 − ε. Every dropped
  point has a kept point above 1 − ε, and kept points are pairwise ≤ 1 − ε.
- ``"any"`` (SemDeDup's public code): drop a point iff its similarity to *any* earlier point of
  the cluster, kept or not, exceeds 1 − ε. A chain a~b~c drops both b and c even if a and c
  are far apart.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from simgap.select.clusters import iter_batches, nearest_centroid, train_centroids
from simgap.store import Store

RULES = ("kept", "any")
_REC = np.dtype([("row", "<i8"), ("cluster", "<i4"), ("csim", "<f4")])


def dedup_cluster(x: np.ndarray, eps: float, rule: str = "kept", block: int = 1024) -> np.ndarray:
    """Keep mask of one cluster's rows (in their given order) under ``rule``."""
    if rule not in RULES:
        raise ValueError(f"unknown keep rule {rule!r}: choose one of {RULES}")
    x = np.asarray(x, np.float32)
    thr = np.float32(1.0 - eps)
    n = len(x)
    keep = np.zeros(n, bool)
    for a in range(0, n, block):
        b = min(a + block, n)
        if rule == "any":
            s = x[a:b] @ x[:b].T
            s[np.arange(b)[None, :] >= np.arange(a, b)[:, None]] = -np.inf
            keep[a:b] = s.max(axis=1, initial=-np.inf) <= thr
            continue
        kept = np.flatnonzero(keep[:a])
        cand = np.ones(b - a, bool)
        if len(kept):
            cand = (x[a:b] @ x[kept].T).max(axis=1) <= thr
        # Conflicts between candidates of the block, earlier row → later row. A candidate with
        # no earlier conflicting candidate is kept; only the others need the sequential walk.
        conflict = np.triu((x[a:b] @ x[a:b].T) > thr, 1) & cand[:, None] & cand[None, :]
        for j in np.flatnonzero(conflict.any(axis=0)):
            cand[j] = not (conflict[:j, j] & cand[:j]).any()
        keep[a:b] = cand
    return keep


def semdedup(
    store: Store,
    n_clusters: int,
    eps: float = 0.124,
    seed: int = 0,
    batch_rows: int = 1 << 15,
    bucket_rows: int = 1 << 20,
    rule: str = "kept",
    sample: int | None = None,
    work_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, pa.Table]:
    """(keep mask over the store's rows, per-cluster statistics: cluster, size, kept, removed,
    mean similarity to the centroid). Peak memory: one bucket (~``bucket_rows`` rows) plus one
    batch plus 1 byte per row for the mask, never the whole store."""
    if not 0 <= eps < 2:
        raise ValueError(f"eps must lie in [0, 2), not {eps}")
    if rule not in RULES:
        raise ValueError(f"unknown keep rule {rule!r}: choose one of {RULES}")
    centroids = train_centroids(store, n_clusters, seed, sample)
    n_buckets = max(1, -(-store.rows // bucket_rows))
    keep = np.zeros(store.rows, bool)
    size = np.zeros(n_clusters, np.int64)
    kept = np.zeros(n_clusters, np.int64)
    csim_sum = np.zeros(n_clusters, np.float64)
    with tempfile.TemporaryDirectory(prefix="semdedup-", dir=work_dir) as tmp:
        _spill(store, centroids, n_buckets, batch_rows, Path(tmp), log)
        for b in range(n_buckets):
            recs, emb = _read_bucket(Path(tmp), b, store.dim)
            # Sorted indices, not a sorted copy: the bucket is held once.
            order = np.lexsort((recs["row"], recs["cluster"]))
            cluster = recs["cluster"][order]
            bounds = np.flatnonzero(np.diff(cluster)) + 1
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)], strict=True):
                if hi == lo:
                    continue
                c, sel = int(cluster[lo]), order[lo:hi]
                k = dedup_cluster(emb[sel], eps, rule)
                keep[recs["row"][sel][k]] = True
                size[c], kept[c] = hi - lo, int(k.sum())
                csim_sum[c] = float(recs["csim"][sel].astype(np.float64).sum())
            del recs, emb
            if log:
                log(f"semdedup: bucket {b + 1}/{n_buckets} done, {int(keep.sum())} kept so far")
    stats = pa.table(
        {
            "cluster": pa.array(np.arange(n_clusters, dtype=np.int32)),
            "size": pa.array(size),
            "kept": pa.array(kept),
            "removed": pa.array(size - kept),
            "centroid_similarity": pa.array(
                np.where(size > 0, csim_sum / np.maximum(size, 1), np.nan).astype(np.float32)
            ),
        }
    )
    return keep, stats


def _spill(
    store: Store,
    centroids: np.ndarray,
    n_buckets: int,
    batch_rows: int,
    tmp: Path,
    log: Callable[[str], None] | None,
) -> None:
    files = [(open(tmp / f"{b}.rec", "wb"), open(tmp / f"{b}.emb", "wb")) for b in range(n_buckets)]
    try:
        done = 0
        for offset, x in iter_batches(store, batch_rows):
            idx, sim = nearest_centroid(x, centroids)
            bucket = idx % n_buckets
            rec = np.empty(len(x), _REC)
            rec["row"], rec["cluster"], rec["csim"] = np.arange(offset, offset + len(x)), idx, sim
            for b in np.unique(bucket):
                sel = bucket == b
                rec[sel].tofile(files[b][0])
                x[sel].tofile(files[b][1])
            done += len(x)
            if log:
                log(f"semdedup: assigned {done}/{store.rows} rows")
    finally:
        for fr, fe in files:
            fr.close()
            fe.close()


def _read_bucket(tmp: Path, b: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    recs = np.fromfile(tmp / f"{b}.rec", _REC)
    emb = np.fromfile(tmp / f"{b}.emb", np.float16).reshape(len(recs), dim)
    return recs, emb
