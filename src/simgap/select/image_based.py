"""DataComp's image-based filter: cluster the pool, then keep the pool points whose nearest
centroid is the nearest centroid of some reference point (ImageNet-train in DataComp)."""

from __future__ import annotations

import numpy as np

from simgap.select.clusters import assign_store, train_centroids
from simgap.store import Store, check_compatible


def image_based(
    pool: Store,
    reference: Store,
    n_clusters: int,
    seed: int = 0,
    sample: int | None = None,
    batch_rows: int = 1 << 16,
) -> np.ndarray:
    """Keep mask over the pool's rows. Centroids are trained on a seeded sample of the pool;
    both stores are assigned by streaming their shards."""
    check_compatible(pool, reference)
    centroids = train_centroids(pool, n_clusters, seed, sample)
    return keep_by_centroids(pool, reference, centroids, batch_rows)


def keep_by_centroids(
    pool: Store, reference: Store, centroids: np.ndarray, batch_rows: int = 1 << 16
) -> np.ndarray:
    """The filter for given centroids (the part a brute force can check)."""
    ref_clusters = np.unique(assign_store(reference, centroids, batch_rows)[0])
    pool_clusters, _ = assign_store(pool, centroids, batch_rows)
    return np.isin(pool_clusters, ref_clusters)
