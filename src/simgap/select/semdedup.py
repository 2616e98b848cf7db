"""SemDeDup (Abbas et al. 2023; the paper's LAION-400M → LAION-200M step, METHOD.md §4), with
memory bounded by ``bucket_rows`` rather than by the store or the size of its clusters.

1. Spherical k-means (FAISS) trained on a seeded sample of the store.
2. One streamed pass assigns every row to its nearest centroid and spills (row, cluster,
   centroid similarity, fp16 embedding) to one of B bucket files (cluster mod B), B chosen so a
   bucket holds about ``bucket_rows`` rows.
3. Each bucket alone is regrouped on disk (clusters contiguous, row order kept) and every
   cluster in it deduplicated: read whole when it has at most ``bucket_rows`` rows, otherwise
   streamed from disk a block at a time. "Earlier" means lower global row index.

A cluster's size is about rows / n_clusters, so it grows with the store at a fixed cluster
count; loading a bucket whole (and a block × cluster similarity matrix) once made peak memory
grow with the store.

Keep rules (``rule``):
- ``"kept"`` (default; the paper's "keep one per duplicate group"): walk the cluster in row order
  and keep a point iff its similarity to every point *kept so far* is ≤ 1 − ε. Every dropped
  point has a kept point above 1 − ε, and kept points are pairwise ≤ 1 − ε.
- ``"any"`` (SemDeDup's public code): drop a point iff its similarity to *any* earlier point of
  the cluster, kept or not, exceeds 1 − ε. A chain a~b~c drops both b and c even if a and c
  are far apart.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from simgap.select.clusters import iter_batches, nearest_centroid, train_centroids
from simgap.store import Store
from simgap.types import Log

RULES = ("kept", "any")
_REC = np.dtype([("row", "<i8"), ("cluster", "<i4"), ("csim", "<f4")])


def dedup_cluster(
    x: np.ndarray | _FileRows,
    eps: float,
    rule: str = "kept",
    block: int = 1024,
    chunk: int = 1024,
) -> np.ndarray:
    """Keep mask of one cluster's rows (in their given order) under ``rule``.

    ``x`` is an array or anything sliceable into row ranges (a cluster on disk). Earlier rows
    are compared ``chunk`` rows at a time, so the working set is one block, one chunk and a
    ``block`` × ``chunk`` similarity tile, never a block × cluster matrix."""
    if rule not in RULES:
        raise ValueError(f"unknown keep rule {rule!r}: choose one of {RULES}")
    thr = np.float32(1.0 - eps)
    n = len(x)
    keep = np.zeros(n, bool)
    for a in range(0, n, block):
        b = min(a + block, n)
        xb = np.asarray(x[a:b], np.float32)
        # Best similarity of each block row to the earlier rows that count under the rule.
        best = np.full(b - a, -np.inf, np.float32)
        for c in range(0, a, chunk):
            d = min(c + chunk, a)
            counted = slice(None) if rule == "any" else keep[c:d]
            if rule == "kept" and not counted.any():
                continue
            xc = np.asarray(x[c:d], np.float32)[counted]
            np.maximum(best, (xb @ xc.T).max(axis=1), out=best)
        if rule == "any":
            s = xb @ xb.T
            s[np.arange(b - a)[None, :] >= np.arange(b - a)[:, None]] = -np.inf
            keep[a:b] = np.maximum(best, s.max(axis=1, initial=-np.inf)) <= thr
            continue
        cand = best <= thr
        # Conflicts between candidates of the block, earlier row → later row. A candidate with
        # no earlier conflicting candidate is kept; only the others need the sequential walk.
        conflict = np.triu((xb @ xb.T) > thr, 1) & cand[:, None] & cand[None, :]
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
    log: Log | None = None,
    block: int = 1024,
) -> tuple[np.ndarray, pa.Table]:
    """(keep mask over the store's rows, per-cluster statistics: cluster, size, kept, removed,
    mean similarity to the centroid).

    Peak memory, whatever the store or cluster sizes: one batch of ``batch_rows`` rows, one
    cluster of at most ``bucket_rows`` rows as float16, ``block`` × ``block`` similarity
    tiles (about 8 MiB at d = 512 and block 1024), and per row 1 byte (the mask) plus 32
    bytes for each row of the bucket being deduplicated (row, cluster, similarity, sort
    order, destination). Each bucket is first regrouped on disk so that its clusters are
    contiguous in row order; a cluster of at most ``bucket_rows`` rows is then read whole, a
    larger one is deduplicated from disk a block at a time (its earlier rows re-read chunk by
    chunk). Spill files are read with plain reads into fresh or reused buffers, never
    memory-mapped, so no file page stays resident; the store's shards are mapped one at a
    time (see ``iter_batches``)."""
    if not 0 <= eps < 2:
        raise ValueError(f"eps must lie in [0, 2), not {eps}")
    if rule not in RULES:
        raise ValueError(f"unknown keep rule {rule!r}: choose one of {RULES}")
    if bucket_rows < 1:
        raise ValueError(f"bucket_rows must be >= 1, not {bucket_rows}")
    centroids = train_centroids(store, n_clusters, seed, sample)
    n_buckets = max(1, -(-store.rows // bucket_rows))
    keep = np.zeros(store.rows, bool)
    size = np.zeros(n_clusters, np.int64)
    kept = np.zeros(n_clusters, np.int64)
    csim_sum = np.zeros(n_clusters, np.float64)
    with tempfile.TemporaryDirectory(prefix="semdedup-", dir=work_dir) as tmp:
        _spill(store, centroids, n_buckets, batch_rows, Path(tmp), log)
        for b in range(n_buckets):
            recs = np.fromfile(Path(tmp) / f"{b}.rec", _REC)
            # Rows were spilled in row order, so a stable sort by cluster keeps row order
            # within each cluster. Sorted indices, not a sorted copy: the records are held once.
            order = np.argsort(recs["cluster"], kind="stable")
            cluster = recs["cluster"][order]
            bounds = np.flatnonzero(np.diff(cluster)) + 1
            emb_path = Path(tmp) / f"{b}.emb"
            _regroup(emb_path, order, store.dim, batch_rows)
            emb_path.unlink()
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)], strict=True):
                if hi == lo:
                    continue
                c, sel = int(cluster[lo]), order[lo:hi]
                x = _FileRows(emb_path.with_suffix(".grp"), lo, hi - lo, store.dim)
                if hi - lo <= bucket_rows:
                    x = x[0 : hi - lo]  # small enough to hold: read once
                k = dedup_cluster(x, eps, rule, block=block, chunk=block)
                del x
                keep[recs["row"][sel][k]] = True
                size[c], kept[c] = hi - lo, int(k.sum())
                csim_sum[c] = float(recs["csim"][sel].astype(np.float64).sum())
            del recs, order, cluster
            emb_path.with_suffix(".grp").unlink()
            emb_path.with_suffix(".rec").unlink()
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
    log: Log | None,
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


class _FileRows:
    """``n`` float16 rows of width ``dim`` starting at row ``first`` of a file, sliced into
    row ranges by explicit reads (each slice is a fresh array; nothing stays mapped)."""

    def __init__(self, path: Path, first: int, n: int, dim: int):
        self.path, self.first, self.n, self.dim = path, first, n, dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.n)
        out = np.empty((max(0, b - a), self.dim), np.float16)
        with open(self.path, "rb") as f:
            f.seek((self.first + a) * self.dim * 2)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise RuntimeError(f"{self.path}: spill file shorter than expected")
        return out


def _regroup(path: Path, order: np.ndarray, dim: int, batch_rows: int) -> None:
    """Write the bucket's rows to ``path.grp`` in ``order`` (clusters contiguous), reading
    ``batch_rows`` rows at a time into one reused buffer. A batch's rows of one cluster land
    on consecutive output rows, so each cluster of a batch is one positioned write."""
    dest = np.empty(len(order), np.int64)
    dest[order] = np.arange(len(order))
    row_bytes = dim * 2
    buf = np.empty((batch_rows, dim), np.float16)
    with open(path, "rb") as src, open(path.with_suffix(".grp"), "wb") as out:
        out.truncate(len(order) * row_bytes)
        for a in range(0, len(order), batch_rows):
            b = min(a + batch_rows, len(order))
            chunk = buf[: b - a]
            if src.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise RuntimeError(f"{path}: spill file shorter than expected")
            d = dest[a:b]
            by_dest = np.argsort(d, kind="stable")
            runs = np.flatnonzero(np.diff(d[by_dest]) != 1) + 1
            for lo, hi in zip(np.r_[0, runs], np.r_[runs, b - a], strict=True):
                os.pwrite(
                    out.fileno(), chunk[by_dest[lo:hi]].tobytes(), int(d[by_dest[lo]]) * row_bytes
                )
