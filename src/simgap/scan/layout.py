"""The scan folder on disk: what one scan of a base store against a set of tests writes.

::

    scan.json              format, sizes, shards (name, offset, rows), input fingerprints, rows
                           excluded as bad; written last: a folder is a finished scan iff it exists
    inputs/tests.npy       the tests as scanned, (M, d) float16/float32, in test index order
    inputs/thresholds.npy  float32 (M,), only with thresholds
    tests/topk_sim.npy     float32 (M, k), descending; -inf padding when the base has < k rows
    tests/topk_row.npy     int64 (M, k) global base row ids; -1 padding
    tests/count_above.npy  int64 (M,) base rows with similarity > threshold; only with thresholds
    tests/tests.parquet    one row per test: test (index), the caller's columns (benchmark, key),
                           threshold, count_above, nn_sim, nn_key, topk_sim, topk_key (lists)
    rows/<shard>.npy       structured per base row: max f4, argmax i4 (test index), margin f4;
                           a scan of several benchmarks (scan.json ``benchmarks``: name and test
                           range of each) holds one of each per benchmark: max f4[B], ...
    parts/<shard>.npy      per-shard per-test partial (sim f4[k], row i8[k], count i8)
    done/<shard>.json      the shard's done record (fingerprint of its inputs, rows, bad rows)

Excluded rows (a keep mask, or bad rows skipped) have max/margin NaN and argmax -1.

``simgap scan``, ``simgap select`` and ``simgap run`` all write and read this one layout: a scan
of several benchmarks is one folder, and ``benchmark_rows`` / ``benchmark_scan`` read one
benchmark's part of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import (
    COUNT,
    NAME,
    Optional,
    check_schema,
    read_json,
    write_json,
    write_npy,
    write_parquet,
)
from simgap.scan.scan import ScanResult

FORMAT = "simgap-scan/2"
# What the readers rely on in scan.json (extra keys are allowed).
META_SCHEMA = {
    "format": str,
    "tests": COUNT,
    "topk": COUNT,
    "thresholds": bool,
    "rows": COUNT,
    "shards": [{"name": NAME, "offset": COUNT, "rows": COUNT}],
    "bad_rows": Optional({"count": COUNT}),
}


def row_records(mx: np.ndarray, arg: np.ndarray, margin: np.ndarray | None) -> np.ndarray:
    """Per-row outputs as one structured array; (n, B) inputs (B benchmarks) become B-wide
    fields."""
    shape = mx.shape[1:]
    fields = [("max", "<f4", shape), ("argmax", "<i4", shape)] + (
        [("margin", "<f4", shape)] if margin is not None else []
    )
    rec = np.empty(len(mx), dtype=fields)
    rec["max"], rec["argmax"] = mx, arg
    if margin is not None:
        rec["margin"] = margin
    return rec


def part_records(sim: np.ndarray, row: np.ndarray, count: np.ndarray | None) -> np.ndarray:
    """One shard's per-test partial as one structured array (one file, one atomic write)."""
    k = sim.shape[1]
    rec = np.empty(len(sim), dtype=[("sim", "<f4", (k,)), ("row", "<i8", (k,)), ("count", "<i8")])
    rec["sim"], rec["row"] = sim, row
    rec["count"] = 0 if count is None else count
    return rec


def write_tests_and_meta(
    result: ScanResult,
    out: Path,
    shards: list[dict[str, Any]],
    test_table: pa.Table | None,
    meta: dict[str, Any],
) -> None:
    """Per-test outputs, then ``scan.json`` (last: it marks the folder finished)."""
    write_npy(out / "tests" / "topk_sim.npy", result.topk_sim)
    write_npy(out / "tests" / "topk_row.npy", result.topk_row)
    if result.count_above is not None:
        write_npy(out / "tests" / "count_above.npy", result.count_above)
    if test_table is not None:
        write_parquet(out / "tests" / "tests.parquet", test_table)
    doc = {
        "format": FORMAT,
        "tests": int(result.topk_sim.shape[0]),
        "topk": int(result.topk_sim.shape[1]),
        "thresholds": result.count_above is not None,
        "rows": int(sum(s["rows"] for s in shards)),
        "shards": shards,
        **meta,
    }
    write_json(out / "scan.json", doc)


def test_table(
    result: ScanResult,
    info: pa.Table | None,
    thresholds: np.ndarray | None,
    topk_key: np.ndarray | None,
) -> pa.Table:
    """One row per test: its index, the caller's columns (benchmark, key), and its outputs."""
    m, k = result.topk_sim.shape
    cols: dict[str, Any] = {"test": pa.array(np.arange(m, dtype=np.int64))}
    if info is not None:
        if info.num_rows != m:
            raise ValueError(f"test info has {info.num_rows} rows for {m} tests")
        cols.update({name: info.column(name) for name in info.column_names})
    if thresholds is not None:
        cols["threshold"] = pa.array(np.asarray(thresholds, np.float32))
        cols["count_above"] = pa.array(result.count_above)
    if k:
        nn = result.topk_sim[:, 0]
        cols["nn_sim"] = pa.array(nn, mask=~np.isfinite(nn))
        sims = pa.array(result.topk_sim.reshape(-1))
        cols["topk_sim"] = pa.FixedSizeListArray.from_arrays(sims, k)
        if topk_key is not None:
            cols["nn_key"] = pa.array(topk_key[:, 0], pa.string())
            keys = pa.array(topk_key.reshape(-1), pa.string())
            cols["topk_key"] = pa.FixedSizeListArray.from_arrays(keys, k)
    return pa.table(cols)


def write_scan(result: ScanResult, out_dir: Path | str, shard_name: str = "all") -> None:
    """Write an in-memory result (all rows as one shard) in the scan folder layout."""
    out = Path(out_dir)
    if result.row_max is None or result.row_argmax is None:
        raise ValueError("write_scan needs per-row outputs (scan with collect_rows=True)")
    write_npy(
        out / "rows" / f"{shard_name}.npy",
        row_records(result.row_max, result.row_argmax, result.row_margin),
    )
    n = len(result.row_max)
    shards = [{"name": shard_name, "offset": 0, "rows": n}]
    write_tests_and_meta(result, out, shards, None, {"inputs": {}})


def read_meta(out: Path | str) -> dict[str, Any]:
    out = Path(out)
    if not (out / "scan.json").exists():
        raise FileNotFoundError(f"{out}: not a finished scan (no scan.json)")
    doc = read_json(out / "scan.json", {"format": str})
    if doc["format"] != FORMAT:
        raise ValueError(f"{out}/scan.json: unknown scan format {doc['format']!r}")
    check_schema(doc, META_SCHEMA, f"{out}/scan.json")
    offset = 0
    for s in doc["shards"]:
        if s["offset"] != offset:
            raise ValueError(
                f"{out}/scan.json: shard {s['name']}: offset {s['offset']}, not {offset}"
            )
        offset += s["rows"]
    if offset != doc["rows"]:
        raise ValueError(f"{out}/scan.json: rows {doc['rows']} is not the shards' sum {offset}")
    return doc


def _load(path: Path, dtype: str, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
    """A scan output array, checked against what scan.json says it holds."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if a.dtype != np.dtype(dtype) or a.shape[: len(shape)] != shape or a.ndim != len(shape):
        raise ValueError(f"{path}: expected {dtype} {shape}, found {a.dtype} {a.shape}")
    return a


def iter_scan_rows(out_dir: Path | str) -> Iterator[tuple[str, int, np.ndarray]]:
    """(shard name, global offset, structured per-row records, memory-mapped) per shard."""
    out = Path(out_dir)
    doc = read_meta(out)
    margin = np.zeros(0) if doc["thresholds"] else None
    dtype = row_records(np.zeros(0, np.float32), np.zeros(0, np.int32), margin).dtype
    for s in doc["shards"]:
        path = out / "rows" / f"{s['name']}.npy"
        rec = _load(path, _row_dtype(path, dtype), (s["rows"],), mmap=True)
        yield s["name"], s["offset"], rec


def _row_dtype(path: Path, flat: np.dtype) -> np.dtype:
    """The records' expected dtype: ``flat``'s fields, each with the file's per-benchmark
    shape (a grid scan keeps one column per benchmark) when it has one."""
    try:
        found = np.load(path, mmap_mode="r", allow_pickle=False).dtype
    except (OSError, ValueError, EOFError, SyntaxError):
        return flat  # _load names the file and the problem
    if found.names != flat.names:
        return flat
    shapes = {found[n].shape for n in found.names}
    if len(shapes) != 1:
        return flat
    (shape,) = shapes
    return np.dtype([(n, flat[n].base, shape) for n in flat.names]) if shape else flat


def load_tests_table(out_dir: Path | str) -> pa.Table:
    """``tests/tests.parquet``: which benchmark and key each test is, and its outputs."""
    path = Path(out_dir) / "tests" / "tests.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: this scan has no per-test table")
    return pq.read_table(path)


def load_scan(out_dir: Path | str, rows: bool = True) -> ScanResult:
    """Read a scan folder; ``rows=False`` skips the per-row outputs (row fields None)."""
    out = Path(out_dir)
    doc = read_meta(out)
    count_path = out / "tests" / "count_above.npy"
    row_fields: list[np.ndarray | None] = [None, None, None]
    if rows:
        recs = [np.asarray(r) for _, _, r in iter_scan_rows(out)]
        margin = doc["thresholds"]
        shape = (0, len(benchmarks_of(doc))) if benchmarks_of(doc) else (0,)
        empty = row_records(
            np.zeros(shape, np.float32),
            np.zeros(shape, np.int32),
            np.zeros(shape) if margin else None,
        )
        rec = np.concatenate(recs) if recs else empty
        row_fields = [
            rec["max"].copy(),
            rec["argmax"].copy(),
            rec["margin"].copy() if margin else None,
        ]
    m, k = doc["tests"], doc["topk"]
    if doc["thresholds"] != count_path.exists():
        raise ValueError(
            f"{out}/scan.json: thresholds is {doc['thresholds']}, but {count_path} "
            f"{'is missing' if doc['thresholds'] else 'exists'}"
        )
    return ScanResult(
        topk_sim=_load(out / "tests" / "topk_sim.npy", "<f4", (m, k)),
        topk_row=_load(out / "tests" / "topk_row.npy", "<i8", (m, k)),
        count_above=_load(count_path, "<i8", (m,)) if doc["thresholds"] else None,
        row_max=row_fields[0],
        row_argmax=row_fields[1],
        row_margin=row_fields[2],
        bad_rows=int(doc.get("bad_rows", {}).get("count", 0)),
    )


def benchmarks_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmarks of a scan (name, start, stop: its test range); [] for a scan of one set
    of tests without names."""
    return list(doc.get("benchmarks") or [])


def benchmark_index(out_dir: Path | str, name: str) -> tuple[int, dict[str, Any]]:
    """Position and entry of benchmark ``name`` in a scan of several benchmarks."""
    doc = read_meta(out_dir)
    entries = benchmarks_of(doc)
    for i, b in enumerate(entries):
        if b["name"] == name:
            return i, b
    names = ", ".join(b["name"] for b in entries) or "none"
    raise KeyError(f"{out_dir}/scan.json: no benchmark {name!r} in this scan (it has: {names})")


def benchmark_rows(out_dir: Path | str, field: str, index: int | None = None) -> np.ndarray:
    """One per-row field (max, argmax or margin) over all base rows: benchmark ``index``'s
    column of a scan of several benchmarks, or the whole field (``index`` None). Reads one shard
    at a time: only this column is kept in memory."""
    cols = []
    for _, _, rec in iter_scan_rows(out_dir):
        col = rec[field]
        if index is not None:
            if col.ndim != 2:
                raise ValueError(f"{out_dir}: not a scan of several benchmarks")
            col = col[:, index]
        cols.append(np.array(col))
    if cols:
        return np.concatenate(cols)
    return np.zeros(0, np.int32 if field == "argmax" else np.float32)


def benchmark_scan(out_dir: Path | str, name: str) -> ScanResult:
    """One benchmark's per-test outputs (top-k, counts) from a scan of several benchmarks; its
    test indices start at 0. No per-row fields."""
    _, entry = benchmark_index(out_dir, name)
    res = load_scan(out_dir, rows=False)
    span = slice(entry["start"], entry["stop"])
    return ScanResult(
        topk_sim=res.topk_sim[span],
        topk_row=res.topk_row[span],
        count_above=None if res.count_above is None else res.count_above[span],
        row_max=None,
        row_argmax=None,
        row_margin=None,
        bad_rows=res.bad_rows,
    )
