"""Key lists: a split as the keys it keeps, which loaders apply on the fly (no resharding)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def read_key_list(path: Path | str, allow_empty: bool = False) -> list[str]:
    """Keys of a split folder (its ``keys.parquet``), a ``.txt`` list (one key per line) or a
    ``.parquet`` file with a ``key`` column. Nulls and repeated keys are errors: a key list that
    repeats keys was not made by simgap, and a silent dedup would hide that."""
    path = Path(path)
    if path.is_dir():
        path = path / "keys.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: key list not found")
    if path.suffix == ".txt":
        keys = [k.strip() for k in path.read_text(encoding="utf-8").splitlines()]
        keys = [k for k in keys if k]
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        if "key" not in table.column_names:
            raise ValueError(f"{path}: no 'key' column (columns: {table.column_names})")
        keys = table.column("key").to_pylist()
        if any(k is None for k in keys):
            raise ValueError(f"{path}: the 'key' column holds nulls")
    else:
        raise ValueError(f"{path}: a key list is a split folder, or a .txt or .parquet file")
    if not keys and not allow_empty:
        raise ValueError(f"{path}: the key list is empty")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: the key list repeats keys")
    return keys
