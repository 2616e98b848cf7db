"""CSV/TSV/parquet tables of image paths and captions (open_clip's csv convention).

A table names one image per row (column ``filepath`` by default, open_clip's ``--csv-img-key``)
and its caption (``title``, ``--csv-caption-key``). Keys come from a key column when one is
named, else from the row position (fixed width, as img2dataset's ``compute_key``), so they are
stable across reruns. Relative image paths are taken relative to the table's folder, so a table
and its images can move together.

A :class:`TableSpec` round-trips through a locator string (``rows.csv#img_key=filepath&...``):
the store's ``source`` column records it, and :func:`table_samples` finds rows again by key.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from simgap.data.tars import sample_key

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
KEY_WIDTH = 9

Row = tuple[str, str, str | None]  # key, image path, caption


@dataclass(frozen=True)
class TableSpec:
    path: str
    img_key: str = "filepath"
    caption_key: str = "title"  # "" for a table without captions
    key_column: str = ""  # "" derives keys from the row position
    separator: str = ""  # "" → tab for .tsv; for .csv, tab if the header has one, else comma

    def locator(self) -> str:
        defaults = TableSpec(self.path)
        options = {
            name: getattr(self, name)
            for name in ("img_key", "caption_key", "key_column", "separator")
            if getattr(self, name) != getattr(defaults, name)
        }
        return f"{self.path}#{urlencode(options)}" if options else self.path

    @classmethod
    def from_locator(cls, locator: str) -> TableSpec:
        path, _, fragment = str(locator).partition("#")
        options = dict(parse_qsl(fragment, keep_blank_values=True))
        unknown = set(options) - {"img_key", "caption_key", "key_column", "separator"}
        if unknown:
            raise ValueError(f"{locator}: unknown table options {sorted(unknown)}")
        return cls(path, **options)


def is_table(spec: str | Path) -> bool:
    return str(spec).partition("#")[0].lower().endswith(TABLE_SUFFIXES)


def _separator(spec: TableSpec) -> str:
    if spec.separator:
        return spec.separator
    if spec.path.lower().endswith(".tsv"):
        return "\t"
    with open(spec.path, encoding="utf-8", errors="replace") as f:
        header = f.readline()
    return "\t" if "\t" in header else ","


def read_table(spec: TableSpec) -> pa.Table:
    path = Path(spec.path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found")
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        sep = _separator(spec)
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=sep), [])
        # Every column as text: a numeric-looking key column must keep its leading zeros.
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())),
        )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read table ({e})") from None


def _column(table: pa.Table, name: str, spec: TableSpec, option: str) -> list:
    if name not in table.column_names:
        raise ValueError(
            f"{spec.path}: no column {name!r} (the {option}); columns are {table.column_names}"
        )
    return table.column(name).to_pylist()


def table_rows(spec: TableSpec) -> list[Row]:
    """(key, image path, caption) per row; a duplicate key is an error naming both rows."""
    table = read_table(spec)
    paths = _column(table, spec.img_key, spec, "image column, --csv-img-key")
    captions = (
        _column(table, spec.caption_key, spec, "caption column, --csv-caption-key")
        if spec.caption_key
        else [None] * len(paths)
    )
    if spec.key_column:
        column = _column(table, spec.key_column, spec, "key column, --csv-key")
        keys = [sample_key(str(k)) for k in column]
    else:
        keys = [f"{i:0{KEY_WIDTH}d}" for i in range(len(paths))]
    root = Path(spec.path).parent
    rows: list[Row] = []
    first_row: dict[str, int] = {}
    for i, (key, image, caption) in enumerate(zip(keys, paths, captions, strict=True)):
        if key in first_row:
            raise ValueError(
                f"{spec.path}: duplicate key {key!r} at rows {first_row[key]} and {i} "
                "(rows counted from 0 after the header)"
            )
        first_row[key] = i
        if image is None or image == "":
            raise ValueError(f"{spec.path}: row {i} (key {key!r}) has no image path")
        rows.append((key, str(root / image), caption))
    if not rows:
        raise ValueError(f"{spec.path}: table holds no rows")
    return rows


def table_samples(locator: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """Rows of a table found again by key: {key: {image extension: bytes, "txt": caption}}."""
    found: dict[str, dict[str, bytes]] = {}
    for key, image, caption in table_rows(TableSpec.from_locator(locator)):
        if key not in keys or not Path(image).is_file():
            continue
        members = {Path(image).suffix.lower().lstrip("."): Path(image).read_bytes()}
        if caption is not None:
            members["txt"] = caption.encode()
        found[key] = members
    return found
