"""Reading a finished simgap store (memory-mapped), and the check that two stores compare."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import sha256_file
from simgap.store.format import UNKNOWN_MODEL, ShardInfo, StoreError, compared_numerics


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
        return self._load_fp16(self.path / "emb" / f"{shard}.npy")

    def _load_fp16(self, path: Path) -> np.ndarray:
        try:
            emb = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError, SyntaxError) as e:  # SyntaxError: a bad header
            raise StoreError(f"{path}: cannot read embeddings ({e})") from None
        if emb.ndim != 2 or emb.shape[1] != self.dim or emb.dtype != np.float16:
            raise StoreError(
                f"{path}: expected float16 (rows, {self.dim}), found {emb.dtype} {emb.shape}"
            )
        return emb

    def read_keys(self, shard: str) -> pa.Table:
        path = self.path / "keys" / f"{shard}.parquet"
        # parquet pages carry no checksum: a damaged byte could change a key and still parse.
        expected = self._keys_sums().get(shard)
        if expected and path.is_file() and sha256_file(path) != expected:
            raise StoreError(f"{path}: checksum does not match {self.path}/manifest.json")
        try:
            table = pq.read_table(path)
            table.validate(full=True)  # arrow reads strings unchecked: bad UTF-8 fails here
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: cannot read keys ({e})") from None
        key = table.schema.field("key").type if "key" in table.column_names else None
        if key not in (pa.string(), pa.large_string()):
            raise StoreError(f"{path}: expected a string 'key' column, found {key}")
        if table.column("key").null_count:
            raise StoreError(f"{path}: the 'key' column holds nulls")
        return table

    def _keys_sums(self) -> dict[str, str]:
        return {s["name"]: s["keys_sha256"] for s in self.manifest["shards"] if "keys_sha256" in s}

    @property
    def has_text(self) -> bool:
        """Whether caption (text) embeddings are stored beside the image embeddings."""
        return bool(self.manifest.get("text", False))

    @property
    def numerics(self) -> dict[str, Any] | None:
        """The numerics the embeddings were made with (``simgap.models.numerics_identity``:
        device kind, autocast dtype, TF32 settings, and on GPUs the GPU models); None when not
        recorded (stores written before it was, arrays, clip-retrieval folders)."""
        return self.manifest.get("numerics")

    def read_text_emb(self, shard: str) -> np.ndarray:
        """float16 (rows, dim) L2-normalised caption embeddings, row-aligned with ``read_emb``."""
        if not self.has_text:
            raise StoreError(f"{self.path}: store holds no text embeddings (embed with --text)")
        return self._load_fp16(self.path / "text" / f"{shard}.npy")

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
        text_sums = {s["name"]: s.get("text_sha256") for s in self.manifest["shards"]}
        for s in self.shards:
            path = self.path / "emb" / f"{s.name}.npy"
            if sha256_file(path) != s.sha256:
                raise StoreError(f"{path}: checksum does not match {self.path}/manifest.json")
            text = self.path / "text" / f"{s.name}.npy"
            if self.has_text and sha256_file(text) != text_sums[s.name]:
                raise StoreError(f"{text}: checksum does not match {self.path}/manifest.json")
            if len(self.read_emb(s.name)) != s.rows or self.read_keys(s.name).num_rows != s.rows:
                raise StoreError(f"{path}: row count differs from the manifest ({s.rows})")


def check_compatible(*stores: Store, mixed_numerics: bool = False) -> None:
    """Refuse to compare embeddings made by different similarity models, or (unless
    ``mixed_numerics``) with different numerics: bf16 autocast on a GPU against float32 on the
    CPU moves similarities by ~1e-3 to 1e-2, enough to shift thresholds and gap decisions.
    Stores that do not record their numerics are not checked for them."""
    first = stores[0]
    for store in stores:
        if len(stores) > 1 and store.model == UNKNOWN_MODEL:
            raise StoreError(
                f"{store.path}: the model that made these embeddings is unknown; record it with "
                "`simgap embed FOLDER -o LINK --model ... --checkpoint ...` (same flags as the "
                "stores it is compared with) and use LINK"
            )
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
    if mixed_numerics:
        return
    known = [(s, compared_numerics(s.numerics)) for s in stores if s.numerics is not None]
    for other, numerics in known[1:]:
        base, expected = known[0]
        if numerics != expected:
            keys = sorted(set(numerics) | set(expected))
            differ = {
                k: (numerics.get(k), expected.get(k))
                for k in keys
                if numerics.get(k) != expected.get(k)
            }
            raise StoreError(
                f"{other.path} and {base.path} were embedded with different numerics "
                f"(this vs that: {differ}); similarities across them differ by up to ~1e-2. "
                "Re-embed one with the same device and precision, or allow mixed numerics "
                "explicitly (check_compatible(..., mixed_numerics=True))"
            )
