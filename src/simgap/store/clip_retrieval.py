"""clip-retrieval folders read in place, and links that record which model made one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import write_json
from simgap.store.format import LINK_FORMAT, NORM_TOLERANCE, UNKNOWN_MODEL, ShardInfo, StoreError
from simgap.store.reader import Store


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
