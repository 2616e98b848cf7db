"""The fused exact scan: stream base blocks through the kernel; collect per-test, per-row outputs.

One pass over the base set gives, per test point, the top-k most similar base rows and (with
thresholds) how many base rows lie strictly above its threshold; per base row, the max similarity
over all tests, its argmax test and the margin ``max_t (sim - thr(t))``. Values and decisions equal
the exact brute force (see ``kernel.py`` for the bound that makes the bf16/fp32 screen exact).

On disk (``out_dir``)::

    scan.json              format, sizes, shards (name, offset, rows), input fingerprints; last
    tests/topk_sim.npy     float32 (M, k), descending; -inf padding when the base has < k rows
    tests/topk_row.npy     int64 (M, k) global base row ids; -1 padding
    tests/count_above.npy  int64 (M,), only with thresholds
    rows/<shard>.npy       structured per base row: max f4, argmax i4, margin f4 (with thresholds)

Rows excluded by a ``keep`` mask are not scanned: they are never anyone's neighbour and their
per-row outputs are NaN (max, margin) and -1 (argmax).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simgap.io import read_json, write_json, write_npy
from simgap.scan.kernel import (
    CountAboveHandler,
    KernelConfig,
    MarginHandler,
    RowMaxHandler,
    TestSet,
    TopKHandler,
    merge_topk,
    prepare_tests,
    resolve_precision,
    scan_block,
)

if TYPE_CHECKING:
    from simgap.store import Store

FORMAT = "simgap-scan/1"
CHUNK_ROWS = 1 << 16  # rows per kernel call: bounds transfer size and progress granularity

RowSink = Callable[[int, int, np.ndarray, np.ndarray, np.ndarray | None], None]
Progress = Callable[[int, int], None]


@dataclass
class ScanResult:
    topk_sim: np.ndarray  # (M, k) float32, descending
    topk_row: np.ndarray  # (M, k) int64 global base row ids
    count_above: np.ndarray | None  # (M,) int64, rows with sim > thr (strict); None without thr
    row_max: np.ndarray | None  # (N,) float32; None when rows were not collected
    row_argmax: np.ndarray | None  # (N,) int32 test index, ties: lowest
    row_margin: np.ndarray | None  # (N,) float32 max_t (sim - thr(t)); None without thr


@dataclass(frozen=True)
class _Chunk:
    block: int  # index of the block (shard) in the stream
    offset: int  # global row id of the block's first row
    start: int  # first row of this chunk within the block
    emb: np.ndarray  # (n, d) rows of the chunk, in memory
    keep: np.ndarray | None  # (n,) bool rows to scan; None: all
    last: bool  # the block's last chunk


def _chunks(
    blocks: Iterable[tuple[int, np.ndarray, np.ndarray | None]], chunk_rows: int
) -> Iterator[_Chunk]:
    for i, (offset, emb, keep) in enumerate(blocks):
        n = len(emb)
        if keep is not None and keep.shape != (n,):
            raise ValueError(f"block {i}: keep mask {keep.shape} does not match {n} rows")
        for start in range(0, max(n, 1), chunk_rows):
            stop = min(start + chunk_rows, n)
            part = None if keep is None else np.asarray(keep[start:stop], bool)
            # np.array copies: a memory-mapped shard is read here, on the prefetch thread.
            yield _Chunk(i, offset, start, np.array(emb[start:stop]), part, stop == n)


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``items`` on a thread through a bounded queue so reading overlaps compute."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failed(e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class _Failed:
    error: BaseException


def kernel_config(
    precision: str = "auto",
    device: str = "cpu",
    tile_rows: int | None = None,
    tile_tests: int | None = None,
    gemm: str = "auto",
    reduce_threads: int | None | str = "auto",
) -> KernelConfig:
    """Resolve the "auto" choices into a KernelConfig.

    CPU defaults were measured on the 2-core AVX2 development machine: fp32 screen (no native
    bf16 there), numpy's OpenBLAS GEMM (~1.4x torch's MKL GEMM on that AMD CPU), single-threaded
    reductions, tiles of 2048 rows x 8192 tests. On CUDA: bf16, large tiles."""
    precision = resolve_precision(precision, device)
    cuda = torch.device(device).type == "cuda"
    if gemm == "auto":
        gemm = "numpy" if precision == "fp32" and not cuda else "torch"
    if gemm not in ("torch", "numpy") or (gemm == "numpy" and (cuda or precision != "fp32")):
        raise ValueError(f"gemm {gemm!r} is not available for {precision} on {device}")
    if reduce_threads == "auto":
        reduce_threads = None if cuda else 1
    return KernelConfig(
        precision=precision,
        device=device,
        tile_rows=tile_rows or (8192 if cuda else 2048),
        tile_tests=tile_tests or (16384 if cuda else 8192),
        gemm=gemm,
        reduce_threads=reduce_threads,
    )


def _scan(
    blocks: Iterable[tuple[int, np.ndarray, np.ndarray | None]],
    tests: np.ndarray,
    thresholds: np.ndarray | None,
    topk: int,
    cfg: KernelConfig,
    row_sink: RowSink | None,
    collect_rows: bool,
    progress: Progress | None,
    rows_total: int | None,
    chunk_rows: int = CHUNK_ROWS,
) -> ScanResult:
    tests = np.asarray(tests)
    if tests.ndim != 2 or tests.dtype not in (np.float16, np.float32):
        raise ValueError(
            f"tests must be a float16/float32 (M, d) array, not {tests.dtype} {tests.shape}"
        )
    m, d = tests.shape
    if m == 0:
        raise ValueError("no tests to scan against")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, not {topk}")
    if thresholds is not None:
        thresholds = np.asarray(thresholds, np.float32)
        if thresholds.shape != (m,):
            raise ValueError(f"thresholds {thresholds.shape} do not match {m} tests")
        if not np.isfinite(thresholds).all():
            raise ValueError("thresholds must be finite")
    precision, device = cfg.precision, cfg.device
    dev = torch.device(device)
    t_tensor = torch.from_numpy(tests).to(dev)
    thr_tensor = None if thresholds is None else torch.from_numpy(thresholds).to(dev)
    test_set = prepare_tests(t_tensor, thr_tensor, precision, cfg.tile_tests, cfg.test_group)

    row_max, row_margin = RowMaxHandler(), MarginHandler() if thresholds is not None else None
    top = TopKHandler(m, topk, dev) if topk > 0 else None
    count = CountAboveHandler(m, dev) if thresholds is not None else None
    handlers = [h for h in (row_max, row_margin, top, count) if h is not None]

    collected: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    done = 0
    for chunk in _prefetch(_chunks(blocks, chunk_rows)):
        if chunk.emb.ndim != 2 or chunk.emb.shape[1] != d:
            raise ValueError(
                f"block {chunk.block}: rows of shape {chunk.emb.shape}, tests have d={d}"
            )
        parts.append(_scan_chunk(chunk, test_set, handlers, row_max, row_margin, cfg))
        done += len(chunk.emb)
        if progress is not None:
            progress(done, rows_total if rows_total is not None else done)
        if chunk.last:
            block = tuple(
                None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True)
            )
            parts = []
            if row_sink is not None:
                row_sink(chunk.block, chunk.offset, *block)
            if collect_rows:
                collected.append(block)

    if top is not None:
        topk_sim, topk_row = (v.cpu().numpy() for v in top.result())
    else:
        topk_sim, topk_row = np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
    rows: list[np.ndarray | None] = [None, None, None]
    if collect_rows:
        empty = (np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        for i, parts_i in enumerate(zip(*collected, strict=True) if collected else []):
            rows[i] = None if parts_i[0] is None else np.concatenate(parts_i)
        if not collected:
            rows = list(empty)
        if thresholds is None:
            rows[2] = None
    return ScanResult(
        topk_sim=topk_sim,
        topk_row=topk_row,
        count_above=None if count is None else count.result().cpu().numpy(),
        row_max=rows[0],
        row_argmax=rows[1],
        row_margin=rows[2],
    )


def _scan_chunk(
    chunk: _Chunk,
    test_set: TestSet,
    handlers: list,
    row_max: RowMaxHandler,
    row_margin: MarginHandler | None,
    cfg: KernelConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scan one chunk's kept rows; per-row outputs for all its rows (NaN/-1 where not kept)."""
    n = len(chunk.emb)
    local = np.arange(n) if chunk.keep is None else np.flatnonzero(chunk.keep)
    emb = chunk.emb if chunk.keep is None else chunk.emb[local]
    x = torch.from_numpy(np.ascontiguousarray(emb)).to(cfg.device)
    ids = torch.from_numpy(chunk.offset + chunk.start + local).to(cfg.device)
    scan_block(x, ids, test_set, handlers, cfg)
    best, arg = row_max.end()
    out_max = np.full(n, np.nan, np.float32)
    out_arg = np.full(n, -1, np.int32)
    out_max[local] = best.cpu().numpy()
    out_arg[local] = arg.cpu().numpy()
    out_margin = None
    if row_margin is not None:
        out_margin = np.full(n, np.nan, np.float32)
        out_margin[local] = row_margin.end().cpu().numpy()
    return out_max, out_arg, out_margin


def scan_arrays(
    blocks: Iterable[tuple[int, np.ndarray]],
    tests: np.ndarray,
    thresholds: np.ndarray | None = None,
    topk: int = 10,
    precision: str = "auto",
    device: str = "cpu",
    tile_rows: int | None = None,
    tile_tests: int | None = None,
    gemm: str = "auto",
    reduce_threads: int | None | str = "auto",
    row_sink: RowSink | None = None,
    collect_rows: bool = True,
    progress: Progress | None = None,
    rows_total: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ScanResult:
    """Exact fused scan of (global row offset, fp16 rows) blocks against ``tests``.

    ``row_sink(block_index, offset, max, argmax, margin)`` receives each block's per-row outputs
    as soon as the block is done; with ``collect_rows=False`` they are not kept in memory (the
    result's row fields are then None). ``precision``: "fp32", "bf16" or "auto" (bf16 where it is
    fast: CUDA and AVX512_BF16/AMX CPUs); the tuning arguments are resolved by
    ``kernel_config``. ``progress(rows_done, rows_total)`` is called after every chunk."""
    cfg = kernel_config(precision, device, tile_rows, tile_tests, gemm, reduce_threads)
    return _scan(
        ((offset, emb, None) for offset, emb in blocks),
        tests,
        thresholds,
        topk,
        cfg,
        row_sink,
        collect_rows,
        progress,
        rows_total,
        chunk_rows,
    )


def scan_store(
    base: Store,
    tests: np.ndarray,
    thresholds: np.ndarray | None = None,
    topk: int = 10,
    keep: Callable[[str], np.ndarray] | None = None,
    out_dir: Path | str | None = None,
    progress: Progress | None = None,
    precision: str = "auto",
    device: str = "cpu",
    tile_rows: int | None = None,
    tile_tests: int | None = None,
    gemm: str = "auto",
    reduce_threads: int | None | str = "auto",
    return_rows: bool = True,
) -> ScanResult:
    """Exact fused scan of an embedding store, shard by shard (read ahead on a thread).

    ``keep(shard_name)`` returns a bool mask of that shard's rows to scan (a split rescanned
    without copying). With ``out_dir`` per-row outputs are written per shard as each finishes,
    then the per-test outputs and ``scan.json``; ``return_rows=False`` keeps per-row outputs out of
    memory (for 1e8-row pools: read them back per shard with ``iter_scan_rows``)."""
    cfg = kernel_config(precision, device, tile_rows, tile_tests, gemm, reduce_threads)
    out = None if out_dir is None else Path(out_dir)
    shards = base.shards

    def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        for s in shards:
            mask = None if keep is None else np.asarray(keep(s.name), bool)
            yield s.offset, base.read_emb(s.name), mask

    def sink(i: int, offset: int, mx: np.ndarray, arg: np.ndarray, margin: np.ndarray | None):
        write_npy(out / "rows" / f"{shards[i].name}.npy", _row_records(mx, arg, margin))

    result = _scan(
        blocks(),
        tests,
        thresholds,
        topk,
        cfg,
        None if out is None else sink,
        return_rows or out is None,
        progress,
        base.rows,
    )
    if out is not None:
        meta = {
            # No paths: scan.json is a fingerprint of its inputs and must not depend on location.
            "base": {
                "rows": base.rows,
                "shards_sha256": [s.sha256 for s in shards],
            },
            "keep": keep is not None,
            "precision": cfg.precision,
        }
        _write_tests_and_meta(
            result,
            out,
            [{"name": s.name, "offset": s.offset, "rows": s.rows} for s in shards],
            tests,
            thresholds,
            thresholds is not None,
            meta,
        )
    return result


# ----------------------------------------------------------------------------- on disk


def _row_records(mx: np.ndarray, arg: np.ndarray, margin: np.ndarray | None) -> np.ndarray:
    fields = [("max", "<f4"), ("argmax", "<i4")] + (
        [("margin", "<f4")] if margin is not None else []
    )
    rec = np.empty(len(mx), dtype=fields)
    rec["max"], rec["argmax"] = mx, arg
    if margin is not None:
        rec["margin"] = margin
    return rec


def _sha256(a: np.ndarray | None) -> str | None:
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _write_tests_and_meta(
    result: ScanResult,
    out: Path,
    shards: list[dict[str, Any]],
    tests: np.ndarray | None,
    thresholds: np.ndarray | None,
    with_margin: bool,
    meta: dict[str, Any],
) -> None:
    write_npy(out / "tests" / "topk_sim.npy", result.topk_sim)
    write_npy(out / "tests" / "topk_row.npy", result.topk_row)
    if result.count_above is not None:
        write_npy(out / "tests" / "count_above.npy", result.count_above)
    doc = {
        "format": FORMAT,
        "tests": int(result.topk_sim.shape[0]),
        "topk": int(result.topk_sim.shape[1]),
        "thresholds": with_margin,
        "rows": int(sum(s["rows"] for s in shards)),
        "shards": shards,
        "inputs": {
            "tests_sha256": _sha256(tests),
            "thresholds_sha256": _sha256(None if thresholds is None else np.float32(thresholds)),
            **meta,
        },
    }
    # Written last: a scan folder is complete iff scan.json exists.
    write_json(out / "scan.json", doc)


def write_scan(result: ScanResult, out_dir: Path | str, shard_name: str = "all") -> None:
    """Write an in-memory result (all rows as one shard) in the scan folder layout."""
    out = Path(out_dir)
    if result.row_max is None or result.row_argmax is None:
        raise ValueError("write_scan needs per-row outputs (scan with collect_rows=True)")
    write_npy(
        out / "rows" / f"{shard_name}.npy",
        _row_records(result.row_max, result.row_argmax, result.row_margin),
    )
    n = len(result.row_max)
    _write_tests_and_meta(
        result,
        out,
        [{"name": shard_name, "offset": 0, "rows": n}],
        None,
        None,
        result.row_margin is not None,
        {},
    )


def iter_scan_rows(out_dir: Path | str) -> Iterator[tuple[str, int, np.ndarray]]:
    """(shard name, global offset, structured per-row records, memory-mapped) per shard."""
    out = Path(out_dir)
    doc = _read_meta(out)
    for s in doc["shards"]:
        rec = np.load(out / "rows" / f"{s['name']}.npy", mmap_mode="r")
        if len(rec) != s["rows"]:
            raise ValueError(
                f"{out}/rows/{s['name']}.npy: {len(rec)} rows, scan.json says {s['rows']}"
            )
        yield s["name"], s["offset"], rec


def _read_meta(out: Path) -> dict[str, Any]:
    if not (out / "scan.json").exists():
        raise FileNotFoundError(f"{out}: not a finished scan (no scan.json)")
    doc = read_json(out / "scan.json")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{out}/scan.json: unknown scan format {doc.get('format')!r}")
    return doc


def load_scan(out_dir: Path | str, rows: bool = True) -> ScanResult:
    """Read a scan folder; ``rows=False`` skips the per-row outputs (row fields None)."""
    out = Path(out_dir)
    doc = _read_meta(out)
    count_path = out / "tests" / "count_above.npy"
    row_fields: list[np.ndarray | None] = [None, None, None]
    if rows:
        recs = [np.asarray(r) for _, _, r in iter_scan_rows(out)]
        margin = doc["thresholds"]
        empty = _row_records(
            np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0) if margin else None
        )
        rec = np.concatenate(recs) if recs else empty
        row_fields = [
            rec["max"].copy(),
            rec["argmax"].copy(),
            rec["margin"].copy() if margin else None,
        ]
    return ScanResult(
        topk_sim=np.load(out / "tests" / "topk_sim.npy"),
        topk_row=np.load(out / "tests" / "topk_row.npy"),
        count_above=np.load(count_path) if count_path.exists() else None,
        row_max=row_fields[0],
        row_argmax=row_fields[1],
        row_margin=row_fields[2],
    )


__all__ = [
    "ScanResult",
    "iter_scan_rows",
    "kernel_config",
    "load_scan",
    "merge_topk",
    "scan_arrays",
    "scan_store",
    "write_scan",
]
