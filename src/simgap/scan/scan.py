"""The fused exact scan: stream base blocks through the kernel; collect per-test, per-row outputs.

One pass over the base rows gives, per test point, the top-k most similar base rows and (with
thresholds) how many base rows lie strictly above its threshold; per base row, the max similarity
over all tests, its argmax test and the margin ``max_t (sim - thr(t))``. Values and decisions equal
the exact brute force (see ``kernel/`` for the bound that makes the bf16/fp32 screen exact).

This module streams in-memory or memory-mapped blocks in one process; ``shards.py`` runs it per
store shard on an executor and merges the shards' partials; ``layout.py`` is the on-disk format.

Rows excluded by a ``keep`` mask are not scanned: they are never anyone's neighbour and their
per-row outputs are NaN (max, margin) and -1 (argmax).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simgap.scan.kernel import (
    CountAboveHandler,
    KernelConfig,
    MarginHandler,
    RowMaxHandler,
    ScanStats,
    TestSet,
    TopKHandler,
    prepare_tests,
    scan_block,
)

CHUNK_ROWS = 1 << 16  # rows per kernel call: bounds transfer size and progress granularity
NORM_TOLERANCE = 1e-2  # a unit vector stored in fp16 has norm within ~1e-3 of 1

RowSink = Callable[[int, int, np.ndarray, np.ndarray, np.ndarray | None], None]
RowProgress = Callable[[int, int], None]
RowBlock = tuple[int, np.ndarray, np.ndarray | None]  # global row offset, rows, keep mask or None


@dataclass
class ScanResult:
    topk_sim: np.ndarray  # (M, k) float32, descending
    topk_row: np.ndarray  # (M, k) int64 global base row ids
    count_above: np.ndarray | None  # (M,) int64, rows with sim > thr (strict); None without thr
    row_max: np.ndarray | None  # (N,) float32; None when rows were not collected
    row_argmax: np.ndarray | None  # (N,) int32 test index, ties: lowest
    row_margin: np.ndarray | None  # (N,) float32 max_t (sim - thr(t)); None without thr
    bad_rows: int = 0  # base rows excluded because NaN/Inf or not unit-norm (skip policy)
    # Work counts of an in-process scan (zero when merged from shard files): pairs screened
    # and exact recomputations; their ratio is the scan's recheck fraction.
    pairs_screened: int = 0
    pairs_rechecked: int = 0

    @property
    def recheck_fraction(self) -> float | None:
        return self.pairs_rechecked / self.pairs_screened if self.pairs_screened else None


def find_bad_rows(emb: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Indices of rows that are NaN/Inf or whose norm is not 1 (within fp16 storage error).

    Chunked so a memory-mapped shard is never copied whole to float32."""
    bad = []
    for s in range(0, len(emb), chunk_rows):
        part = np.asarray(emb[s : s + chunk_rows], np.float32)
        finite = np.isfinite(part).all(1)
        norm = np.linalg.norm(np.where(finite[:, None], part, 0), axis=1)
        bad.append(s + np.flatnonzero(~finite | (np.abs(norm - 1) > NORM_TOLERANCE)))
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


@dataclass(frozen=True)
class _Chunk:
    block: int  # index of the block (shard) in the stream
    offset: int  # global row id of the block's first row
    start: int  # first row of this chunk within the block
    n: int  # rows of the chunk
    local: np.ndarray  # (n_kept,) kept rows within the chunk
    x: torch.Tensor  # (n_kept, d) kept rows, on the scan device
    ready: Any  # CUDA event the copy stream recorded after x's copy; None on CPU
    last: bool  # the block's last chunk


def _chunks(blocks: Iterable[RowBlock], chunk_rows: int, device: torch.device) -> Iterator[_Chunk]:
    """Cut blocks into chunks and move each to the device; runs on the prefetch thread.

    On CUDA the rows go through pinned memory and a side stream, so the host-to-device copy of
    the next chunk overlaps the kernels of the current one."""
    cuda = device.type == "cuda"
    if cuda:
        # This runs on the prefetch thread, whose current device is its own (0): bind it.
        with torch.cuda.device(device):
            yield from _chunks_on(blocks, chunk_rows, device, torch.cuda.Stream(device))
    else:
        yield from _chunks_on(blocks, chunk_rows, device, None)


def _chunks_on(
    blocks: Iterable[RowBlock], chunk_rows: int, device: torch.device, stream: Any
) -> Iterator[_Chunk]:
    cuda = stream is not None
    for i, (offset, emb, keep) in enumerate(blocks):
        n = len(emb)
        if keep is not None and keep.shape != (n,):
            raise ValueError(f"block {i}: keep mask {keep.shape} does not match {n} rows")
        for start in range(0, max(n, 1), chunk_rows):
            stop = min(start + chunk_rows, n)
            local = np.arange(stop - start)
            if keep is not None:
                local = np.flatnonzero(np.asarray(keep[start:stop], bool))
            # Reading a memory-mapped shard happens here, on the prefetch thread.
            rows = np.array(emb[start:stop]) if keep is None else np.array(emb[start + local])
            if rows.ndim != 2:
                raise ValueError(f"block {i}: rows must be 2-D, not {rows.shape}")
            host = torch.from_numpy(np.ascontiguousarray(rows))
            ready = None
            if cuda:
                with torch.cuda.stream(stream):
                    x = host.pin_memory().to(device, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(stream)
            else:
                x = host
            yield _Chunk(i, offset, start, stop - start, local, x, ready, stop == n)


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


def check_tests(tests: np.ndarray, thresholds: np.ndarray | None, topk: int) -> None:
    """Refuse inputs the scan cannot answer exactly: wrong shapes, NaN/Inf, no tests."""
    if tests.ndim != 2 or tests.dtype not in (np.float16, np.float32):
        raise ValueError(
            f"tests must be a float16/float32 (M, d) array, not {tests.dtype} {tests.shape}"
        )
    if len(tests) == 0:
        raise ValueError("no tests to scan against")
    if not np.isfinite(tests).all():
        bad = np.flatnonzero(~np.isfinite(tests).all(1))
        raise ValueError(f"{len(bad)} tests contain NaN or Inf (first indices {bad[:5].tolist()})")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, not {topk}")
    if thresholds is not None:
        if thresholds.shape != (len(tests),):
            raise ValueError(f"thresholds {thresholds.shape} do not match {len(tests)} tests")
        if not np.isfinite(thresholds).all():
            raise ValueError("thresholds must be finite")


def scan_arrays(
    blocks: Iterable[tuple[int, np.ndarray]] | Iterable[RowBlock],
    tests: np.ndarray,
    thresholds: np.ndarray | None = None,
    topk: int = 10,
    config: KernelConfig | None = None,
    row_sink: RowSink | None = None,
    collect_rows: bool = True,
    progress: RowProgress | None = None,
    rows_total: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    groups: Sequence[tuple[int, int]] | None = None,
) -> ScanResult:
    """Exact fused scan of blocks ``(global row offset, rows[, keep mask])`` against ``tests``.

    Rows are fp16 (as stored) or fp32, in memory or memory-mapped. ``row_sink(block_index,
    offset, max, argmax, margin)`` receives each block's per-row outputs as soon as the block is
    done; with ``collect_rows=False`` they are not kept (the result's row fields are None).
    ``config`` chooses device and tuning (default: ``KernelConfig()`` resolved for the CPU);
    ``progress(rows_done, rows_total)`` is called after every chunk.

    ``groups``: consecutive test ranges ``(start, stop)`` (one per benchmark). Then the per-row
    outputs are (N, groups): each row's max, argmax (a test index) and margin per group, from
    the same pass over the rows (each chunk is read and moved to the device once)."""
    cfg = (config or KernelConfig()).resolved()
    tests = np.asarray(tests)
    thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
    check_tests(tests, thresholds, topk)
    m, d = tests.shape
    spans = _check_groups(groups, m)
    dev = scan_device(cfg.device)
    t_tensor = torch.from_numpy(tests).to(dev)
    thr_tensor = None if thresholds is None else torch.from_numpy(thresholds).to(dev)
    stats = ScanStats()
    parts_of = [_GroupScan(t_tensor, thr_tensor, a, b, topk, cfg, dev) for a, b in spans]

    triples = (b if len(b) == 3 else (b[0], b[1], None) for b in blocks)
    collected: list[tuple[np.ndarray, ...]] = []
    parts: list[tuple[np.ndarray, ...]] = []
    done = 0
    for chunk in _prefetch(_chunks(triples, chunk_rows, dev)):
        if chunk.x.shape[1] != d:
            raise ValueError(f"block {chunk.block}: rows of shape {tuple(chunk.x.shape)}, d={d}")
        outs = [g.chunk(chunk, cfg, stats) for g in parts_of]
        if groups is None:
            parts.append(outs[0])
        else:
            parts.append(tuple(np.stack(o, axis=1) for o in zip(*outs, strict=True)))
        done += chunk.n
        if progress is not None:
            progress(done, rows_total if rows_total is not None else done)
        if chunk.last:
            block = tuple(np.concatenate(p) for p in zip(*parts, strict=True))
            parts = []
            margin = block[2] if thresholds is not None else None
            if row_sink is not None:
                row_sink(chunk.block, chunk.offset, block[0], block[1], margin)
            if collect_rows:
                collected.append(block)

    topk_sim, topk_row = _topk_outputs(parts_of, m, topk)
    count_above = None
    if thresholds is not None:
        count_above = np.concatenate([g.count.result().cpu().numpy() for g in parts_of])
    rows: list[np.ndarray | None] = [None, None, None]
    if collect_rows:
        rows = _row_outputs(
            collected, None if groups is None else len(spans), thresholds is not None
        )
    return ScanResult(
        topk_sim=topk_sim,
        topk_row=topk_row,
        count_above=count_above,
        row_max=rows[0],
        row_argmax=rows[1],
        row_margin=rows[2],
        pairs_screened=stats.screened,
        pairs_rechecked=stats.rechecked,
    )


def _topk_outputs(parts_of: list[_GroupScan], m: int, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k similarities and rows of every test, the groups' results one after another."""
    if topk == 0:
        return np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
    per_group = [g.top.result() for g in parts_of]
    topk_sim = np.concatenate([s.cpu().numpy() for s, _ in per_group])
    topk_row = np.concatenate([r.cpu().numpy() for _, r in per_group])
    return topk_sim, topk_row


def _row_outputs(
    collected: list[tuple[np.ndarray, ...]], groups: int | None, margin: bool
) -> list[np.ndarray | None]:
    """Per-row max, argmax and margin (None without thresholds) of every block, in row order;
    (N,) without groups, (N, groups) with them."""
    shape = (0,) if groups is None else (0, groups)
    empty = (np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, np.float32))
    rows: list[np.ndarray | None] = (
        [np.concatenate(p) for p in zip(*collected, strict=True)] if collected else []
    )
    rows = rows or list(empty)
    if not margin:
        rows[2] = None
    return rows


def _check_groups(groups: Sequence[tuple[int, int]] | None, m: int) -> list[tuple[int, int]]:
    if groups is None:
        return [(0, m)]
    spans = [(int(a), int(b)) for a, b in groups]
    ends = [0] + [b for _, b in spans]
    if (
        not spans
        or [a for a, _ in spans] != ends[:-1]
        or ends[-1] != m
        or any(b <= a for a, b in spans)
    ):
        raise ValueError(f"groups {spans} must cut the {m} tests into consecutive non-empty ranges")
    return spans


class _GroupScan:
    """One group's tests prepared for the kernel, its handlers, and its per-chunk row outputs."""

    def __init__(
        self,
        tests: torch.Tensor,
        thresholds: torch.Tensor | None,
        start: int,
        stop: int,
        topk: int,
        cfg: KernelConfig,
        dev: torch.device,
    ):
        thr = None if thresholds is None else thresholds[start:stop]
        self.start = start
        self.tests = prepare_tests(
            tests[start:stop], thr, cfg.precision, cfg.tile_tests, cfg.test_group, cfg.tile_rows
        )
        self.row_max = RowMaxHandler()
        self.margin = MarginHandler() if thr is not None else None
        self.top = TopKHandler(stop - start, topk, dev) if topk > 0 else None
        self.count = CountAboveHandler(stop - start, dev) if thr is not None else None
        self.handlers = [h for h in (self.row_max, self.margin, self.top, self.count) if h]

    def chunk(self, chunk: _Chunk, cfg: KernelConfig, stats: ScanStats) -> tuple[np.ndarray, ...]:
        mx, arg, margin = _scan_chunk(
            chunk, self.tests, self.handlers, self.row_max, self.margin, cfg, stats
        )
        # The kernel numbers a group's tests from 0: argmax names a test of the whole scan.
        return mx, np.where(arg >= 0, arg + self.start, -1).astype(np.int32), margin


def scan_device(
    device: str | torch.device, current: Callable[[], int] | None = None
) -> torch.device:
    """The scan's device with its index: "cuda" means the caller's current GPU, resolved here
    once, because the prefetch thread's current device is always its own default (0)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", (current or torch.cuda.current_device)())
    return dev


def wait_for_copy(chunk: _Chunk) -> None:
    """Order the kernels on the rows' device after the chunk's host-to-device copy.

    The stream is the current stream of the rows' own device: ``current_stream()`` without a
    device is the caller's current device, and waiting there leaves another device's kernels
    free to read the rows before they arrive."""
    if chunk.ready is None:
        return
    stream = torch.cuda.current_stream(chunk.x.device)
    stream.wait_event(chunk.ready)
    # x was allocated on the copy stream: keep its memory until this stream is done with it.
    chunk.x.record_stream(stream)


def _scan_chunk(
    chunk: _Chunk,
    test_set: TestSet,
    handlers: list,
    row_max: RowMaxHandler,
    row_margin: MarginHandler | None,
    cfg: KernelConfig,
    stats: ScanStats | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan one chunk's kept rows; per-row outputs for all its rows (NaN/-1 where not kept)."""
    wait_for_copy(chunk)
    x = chunk.x
    ids = torch.from_numpy(chunk.offset + chunk.start + chunk.local).to(x.device)
    scan_block(x, ids, test_set, handlers, cfg, stats)
    row_max.end()
    best, arg = row_max.result()
    out_max = np.full(chunk.n, np.nan, np.float32)
    out_arg = np.full(chunk.n, -1, np.int32)
    out_margin = np.full(chunk.n, np.nan, np.float32)
    out_max[chunk.local] = best.cpu().numpy()
    out_arg[chunk.local] = arg.cpu().numpy()
    if row_margin is not None:
        row_margin.end()
        out_margin[chunk.local] = row_margin.result().cpu().numpy()
    return out_max, out_arg, out_margin
