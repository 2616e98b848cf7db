"""Embedding stores: fp16 L2-normalised ``.npy`` shards, a keys parquet per shard, a manifest.

Layout (DESIGN.md)::

    manifest.json        format, model identity, dim, rows, shards (rows, sha256, skipped counts),
                         numerics (device kind, autocast dtype, TF32, GPU models) when known
    emb/NNNNN.npy        float16 (rows, dim), L2-normalised
    keys/NNNNN.parquet   key + locator columns, same row order

Shards are written atomically and the manifest last, so a store is complete iff its manifest
exists; ``StoreWriter`` resumes by keeping finished shards whose inputs have not changed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import (
    COUNT,
    NAME,
    POSITIVE,
    SHA256,
    Check,
    Optional,
    check_schema,
    read_json,
    read_record,
    sha256_file,
    write_json,
    write_npy,
    write_parquet,
    write_record,
)
from simgap.layout import done_record

FORMAT = "simgap-store/1"
LINK_FORMAT = "simgap-clip-retrieval-link/1"
# What a clip-retrieval folder's model is when nobody said: scanning it against anything is refused.
UNKNOWN_MODEL: dict[str, Any] = {"arch": "unknown", "pretrained": None, "checkpoint_sha256": None}
NORM_TOLERANCE = 1e-2  # fp16 storage of a unit vector has norm within ~1e-3 of 1


class StoreError(ValueError):
    """A store on disk is missing, incomplete or inconsistent."""


# What the readers rely on in manifest.json and the done records (extra keys are allowed).
SKIPPED = Check(
    "counts by reason",
    lambda v: (
        isinstance(v, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v.values())
    ),
)
SHARD_SCHEMA = {
    "name": NAME,
    "rows": COUNT,
    "sha256": SHA256,
    "skipped": Optional(SKIPPED),
    "text_sha256": Optional(SHA256),
    "keys_sha256": Optional(SHA256),  # absent in stores written before it was recorded
}
MANIFEST_SCHEMA = {
    "format": str,
    "model": dict,
    "dim": POSITIVE,
    "rows": COUNT,  # the shards must add up to it: a shard dropped from the list is caught
    "text": Optional(bool),
    "shards": [SHARD_SCHEMA],
}
LINK_SCHEMA = {"format": str, "path": str, "model": dict}
DONE_SCHEMA = {**SHARD_SCHEMA, "skipped": SKIPPED, "fingerprint": str}


def _check_manifest(path: Path, manifest: Any) -> None:
    """Shape and cross-field sums of a simgap manifest, before any reader trusts it."""
    check_schema(manifest, MANIFEST_SCHEMA, str(path))
    shards = manifest["shards"]
    names = [s["name"] for s in shards]
    if len(set(names)) != len(names):
        raise StoreError(f"{path}: shards: a shard name is listed twice")
    if manifest["rows"] != sum(s["rows"] for s in shards):
        raise StoreError(f"{path}: rows: {manifest['rows']} is not the sum of the shards' rows")
    if manifest.get("text") and not all("text_sha256" in s for s in shards):
        raise StoreError(f"{path}: text: true, but a shard has no text_sha256")


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


def open_store(path: Path | str, model: dict[str, Any] | None = None) -> Store:
    """Open a simgap store, a link to a clip-retrieval folder, or a clip-retrieval folder itself
    (``model`` then names the model that made it; unknown if not given)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: no such store folder")
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        if is_clip_retrieval(path):
            return ClipRetrievalStore(path, model)
        raise StoreError(f"{path}: not a finished embedding store (no manifest.json)")
    manifest = read_json(manifest_path, {"format": str})
    if manifest["format"] == LINK_FORMAT:
        check_schema(manifest, LINK_SCHEMA, str(manifest_path))
        return ClipRetrievalStore(Path(manifest["path"]), model or manifest["model"])
    if manifest["format"] != FORMAT:
        raise StoreError(f"{manifest_path}: unknown store format {manifest['format']!r}")
    _check_manifest(manifest_path, manifest)
    return Store(path, manifest)


def is_clip_retrieval(path: Path | str) -> bool:
    return any(_clip_retrieval_files(Path(path)))


def _clip_retrieval_files(path: Path) -> list[Path]:
    found = (path / "img_emb").glob("img_emb_*.npy")
    return [p for p in found if p.stem.rpartition("_")[2].isdigit()]


def link_clip_retrieval(out: Path, folder: Path, model: dict[str, Any]) -> Store:
    """Record which model made a clip-retrieval folder, in a store folder that points at it:
    nothing is copied, the embeddings are read in place."""
    store = ClipRetrievalStore(Path(folder).resolve(), model)
    write_json(
        Path(out) / "manifest.json",
        {"format": LINK_FORMAT, "path": str(store.path), "model": model},
    )
    return store


class ClipRetrievalStore(Store):
    """clip-retrieval's layout read in place: ``img_emb/img_emb_{i}.npy`` (float16 or float32,
    L2-normalised) + ``metadata/metadata_{i}.parquet`` (+ ``text_emb/text_emb_{i}.npy``).

    Shard ``i`` is named ``f"{i:05d}"``. Keys come from the metadata's ``key`` column, else its
    ``image_path``, else the position (``<shard><row>``). float32 files are cast to float16 per
    shard on read. Rows are checked to be unit norm: a sample of each shard on open, all of
    them in :meth:`verify`.
    """

    SAMPLE_ROWS = 1024

    def __init__(self, path: Path, model: dict[str, Any] | None = None):
        path = Path(path)
        files = sorted(_clip_retrieval_files(path), key=_clip_retrieval_index)
        if not files:
            raise StoreError(f"{path}: no img_emb/img_emb_*.npy files (not clip-retrieval layout)")
        text = all(self._file(path, "text", _clip_retrieval_index(f)).exists() for f in files)
        shards, dims, dtypes = [], set(), set()
        for f in files:
            i = _clip_retrieval_index(f)
            emb = self._mmap(f)
            meta = self._file(path, "meta", i)
            if not meta.exists():
                raise StoreError(f"{meta}: missing (metadata of {f})")
            try:
                meta_rows = pq.ParquetFile(meta).metadata.num_rows
            except (OSError, ValueError) as e:
                raise StoreError(f"{meta}: not a readable parquet file ({e})") from None
            if meta_rows != len(emb):
                raise StoreError(f"{f} has {len(emb)} rows but {meta} has {meta_rows}")
            dims.add(emb.shape[1])
            dtypes.add(str(emb.dtype))
            # Hashing 10^8 published rows on every open is too slow; size and mtime of both files
            # still change every fingerprint downstream (scan resume, splits, stage keys) when a
            # file is replaced.
            identity = "stat:" + ":".join(
                f"{st.st_size}:{st.st_mtime_ns}" for st in (Path(f).stat(), meta.stat())
            )
            shards.append({"name": f"{i:05d}", "rows": len(emb), "sha256": identity, "skipped": {}})
        if len(dims) != 1:
            raise StoreError(f"{path}: img_emb files differ in dimension: {sorted(dims)}")
        manifest = {
            "format": "clip-retrieval",
            "model": model or UNKNOWN_MODEL,
            "dim": dims.pop(),
            "dtype": "float16",
            "source_dtype": sorted(dtypes),
            "normalized": True,
            "rows": sum(s["rows"] for s in shards),
            "source": {"layout": "clip-retrieval", "path": str(path)},
            "shards": shards,
            "text": text,
        }
        super().__init__(path, manifest)
        for s in self.shards:
            self._check_norms(s.name, rows=self.SAMPLE_ROWS)

    @staticmethod
    def _file(path: Path, kind: str, i: int) -> Path:
        return {
            "emb": path / "img_emb" / f"img_emb_{i}.npy",
            "text": path / "text_emb" / f"text_emb_{i}.npy",
            "meta": path / "metadata" / f"metadata_{i}.parquet",
        }[kind]

    @staticmethod
    def _mmap(path: Path) -> np.ndarray:
        try:
            emb = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError, SyntaxError) as e:  # SyntaxError: a bad header
            raise StoreError(f"{path}: cannot read embeddings ({e})") from None
        if emb.ndim != 2 or emb.dtype not in (np.float16, np.float32, np.float64):
            raise StoreError(f"{path}: expected a float (rows, dim) array, found {emb.dtype}")
        return emb

    def _read(self, kind: str, shard: str) -> np.ndarray:
        emb = self._mmap(self._file(self.path, kind, int(shard)))
        # float16 files stay memory-mapped; wider ones are cast shard by shard, never copied.
        return emb if emb.dtype == np.float16 else emb.astype(np.float16)

    def read_emb(self, shard: str) -> np.ndarray:
        return self._read("emb", shard)

    def read_text_emb(self, shard: str) -> np.ndarray:
        if not self.has_text:
            raise StoreError(f"{self.path}: no text_emb/text_emb_*.npy for every img_emb file")
        return self._read("text", shard)

    def read_keys(self, shard: str) -> pa.Table:
        path = self._file(self.path, "meta", int(shard))
        try:
            meta = pq.read_table(path)
            if "key" in meta.column_names:
                keys = meta.column("key").cast(pa.string())
                meta = meta.drop_columns(["key"])
            elif "image_path" in meta.column_names:
                keys = meta.column("image_path").cast(pa.string())
            else:
                keys = pa.array([f"{shard}{r:09d}" for r in range(meta.num_rows)], pa.string())
            keys.validate(full=True)  # arrow reads strings unchecked: bad UTF-8 fails here
        except (OSError, ValueError, NotImplementedError) as e:  # unreadable, or keys not text
            raise StoreError(f"{path}: cannot read keys ({e})") from None
        if keys.null_count:
            raise StoreError(f"{path}: {keys.null_count} row(s) without a key")
        if meta.num_rows != self.shards[_shard_index(self.shards, shard)].rows:
            raise StoreError(f"{path}: {meta.num_rows} rows, its embeddings have a different count")
        return meta.add_column(0, "key", keys)

    def _check_norms(self, shard: str, rows: int | None = None) -> None:
        path = self._file(self.path, "emb", int(shard))
        emb = self._mmap(path)
        step = 1 << 16
        for start in range(0, len(emb) if rows is None else min(rows, len(emb)), step):
            block = np.asarray(emb[start : start + step], np.float32)
            norms = np.linalg.norm(block, axis=1)
            bad = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
            if len(bad):
                r = start + int(bad[0])
                raise StoreError(
                    f"{path}: {len(bad)} row(s) not L2-normalised (row {r} has norm "
                    f"{norms[bad[0]]:.4f}); similarity needs unit rows: re-export normalised "
                    "embeddings (clip-retrieval's default)"
                )

    def verify(self) -> None:
        """Every row unit norm, every metadata file as long as its embeddings."""
        for s in self.shards:
            self._check_norms(s.name)
            if self.has_text and len(self.read_text_emb(s.name)) != s.rows:
                raise StoreError(f"{self._file(self.path, 'text', int(s.name))}: row count differs")


def _shard_index(shards: list[ShardInfo], name: str) -> int:
    return next(i for i, s in enumerate(shards) if s.name == name)


def _clip_retrieval_index(path: Path) -> int:
    return int(path.stem.rpartition("_")[2])


# What two stores must share to be compared (of simgap.models.numerics_identity). The rest
# (GPU model, SM count, library versions) changes bytes only at the level of the last rounding,
# as two CPU models do: recorded, not compared.
COMPARED_NUMERICS = ("device", "autocast", "tf32_matmul", "tf32_cudnn")


def compared_numerics(numerics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a store's numerics that must match for two stores to be compared."""
    if numerics is None:
        return None
    return {k: numerics[k] for k in COMPARED_NUMERICS if k in numerics}


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
