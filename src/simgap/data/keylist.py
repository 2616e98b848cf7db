"""Key lists: a split as the keys it keeps, which loaders apply on the fly (no resharding)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
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
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        # Only newlines separate keys: str.splitlines would also cut at \x1c, \x85, U+2028 ...
        keys = [k.strip() for k in text.split("\n")]
        keys = [k for k in keys if k]
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
            table.validate(full=True)  # arrow reads strings unchecked: bad UTF-8 fails here
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        if "key" not in table.column_names:
            raise ValueError(f"{path}: no 'key' column (columns: {table.column_names})")
        kind = table.schema.field("key").type
        if kind not in (pa.string(), pa.large_string()):
            raise ValueError(f"{path}: the 'key' column holds {kind}, not strings")
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
