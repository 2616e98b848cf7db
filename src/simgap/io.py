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


def error_line(e: BaseException) -> str:
    """An error as the one line the CLI prints: libraries (pyarrow, numpy) put newlines in
    their messages, which would break ``simgap: error: <file>: <problem>`` across lines."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


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


def read_json(path: Path, schema: Any = None) -> Any:
    """Parse a JSON file; with ``schema`` (see :func:`check_schema`) its shape is checked too, so
    a reader never meets a missing key or a wrong type as a bare KeyError/TypeError."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if schema is not None:
        check_schema(doc, schema, str(path))
    return doc


class Check:
    """A schema leaf with a condition beyond the type: ``Check("a count >= 0", is_count)``."""

    def __init__(self, description: str, test: Callable[[Any], bool]):
        self.description, self.test = description, test


class Optional:
    """A dict key that may be absent (when present, it must match ``schema``)."""

    def __init__(self, schema: Any):
        self.schema = schema


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


COUNT = Check("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = Check("an integer > 0", lambda v: _is_int(v) and v > 0)
SHA256 = Check(
    "a SHA-256 hex digest",
    lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
)
# A file name inside a folder the reader owns: never a path that leaves it.
NAME = Check(
    "a plain file name",
    lambda v: isinstance(v, str) and v not in ("", ".", "..") and not set(v) & set("/\\\0"),
)


def _describe(schema: Any) -> str:
    if isinstance(schema, Check):
        return schema.description
    if isinstance(schema, dict):
        return "an object"
    if isinstance(schema, list):
        return "a list"
    if isinstance(schema, tuple):
        return " or ".join(_describe(s) for s in schema)
    if schema is None:
        return "null"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        schema, schema.__name__
    )


def _matches_leaf(value: Any, schema: Any) -> bool:
    if isinstance(schema, Check):
        return bool(schema.test(value))
    if schema is None:
        return value is None
    if schema is int:
        return _is_int(value)
    if schema is float:
        return (_is_int(value) or isinstance(value, float)) and value == value  # not NaN
    return isinstance(value, schema)


def check_schema(value: Any, schema: Any, where: str, at: str = "") -> None:
    """Raise ValueError naming ``where`` (the file) and the key path unless ``value`` has the
    shape of ``schema``: a type, a :class:`Check`, ``None``, a tuple of alternatives, ``[item]``
    for a list, or ``{key: schema}`` for an object (extra keys allowed; :class:`Optional` keys
    may be missing)."""
    label = at or "top level"
    if isinstance(schema, tuple):
        for alternative in schema:
            try:
                check_schema(value, alternative, where, at)
                return
            except ValueError:
                continue
    elif isinstance(schema, dict):
        if isinstance(value, dict):
            for key, sub in schema.items():
                if key not in value:
                    if not isinstance(sub, Optional):
                        raise ValueError(f"{where}: missing key {_join(at, key)!r}")
                    continue
                sub = sub.schema if isinstance(sub, Optional) else sub
                check_schema(value[key], sub, where, _join(at, key))
            return
    elif isinstance(schema, list):
        if isinstance(value, list):
            for i, item in enumerate(value):
                check_schema(item, schema[0], where, f"{at}[{i}]")
            return
    elif _matches_leaf(value, schema):
        return
    found = "null" if value is None else f"{type(value).__name__} {_short(value)}"
    raise ValueError(f"{where}: {label}: expected {_describe(schema)}, found {found}")


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def write_npy(path: Path, array: np.ndarray) -> None:
    array = np.require(np.asarray(array), requirements="C")

    # np.save writes the data with tofile(), whose failure hides errno ("40 requested and 19
    # written"); writing through the file object keeps ENOSPC/EFBIG and their messages.
    def write(f: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.reshape(-1).view(np.uint8).data if array.size else b"")

    write_atomic(path, write)


def write_parquet(path: Path, table: pa.Table, compression: str = "zstd") -> None:
    # Parquet needs a seekable sink; buffer in memory (tables here are per-shard and small).
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
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


RECORD_CHECK = "record_sha256"


def _record_digest(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != RECORD_CHECK}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_record(path: Path, obj: dict[str, Any], compact: bool = False) -> None:
    """Write a done/index record with a checksum of its own content: a resumed run trusts what
    a record says (offsets, counts) without redoing the work, so damage must be detectable."""
    obj = {**obj, RECORD_CHECK: _record_digest(obj)}
    if compact:
        write_bytes(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
    else:
        write_json(path, obj)


def read_record(path: Path, schema: Any = None) -> dict[str, Any] | None:
    """A record written by :func:`write_record`, or None when it is missing or damaged (not
    JSON, not matching ``schema``, or its checksum disagrees): the caller then redoes the work,
    whose inputs are still there."""
    try:
        doc = read_json(path, schema)
    except ValueError:
        return None
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or doc.get(RECORD_CHECK) != _record_digest(doc):
        return None
    del doc[RECORD_CHECK]  # the record as its writer made it
    return doc
