"""The blocked tile loop: every (row tile x test tile) GEMM handed to every handler."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from simgap.scan.kernel.config import KernelConfig
from simgap.scan.kernel.handlers import ResultHandler
from simgap.scan.kernel.numerics import SCREEN_DTYPES
from simgap.scan.kernel.quant import quantize_rows
from simgap.scan.kernel.screen import screen_tile
from simgap.scan.kernel.tiles import ScanStats, Scratch, SimTile, TestSet


def scan_block(
    x: torch.Tensor,
    row_ids: torch.Tensor,
    tests: TestSet,
    handlers: list[ResultHandler],
    cfg: KernelConfig,
    stats: ScanStats | None = None,
) -> None:
    """Hand every (row tile x test tile) of one block of base rows to every handler.

    ``x`` (n, d) holds base rows (fp16 as stored, or fp32) on ``cfg.device``; ``row_ids`` their
    global ids. Per-row handlers are begun here; the caller ends them. Everything but the GEMM
    runs with ``cfg.reduce_threads`` torch threads. ``cfg`` must be resolved."""
    if cfg.tile_rows is None or cfg.gemm == "auto" or cfg.precision != tests.precision:
        raise ValueError("scan_block needs a resolved KernelConfig matching the tests")
    n, d = x.shape
    for h in handlers:
        h.begin(n, x.device)
    stats = stats if stats is not None else ScanStats()
    screen_dtype = SCREEN_DTYPES[tests.precision]
    int8 = screen_dtype == torch.int8
    fp32_products = tests.fp16_values and x.dtype == torch.float16
    hg = cfg.row_group
    scratch = Scratch(x.device)
    gemm_threads = torch.get_num_threads()
    with _intra_op_threads(cfg.reduce_threads):
        for r0 in range(0, n, cfg.tile_rows):
            xt = x[r0 : r0 + cfg.tile_rows]
            rn = len(xt)
            rp = math.ceil(rn / hg) * hg
            x32 = scratch.get("x32", (rp, d), torch.float32)
            x32[:rn] = xt
            x32[rn:] = 0
            xs, xq, row_scale = x32, None, None
            if int8:
                xq = quantize_rows(x32[:rn], tests.int8_ranges[0])
                xs = scratch.get("xs", (rp, d), torch.int8)
                xs[:rn], xs[rn:] = xq.q, 0
                row_scale = scratch.get("row_scale", (rp,), torch.float32)
                row_scale[:rn], row_scale[rn:] = xq.scale, 1
            elif screen_dtype != torch.float32:
                xs = scratch.get("xs", (rp, d), screen_dtype).copy_(x32)
            eps = tests.eps(x32[:rn], xq)
            ids = row_ids[r0 : r0 + rn]
            for tt in tests.tiles:
                stats.screened += rn * (tt.cols - len(tt.pad_cols))
                with _intra_op_threads(gemm_threads if cfg.gemm == "torch" else None):
                    sims = screen_tile(xs, tt, row_scale, cfg, scratch, tests.int8_ranges)
                low = torch.iinfo(torch.int32).min if int8 else -math.inf
                sims[rn:] = low
                if len(tt.pad_cols):
                    sims.index_fill_(1, tt.pad_cols, low)
                tile = SimTile(
                    sims, rn, r0, x32, ids, tt, eps, fp32_products, scratch, stats, row_scale
                )
                for h in handlers:
                    h.add_results(tile)
                tile.release()


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with n torch intra-op threads, restoring the caller's setting after."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
