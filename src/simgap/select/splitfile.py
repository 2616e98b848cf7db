"""The split file format: a split folder holds ``keys.parquet`` (column ``key``, sorted),
``keys.txt`` (the same keys, one per line, UTF-8) and ``split.json`` (how it was made).

A key list (folder, ``.txt`` or ``.parquet``, :func:`simgap.data.keylist.read_key_list`) is all a
loader needs to apply a split on the fly to the source shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from simgap.data.keylist import read_key_list
from simgap.io import (
    COUNT,
    SHA256,
    Optional,
    read_json,
    sha256_bytes,
    write_bytes,
    write_json,
    write_parquet,
)


def write_split(folder: Path, keys: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Write keys.parquet, keys.txt and split.json (last: a split is complete iff it exists)."""
    keys = sorted(keys)
    folder = Path(folder)
    write_parquet(folder / "keys.parquet", pa.table({"key": pa.array(keys, pa.string())}))
    write_bytes(folder / "keys.txt", "".join(f"{k}\n" for k in keys).encode())
    meta = {**meta, "size": len(keys), "keys_sha256": sha256_bytes("\n".join(keys).encode())}
    write_json(folder / "split.json", meta)
    return meta


# What the readers rely on in split.json (extra keys are allowed).
SPLIT_SCHEMA = {
    "size": COUNT,
    "keys_sha256": SHA256,
    "guarantee": Optional(({"holds": Optional((bool, None))}, None)),
}


def read_split(folder: Path) -> tuple[set[str], dict[str, Any]]:
    """A split's keys and split.json, which must describe the same keys (size and checksum)."""
    folder = Path(folder)
    meta_path = folder / "split.json"
    meta = read_json(meta_path, SPLIT_SCHEMA)
    keys = sorted(read_key_list(folder, allow_empty=True))
    if len(keys) != meta["size"] or sha256_bytes("\n".join(keys).encode()) != meta["keys_sha256"]:
        raise ValueError(
            f"{meta_path}: does not describe {folder / 'keys.parquet'} ({len(keys)} keys; "
            f"split.json says {meta['size']}, or the checksum differs)"
        )
    return set(keys), meta
