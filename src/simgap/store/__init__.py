"""Embedding stores: fp16 L2-normalised ``.npy`` shards, a keys parquet per shard, a manifest.

Layout (DESIGN.md)::

    manifest.json        format, model identity, dim, rows, shards (rows, sha256, skipped counts),
                         numerics (device kind, autocast dtype, TF32, GPU models) when known
    emb/NNNNN.npy        float16 (rows, dim), L2-normalised
    keys/NNNNN.parquet   key + locator columns, same row order

Shards are written atomically and the manifest last, so a store is complete iff its manifest
exists; ``StoreWriter`` resumes by keeping finished shards whose inputs have not changed.

Modules: ``format`` (names, schemas, checks), ``reader`` (``Store``), ``clip_retrieval`` (folders
read in place), ``opening`` (``open_store``: any kind), ``writer`` (``StoreWriter``). This package
is the public interface; callers import from ``simgap.store``.
"""

from simgap.store.clip_retrieval import ClipRetrievalStore, is_clip_retrieval, link_clip_retrieval
from simgap.store.format import UNKNOWN_MODEL, ShardInfo, StoreError
from simgap.store.opening import open_store
from simgap.store.reader import Store, check_compatible
from simgap.store.writer import StoreWriter, normalize_fp16, write_store

__all__ = [
    "UNKNOWN_MODEL",
    "ClipRetrievalStore",
    "ShardInfo",
    "Store",
    "StoreError",
    "StoreWriter",
    "check_compatible",
    "is_clip_retrieval",
    "link_clip_retrieval",
    "normalize_fp16",
    "open_store",
    "write_store",
]
