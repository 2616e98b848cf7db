"""Writing a store shard by shard, resumable, and the manifest last."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import (
    read_record,
    sha256_file,
    write_json,
    write_npy,
    write_parquet,
    write_record,
)
from simgap.layout import done_record
from simgap.store.format import (
    COMPARED_NUMERICS,
    DONE_SCHEMA,
    FORMAT,
    StoreError,
    compared_numerics,
)
from simgap.store.reader import Store


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
        return done_record(self.path, name)

    def done_record(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The shard's record if it was finished from the same input fingerprint. A record that
        does not parse, lacks a field or disagrees with the shard's file is not trusted: the
        shard is made again (a done record is a cache; the shard's inputs are still there)."""
        path = self._done_path(name)
        if not path.exists():
            return None
        record = read_record(path, DONE_SCHEMA)
        if record is None or record["fingerprint"] != fingerprint or record["name"] != name:
            return None
        emb, text = self.path / "emb" / f"{name}.npy", self.path / "text" / f"{name}.npy"
        # One hash of the shard's file (far cheaper than embedding it again) keeps a damaged
        # record from putting a wrong checksum or row count into the manifest.
        if not emb.is_file() or sha256_file(emb) != record["sha256"]:
            return None
        if "text_sha256" in record and (
            not text.is_file() or sha256_file(text) != record["text_sha256"]
        ):
            return None
        keys = self.path / "keys" / f"{name}.parquet"
        if "keys_sha256" in record and (
            not keys.is_file() or sha256_file(keys) != record["keys_sha256"]
        ):
            return None
        try:
            rows = np.load(emb, mmap_mode="r").shape[0]
        except (OSError, ValueError, IndexError):
            return None
        return record if rows == record["rows"] else None

    def write_shard(
        self,
        name: str,
        emb: np.ndarray,
        keys: pa.Table,
        fingerprint: str = "",
        skipped: dict[str, int] | None = None,
        text_emb: np.ndarray | None = None,
        *,
        numerics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        for what, array in (("embeddings", emb), ("text embeddings", text_emb)):
            if array is None:
                continue
            if array.shape != (keys.num_rows, self.dim) or array.dtype != np.float16:
                raise ValueError(
                    f"shard {name}: {what} {array.dtype} {array.shape} do not match "
                    f"{keys.num_rows} keys of dim {self.dim} (float16 expected)"
                )
        emb_path = self.path / "emb" / f"{name}.npy"
        write_npy(emb_path, emb)
        keys_path = self.path / "keys" / f"{name}.parquet"
        write_parquet(keys_path, keys)
        record = {
            "name": name,
            "rows": int(emb.shape[0]),
            "sha256": sha256_file(emb_path),
            "keys_sha256": sha256_file(keys_path),
            "skipped": dict(sorted((skipped or {}).items())),
            "fingerprint": fingerprint,
        }
        if text_emb is not None:
            text_path = self.path / "text" / f"{name}.npy"
            write_npy(text_path, text_emb)
            record["text_sha256"] = sha256_file(text_path)
        if numerics is not None:
            record["numerics"] = numerics
        # The done record is written last: it is what marks the shard finished.
        write_record(self._done_path(name), record)
        return record

    def _check_unique_keys(self, records: list[dict[str, Any]]) -> None:
        """A key must name one sample: a repeat is an error naming both locations."""

        def keys_of(name: str) -> tuple[list[str], list[str]]:
            table = pq.read_table(self.path / "keys" / f"{name}.parquet")
            keys = table.column("key").to_pylist()
            has_source = "source" in table.column_names
            return keys, table.column("source").to_pylist() if has_source else [""] * len(keys)

        names = [r["name"] for r in records]
        repeated = _repeated_hashes(names, lambda name: keys_of(name)[0], self.path)
        if not repeated:
            return
        # Confirm on the strings: a hash match may be two different keys.
        seen: dict[str, tuple[str, str]] = {}
        for name in names:
            for k, source in zip(*keys_of(name), strict=True):
                if hash(k) not in repeated:
                    continue
                if k in seen:
                    first_shard, first_source = seen[k]
                    where = f" ({first_source} and {source})" if source else ""
                    raise StoreError(
                        f"{self.path}: duplicate key {k!r} in shards {first_shard} and "
                        f"{name}{where}"
                    )
                seen[k] = (name, source)

    def finish(self, records: list[dict[str, Any]]) -> Store:
        records = sorted(records, key=lambda r: r["name"])
        self._check_unique_keys(records)
        text = [("text_sha256" in r) for r in records]
        if any(text) and not all(text):
            raise StoreError(f"{self.path}: some shards have text embeddings and some do not")
        manifest = {
            "format": FORMAT,
            "model": self.model,
            "dim": self.dim,
            "dtype": "float16",
            "normalized": True,
            "rows": sum(r["rows"] for r in records),
            "source": self.source,
            "shards": [
                {
                    k: r[k]
                    for k in ("name", "rows", "sha256", "keys_sha256", "skipped", "text_sha256")
                    if k in r
                }
                for r in records
            ],
        }
        if records and all(text):
            manifest["text"] = True
        numerics = _store_numerics(self.path, records)
        if numerics is not None:
            manifest["numerics"] = numerics
        write_json(self.path / "manifest.json", manifest)
        return Store(self.path, manifest)


def _store_numerics(path: Path, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One store, one numerics: the compared part (``COMPARED_NUMERICS``) must be the same for
    every shard; the hardware of a heterogeneous cluster is listed (``hardware``)."""
    # A shard without numerics was kept from a run before they were recorded: kept because its
    # fingerprint (device kind and dtype, and on a GPU the GPU) matches, so it shares them.
    records = [r for r in records if "numerics" in r]
    known = [r["numerics"] for r in records]
    if not known:
        return None
    compared = [compared_numerics(n) for n in known]
    for record, c in zip(records, compared, strict=True):
        if c != compared[0]:
            raise StoreError(
                f"{path}: shard {record['name']} was embedded with other numerics ({c}) than "
                f"shard {records[0]['name']} ({compared[0]}); re-embed with one device and "
                "precision"
            )
    hardware = {
        tuple(sorted((k, v) for k, v in n.items() if k not in COMPARED_NUMERICS)) for n in known
    }
    out = dict(compared[0])
    if any(hardware):
        out["hardware"] = [dict(h) for h in sorted(hardware)]
    return out


BUCKET_ROWS = 1 << 22  # hashes compared at once by the duplicate-key check (32 MiB)


def _repeated_hashes(
    names: list[str], keys_of: Callable[[str], list[str]], scratch: Path
) -> set[int]:
    """Hashes that occur more than once among all shards' keys, in memory bounded by
    ``BUCKET_ROWS`` whatever the store's size (4e8 LAION keys do not fit in a set).

    Each shard's key hashes are spilled sorted to ``scratch``; the hash range is then cut into
    buckets, and each bucket gathers its slice of every shard (a binary search in each sorted
    spill) and looks for equal neighbours. Python's ``hash`` is salted per process, which is
    fine: every hash here is made and compared in this call.
    """
    for stale in scratch.glob(".keycheck-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    spill = Path(tempfile.mkdtemp(prefix=".keycheck-", dir=scratch))
    try:
        total = 0
        for i, name in enumerate(names):
            keys = keys_of(name)
            hashes = np.fromiter(map(hash, keys), np.int64, len(keys))
            np.save(spill / f"{i}.npy", np.sort(hashes))
            total += len(keys)
        if total == 0:
            return set()
        parts = [np.load(spill / f"{i}.npy", mmap_mode="r") for i in range(len(names))]
        buckets = max(1, -(-total // BUCKET_ROWS))
        edges = np.linspace(-(2.0**63), 2.0**63, buckets + 1)
        bounds = [np.iinfo(np.int64).min, *(int(e) for e in edges[1:-1]), None]
        repeated: set[int] = set()
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            chunk = np.concatenate(
                [
                    p[np.searchsorted(p, lo) : len(p) if hi is None else np.searchsorted(p, hi)]
                    for p in parts
                ]
            )
            chunk.sort()
            repeated.update(chunk[1:][chunk[1:] == chunk[:-1]].tolist())
        return repeated
    finally:
        shutil.rmtree(spill, ignore_errors=True)


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
