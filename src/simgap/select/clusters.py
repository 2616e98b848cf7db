"""k-means over an embedding store that may not fit in memory: train on a sample, assign by
streaming the shards. Shared by semdedup and the image-based (DataComp) policy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from simgap.store import Store


def sample_rows(store: Store, n: int, seed: int) -> np.ndarray:
    """``n`` distinct rows drawn with ``seed`` (all rows when the store is smaller), as float32,
    read shard by shard so only the sample is held in memory."""
    if store.rows == 0:
        raise ValueError(f"{store.path}: empty store, nothing to cluster")
    n = min(n, store.rows)
    picked = np.sort(np.random.default_rng(seed).choice(store.rows, n, replace=False))
    parts = []
    for s in store.shards:
        lo, hi = np.searchsorted(picked, [s.offset, s.offset + s.rows])
        if hi > lo:
            parts.append(np.asarray(store.read_emb(s.name)[picked[lo:hi] - s.offset], np.float32))
    return np.concatenate(parts)


def train_centroids(
    store: Store, n_clusters: int, seed: int = 0, sample: int | None = None, niter: int = 20
) -> np.ndarray:
    """Spherical k-means centroids (float32, unit rows) trained with FAISS on a seeded sample
    (default: 64 points per cluster, FAISS's own per-centroid cap is 256)."""
    import faiss

    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, not {n_clusters}")
    x = sample_rows(store, sample or 64 * n_clusters, seed)
    if len(x) < n_clusters:
        raise ValueError(
            f"{store.path}: {len(x)} rows cannot make {n_clusters} clusters; ask for fewer"
        )
    km = faiss.Kmeans(
        store.dim,
        n_clusters,
        niter=niter,
        seed=seed,
        spherical=True,
        verbose=False,
        # FAISS subsamples above this many points per centroid; the sample is already drawn.
        max_points_per_centroid=max(256, -(-len(x) // n_clusters)),
    )
    km.train(np.ascontiguousarray(x))
    c = km.centroids.astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity) of each row's most similar centroid; ties go to the lowest index."""
    sims = np.asarray(x, np.float32) @ centroids.T
    idx = sims.argmax(axis=1)
    return idx.astype(np.int32), sims[np.arange(len(idx)), idx]


def iter_batches(store: Store, batch_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(global offset, float16 rows as stored) in batches of at most ``batch_rows``; only one
    batch of one shard is read into memory at a time."""
    for s in store.shards:
        emb = store.read_emb(s.name)
        for start in range(0, s.rows, batch_rows):
            yield s.offset + start, np.array(emb[start : start + batch_rows])
        del emb  # unmap the shard before the next one is read


def assign_store(
    store: Store, centroids: np.ndarray, batch_rows: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and its similarity for every row, streamed (int32 + float32 per row)."""
    idx = np.empty(store.rows, np.int32)
    sim = np.empty(store.rows, np.float32)
    for offset, x in iter_batches(store, batch_rows):
        idx[offset : offset + len(x)], sim[offset : offset + len(x)] = nearest_centroid(
            x, centroids
        )
    return idx, sim
