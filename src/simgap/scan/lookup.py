"""Approximate top-k look-up over a store: a FAISS IVF index, its recall measured at every build.

For interactive look-ups ("what in the pool looks like this test image?") and for dedup
candidates. Never for a pruning decision: an IVF search misses neighbours (recall < 1), which
would break the gap-matching guarantee; decisions come from the exact scan.

Every build measures recall@k against the exact scan (``scan_store``) on a seeded sample of
queries and records it in ``index.json``::

    index.faiss   the FAISS index (faiss.serialize_index), row ids = global store rows
    index.json    format, store fingerprint, factory, nprobe, k, queries (their store rows, or the
                  sha256 of given queries), recall_at_k, recall_at_1

recall@k = mean over queries of |approximate top-k ids ∩ exact top-k ids| / k. Queries drawn
from the store find themselves, which flatters recall@1: pass real queries (e.g. benchmark
embeddings) where that matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simgap.io import read_json, sha256_array, write_bytes, write_json
from simgap.scan.kernel import KernelConfig
from simgap.scan.shards import ScanOptions, scan_store, topk_keys
from simgap.store import Store, open_store

FORMAT = "simgap-ivf/1"


@dataclass(frozen=True)
class IvfConfig:
    nlist: int = 1024  # inverted lists (k-means centroids)
    nprobe: int = 16  # lists visited per query
    codec: str = "SQfp16"  # faiss index_factory code: Flat, SQfp16 (= the store's precision), SQ8
    train_rows: int = 100_000  # k-means training sample
    recall_queries: int = 1000
    k: int = 10
    seed: int = 0


def _sample_rows(store: Store, rows: np.ndarray) -> np.ndarray:
    """Rows by global id (sorted), read shard by shard."""
    out = np.empty((len(rows), store.dim), np.float32)
    for s in store.shards:
        sel = np.flatnonzero((rows >= s.offset) & (rows < s.offset + s.rows))
        if len(sel):
            out[sel] = store.read_emb(s.name)[rows[sel] - s.offset]
    return out


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-k ids found in its approximate top-k."""
    hits = [len(set(a[:k]) & set(e[:k]) - {-1}) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k) if hits else 0.0


def build_ivf(
    store: Store,
    out_dir: Path | str,
    config: IvfConfig = IvfConfig(),
    queries: np.ndarray | None = None,
    kernel: KernelConfig | None = None,
) -> dict[str, Any]:
    """Build the index, measure its recall against the exact scan, write both; return the
    metadata. ``queries`` (M, d) replaces the sample of store rows used for recall."""
    import faiss

    cfg = config
    if store.rows < cfg.nlist:
        raise ValueError(f"{store.path}: {store.rows} rows cannot train {cfg.nlist} IVF lists")
    rng = np.random.default_rng(cfg.seed)
    train_ids = np.sort(rng.choice(store.rows, min(cfg.train_rows, store.rows), replace=False))
    factory = f"IVF{cfg.nlist},{cfg.codec}"
    index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(_sample_rows(store, train_ids))
    for s in store.shards:
        emb = store.read_emb(s.name)
        for a in range(0, s.rows, 1 << 16):
            part = np.asarray(emb[a : a + (1 << 16)], np.float32)
            index.add_with_ids(part, np.arange(s.offset + a, s.offset + a + len(part)))
    index.nprobe = cfg.nprobe

    query_rows = None
    if queries is None:
        query_rows = np.sort(rng.choice(store.rows, min(cfg.recall_queries, store.rows), False))
        queries = _sample_rows(store, query_rows).astype(np.float16)
    exact = scan_store(
        store, queries, options=ScanOptions(topk=cfg.k, config=kernel, return_rows=False)
    ).topk_row
    _, approx = index.search(np.asarray(queries, np.float32), cfg.k)
    meta = {
        "format": FORMAT,
        "factory": factory,
        "config": asdict(cfg),
        "store": {"rows": store.rows, "shards_sha256": [s.sha256 for s in store.shards]},
        "queries": {
            "n": len(queries),
            "store_rows": None if query_rows is None else query_rows.tolist(),
            "sha256": sha256_array(np.asarray(queries)),
        },
        "recall_at_k": recall_at(approx, exact, cfg.k),
        "recall_at_1": recall_at(approx[:, :1], exact[:, :1], 1),
    }
    out = Path(out_dir)
    write_bytes(out / "index.faiss", faiss.serialize_index(index).tobytes())
    write_json(out / "index.json", meta)  # last: marks the index finished
    return meta


class IvfIndex:
    """A built index with its store: ``search`` returns similarities, row ids and keys."""

    def __init__(self, path: Path | str, store: Store):
        import faiss

        path = Path(path)
        self.meta = read_json(path / "index.json")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}/index.json: unknown index format {self.meta.get('format')}")
        if self.meta["store"]["shards_sha256"] != [s.sha256 for s in store.shards]:
            raise ValueError(f"{path}: the index was built over another version of {store.path}")
        data = np.frombuffer((path / "index.faiss").read_bytes(), np.uint8)
        self.index = faiss.deserialize_index(data)
        self.index.nprobe = self.meta["config"]["nprobe"]
        self.store = store

    @property
    def recall_at_k(self) -> float:
        return self.meta["recall_at_k"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sims, rows = self.index.search(np.asarray(queries, np.float32), k)
        return sims, rows, topk_keys(self.store, rows)


def open_ivf(path: Path | str, store: Store | Path | str) -> IvfIndex:
    return IvfIndex(path, store if isinstance(store, Store) else open_store(store))
