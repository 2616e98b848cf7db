"""Embedding stores: fp16 L2-normalised ``.npy`` shards, a keys parquet per shard, a manifest.

Layout (DESIGN.md)::

    manifest.json        format, model identity, dim, rows, shards (rows, sha256, skipped counts)
    emb/NNNNN.npy        float16 (rows, dim), L2-normalised
    keys/NNNNN.parquet   key + locator columns, same row order

Shards are written atomically and the manifest last, so a store is complete iff its manifest
exists; ``StoreWriter`` resumes by keeping finished shards whose inputs have not changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import read_json, sha256_file, write_json, write_npy, write_parquet

FORMAT = "simgap-store/1"
NORM_TOLERANCE = 1e-2  # fp16 storage of a unit vector has norm within ~1e-3 of 1


class StoreError(ValueError):
    """A store on disk is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    offset: int
    sha256: str
    skipped: dict[str, int]


class Store:
    """Read access to a finished embedding store; embeddings are memory-mapped."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        offset = 0
        shards = []
        for s in manifest["shards"]:
            shards.append(
                ShardInfo(s["name"], s["rows"], offset, s["sha256"], s.get("skipped", {}))
            )
            offset += s["rows"]
        self.shards: list[ShardInfo] = shards
        self.rows: int = offset
        self.dim: int = manifest["dim"]
        self.model: dict[str, Any] = manifest["model"]

    def __repr__(self) -> str:
        return f"Store({self.path}, rows={self.rows}, dim={self.dim}, shards={len(self.shards)})"

    def read_emb(self, shard: str) -> np.ndarray:
        path = self.path / "emb" / f"{shard}.npy"
        try:
            emb = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: cannot read embeddings ({e})") from None
        if emb.ndim != 2 or emb.shape[1] != self.dim or emb.dtype != np.float16:
            raise StoreError(
                f"{path}: expected float16 (rows, {self.dim}), found {emb.dtype} {emb.shape}"
            )
        return emb

    def read_keys(self, shard: str) -> pa.Table:
        return pq.read_table(self.path / "keys" / f"{shard}.parquet")

    def iter_blocks(self) -> Iterator[tuple[int, str, np.ndarray]]:
        """Yield (global row offset, shard name, fp16 embeddings) shard by shard."""
        for s in self.shards:
            yield s.offset, s.name, self.read_emb(s.name)

    def embeddings(self) -> np.ndarray:
        """All rows in memory (small stores: benchmarks, the reference set)."""
        if not self.shards:
            return np.zeros((0, self.dim), np.float16)
        return np.concatenate([np.asarray(self.read_emb(s.name)) for s in self.shards])

    def keys_table(self) -> pa.Table:
        tables = [self.read_keys(s.name) for s in self.shards]
        return pa.concat_tables(tables) if tables else pa.table({"key": pa.array([], pa.string())})

    def keys(self) -> list[str]:
        return self.keys_table().column("key").to_pylist()

    def verify(self) -> None:
        """Check every shard's checksum and row count against the manifest."""
        for s in self.shards:
            path = self.path / "emb" / f"{s.name}.npy"
            if sha256_file(path) != s.sha256:
                raise StoreError(f"{path}: checksum does not match {self.path}/manifest.json")
            if len(self.read_emb(s.name)) != s.rows or self.read_keys(s.name).num_rows != s.rows:
                raise StoreError(f"{path}: row count differs from the manifest ({s.rows})")


def open_store(path: Path | str) -> Store:
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: no such store folder")
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise StoreError(f"{path}: not a finished embedding store (no manifest.json)")
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{manifest_path}: unknown store format {manifest.get('format')!r}")
    return Store(path, manifest)


def check_compatible(*stores: Store) -> None:
    """Refuse to compare embeddings made by different similarity models."""
    first = stores[0]
    for other in stores[1:]:
        if other.dim != first.dim:
            raise StoreError(
                f"{other.path}: dim {other.dim} differs from {first.path}: {first.dim}"
            )
        if other.model != first.model:
            raise StoreError(
                f"{other.path} and {first.path} were made by different similarity models "
                f"({other.model} vs {first.model}); re-embed one of them with the same model"
            )


def normalize_fp16(emb: np.ndarray) -> np.ndarray:
    """L2-normalise in float32, then store as float16 (the store's format)."""
    emb = np.asarray(emb, np.float32)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("embeddings contain a zero vector, which has no direction")
    return (emb / norms).astype(np.float16)


class StoreWriter:
    """Writes a store shard by shard; finished shards survive a kill and are reused on rerun."""

    def __init__(self, path: Path, model: dict[str, Any], dim: int, source: dict[str, Any]):
        self.path = Path(path)
        self.model = model
        self.dim = dim
        self.source = source
        (self.path / "emb").mkdir(parents=True, exist_ok=True)
        (self.path / "keys").mkdir(parents=True, exist_ok=True)

    def _done_path(self, name: str) -> Path:
        return self.path / "done" / f"{name}.json"

    def done_record(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The shard's record if it was finished from the same input fingerprint."""
        path = self._done_path(name)
        if not path.exists():
            return None
        record = read_json(path)
        return record if record.get("fingerprint") == fingerprint else None

    def write_shard(
        self,
        name: str,
        emb: np.ndarray,
        keys: pa.Table,
        fingerprint: str = "",
        skipped: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        if emb.shape != (keys.num_rows, self.dim) or emb.dtype != np.float16:
            raise ValueError(
                f"shard {name}: embeddings {emb.dtype} {emb.shape} do not match "
                f"{keys.num_rows} keys of dim {self.dim} (float16 expected)"
            )
        emb_path = self.path / "emb" / f"{name}.npy"
        write_npy(emb_path, emb)
        write_parquet(self.path / "keys" / f"{name}.parquet", keys)
        record = {
            "name": name,
            "rows": int(emb.shape[0]),
            "sha256": sha256_file(emb_path),
            "skipped": dict(sorted((skipped or {}).items())),
            "fingerprint": fingerprint,
        }
        # The done record is written last: it is what marks the shard finished.
        write_json(self._done_path(name), record)
        return record

    def finish(self, records: list[dict[str, Any]]) -> Store:
        records = sorted(records, key=lambda r: r["name"])
        seen: dict[str, str] = {}
        for r in records:
            for key in pq.read_table(self.path / "keys" / f"{r['name']}.parquet").column("key"):
                k = key.as_py()
                if k in seen:
                    raise StoreError(
                        f"{self.path}: duplicate key {k!r} in shards {seen[k]} and {r['name']}"
                    )
                seen[k] = r["name"]
        manifest = {
            "format": FORMAT,
            "model": self.model,
            "dim": self.dim,
            "dtype": "float16",
            "normalized": True,
            "rows": sum(r["rows"] for r in records),
            "source": self.source,
            "shards": [{k: r[k] for k in ("name", "rows", "sha256", "skipped")} for r in records],
        }
        write_json(self.path / "manifest.json", manifest)
        return Store(self.path, manifest)


def write_store(
    path: Path, emb: np.ndarray, keys: list[str], model: dict[str, Any], shard_rows: int = 100_000
) -> Store:
    """Write in-memory embeddings as a store (tests, benchmarks, imports)."""
    emb = normalize_fp16(emb) if emb.dtype != np.float16 else emb
    writer = StoreWriter(path, model, emb.shape[1], {"kind": "array"})
    records = []
    for i, start in enumerate(range(0, max(len(emb), 1), shard_rows)):
        stop = min(start + shard_rows, len(emb))
        table = pa.table({"key": pa.array(keys[start:stop], pa.string())})
        records.append(writer.write_shard(f"{i:05d}", emb[start:stop], table))
    return writer.finish(records)
