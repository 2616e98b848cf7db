"""Atomic, reproducible file writes: every output lands under its final name whole or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; outputs are data others read, like any file written with open().
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        # A full disk must say which file and which disk; the previous file is untouched.
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            e.errno,
            f"{path}: cannot write: {e.strerror or e} ({free} bytes free on that disk; "
            "the previous version, if any, is intact)",
        ) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_npy(path: Path, array: np.ndarray) -> None:
    array = np.require(np.asarray(array), requirements="C")

    # np.save writes the data with tofile(), whose failure hides errno ("40 requested and 19
    # written"); writing through the file object keeps ENOSPC/EFBIG and their messages.
    def write(f: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.reshape(-1).view(np.uint8).data if array.size else b"")

    write_atomic(path, write)


def write_parquet(path: Path, table: pa.Table) -> None:
    # Parquet needs a seekable sink; buffer in memory (tables here are per-shard and small).
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(path, buf.getvalue())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_array(a: np.ndarray | None) -> str | None:
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def fingerprint(inputs: Any) -> str:
    """The identity of a resumable step's inputs: sha256 of their canonical JSON (sorted keys;
    paths and other objects by ``str``). Done records and stage keys compare these."""
    return sha256_bytes(json.dumps(inputs, sort_keys=True, default=str).encode())
