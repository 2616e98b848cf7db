"""Tests cut into screen tiles, the screen tile of one GEMM with its shared reductions, and the
exact recomputation of candidate pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from simgap.scan.kernel.numerics import SCREEN_DTYPES, SLACK, error_coefficient
from simgap.scan.kernel.quant import Int8Bound, QuantNorms, QuantRows, quantize_rows
from simgap.scan.kernel.screen import int8_range

EXACT_CHUNK = 1024  # pairs per exact recomputation step (its gathers live in Scratch)
EXACT_CHUNK_CUDA = 16384  # on a GPU each step is a handful of launches: fewer, larger steps


class Scratch:
    """Reused buffers, one per name. Fresh temporaries above ~128 KB are mmapped, or trimmed
    back to the OS by glibc on free, and page-fault again on every use: measured up to 7x
    slower scans in the development VM. Per-tile work therefore writes into these."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def memo(self, size: int) -> torch.Tensor:
        """A flat float32 array of at least ``size`` entries, NaN where nothing is stored (exact
        values are never NaN): the per-tile memo of ``SimTile.exact``, kept across tiles."""
        buf = self.buffers.get("memo")
        if buf is None or len(buf) < size:
            buf = torch.full((size,), math.nan, dtype=torch.float32, device=self.device)
            self.buffers["memo"] = buf
        return buf


def exact_sims(
    x: torch.Tensor,
    rows: torch.Tensor,
    t: torch.Tensor,
    cols: torch.Tensor,
    fp32_products: bool,
    scratch: Scratch,
) -> torch.Tensor:
    """Reference similarities ``float32(x[rows] . t[cols])`` of fp32 copies x (R, d), t (C, d).

    ``fp32_products``: x and t hold fp16 values, whose products (22 significant bits) are exact
    in fp32; then only the sum needs float64. Otherwise products are formed in float64."""
    d = x.shape[1]
    step = EXACT_CHUNK_CUDA if x.device.type == "cuda" else EXACT_CHUNK
    xb = scratch.get("exact_x", (step, d), torch.float32)
    tb = scratch.get("exact_t", (step, d), torch.float32)
    sb = scratch.get("exact_s", (step,), torch.float64)
    out = torch.empty(len(rows), dtype=torch.float32, device=x.device)
    # Per-row handlers ask for one pair per row, in order: then x needs no gather.
    in_order = len(rows) == len(x) and bool(
        torch.equal(rows, torch.arange(len(x), device=x.device))
    )
    for s in range(0, len(rows), step):
        r, c = rows[s : s + step], cols[s : s + step]
        n = len(r)
        xr = x[s : s + n] if in_order else torch.index_select(x, 0, r, out=xb[:n])
        torch.index_select(t, 0, c, out=tb[:n])
        if fp32_products:
            prod = tb[:n].mul_(xr)
        else:
            prod = scratch.get("exact_p", (step, d), torch.float64)[:n]
            prod.copy_(tb[:n]).mul_(xr)  # xr promotes to float64 exactly
        torch.sum(prod, 1, dtype=torch.float64, out=sb[:n])
        out[s : s + n] = sb[:n]
    return out


@dataclass
class ScanStats:
    """Work counts of a scan: pairs screened, and exact recomputations (a pair can be
    recomputed by more than one handler)."""

    screened: int = 0
    rechecked: int = 0

    def add(self, other: ScanStats) -> None:
        self.screened += other.screened
        self.rechecked += other.rechecked


@dataclass
class TestTile:
    """One tile of tests in screen layout: column ``i * nb + b`` is test ``i`` of block ``b``."""

    screen: torch.Tensor  # (C, d) screen dtype, zero rows at padding (shares `exact` for fp32)
    scale: torch.Tensor | None  # (C,) float32 int8 scale of each column's block; float: None
    block_scale: torch.Tensor | None  # (nb,) the int8 scale shared by the tests of a block
    exact: torch.Tensor  # (C, d) float32 copy of the tests (exact for fp16/fp32), zero padding
    index: torch.Tensor  # (C,) int64 original test index, -1 at padding
    thr: torch.Tensor | None  # (C,) float32 thresholds, +inf at padding
    thr_block_min: torch.Tensor | None  # (nb,) over the real tests of each block
    thr_block_max: torch.Tensor | None
    pad_cols: torch.Tensor  # int64 padding columns
    group: int  # tests per block (g)

    @property
    def cols(self) -> int:
        return len(self.index)

    @property
    def nb(self) -> int:
        return self.cols // self.group


@dataclass
class TestSet:
    """Tests prepared once per scan: sorted by threshold and cut into screen tiles."""

    tiles: list[TestTile]
    n: int
    dim: int
    precision: str
    eps_per_row_norm: float  # c * max |t|: times max |x| of a row tile gives eps (float screens)
    fp16_values: bool  # every test value is exactly a float16
    quant: QuantNorms | None = None  # int8: the tests' quantization norms (all tiles)
    int8_ranges: tuple[int, int] = (127, 127)  # int8: (base rows, tests) ranges

    def eps(self, x32: torch.Tensor, xq: QuantRows | None) -> float:
        """Bound on |screen - float32(x.t)| over a row tile x32 (n, d) and every test.

        A float32 norm is within d*u32 relative; the (1 + 2**-10) factor covers it and the
        float32 rounding of the bounds evaluated on values up to ~|x||t|."""
        if self.precision == "int8":
            assert xq is not None and self.quant is not None
            return Int8Bound(xq.norms, self.quant).eps() * (1 + 2**-10) + SLACK
        x_norm = float(torch.linalg.vector_norm(x32, dim=1).max()) if len(x32) else 0.0
        return self.eps_per_row_norm * x_norm * (1 + 2**-10) + SLACK


def prepare_tests(
    tests: torch.Tensor,
    thresholds: torch.Tensor | None,
    precision: str,
    tile_tests: int,
    test_group: int = 32,
    tile_rows: int = 2048,
) -> TestSet:
    """Sort tests by threshold and cut them into tiles; for the int8 screen quantize them at the
    widest range whose GEMM is exact on a ``tile_rows`` x ``tile_tests`` tile, one scale per
    block of ``test_group`` tests: the per-row block maximum is then a max over the int32 GEMM
    output, scaled afterwards (scaling by a positive number is monotone, also in float32), and
    the tile is never converted to floats as a whole."""
    m, d = tests.shape
    dev = tests.device
    screen_dtype = SCREEN_DTYPES[precision]
    tests32 = tests.float()
    quant, ranges = None, (127, 127)
    if precision == "int8":
        g0 = min(test_group, tile_tests, m)
        ranges = int8_range(tile_rows, g0 * math.ceil(min(tile_tests, m) / g0), d, dev)
    if thresholds is not None:
        # Sorted thresholds make each block's [min, max] narrow: tight margin bounds.
        order = torch.argsort(thresholds, stable=True)
    else:
        order = torch.arange(m, device=dev)
    tiles = []
    for s0 in range(0, m, tile_tests):
        real = min(tile_tests, m - s0)
        g = min(test_group, real)
        nb = math.ceil(real / g)
        # Column i*nb + b holds rank b*g + i of this tile's tests.
        rank = (torch.arange(g, device=dev)[:, None] + g * torch.arange(nb, device=dev)).flatten()
        is_real = rank < real
        index = torch.full((g * nb,), -1, dtype=torch.int64, device=dev)
        index[is_real] = order[s0 + rank[is_real]]
        exact = torch.zeros((g * nb, d), dtype=torch.float32, device=dev)
        exact[is_real] = tests32[index[is_real]]
        thr = tmin = tmax = None
        if thresholds is not None:
            thr = torch.full((g * nb,), math.inf, dtype=torch.float32, device=dev)
            thr[is_real] = thresholds[index[is_real]]
            tmin = thr.view(g, nb).amin(0)
            tmax = torch.where(is_real, thr, -math.inf).view(g, nb).amax(0)
        scale = block_scale = None
        if precision == "int8":
            amax = exact.abs().amax(1).view(g, nb).amax(0) if d else torch.zeros(nb, device=dev)
            block_scale = torch.where(amax > 0, amax / ranges[1], torch.ones_like(amax))
            scale = block_scale.repeat(g)  # column i*nb + b: block b
            qt = quantize_rows(exact, ranges[1], scale)
            quant = qt.norms if quant is None else quant.max(qt.norms)
            screen = qt.q
        else:
            screen = exact if screen_dtype == torch.float32 else exact.to(screen_dtype)
        pad = torch.nonzero(~is_real).flatten()
        tiles.append(TestTile(screen, scale, block_scale, exact, index, thr, tmin, tmax, pad, g))
    t_norm = float(torch.linalg.vector_norm(tests.double(), dim=1).max()) if m else 0.0
    c = 0.0 if precision == "int8" else error_coefficient(d, precision, dev)
    fp16_values = bool((tests32.half().float() == tests32).all())
    return TestSet(tiles, m, d, precision, c * t_norm, fp16_values, quant, ranges)


@dataclass
class SimTile:
    """Screen similarities of one row tile against one test tile, plus exact recomputation."""

    # (Rp, C) screen dtype, padding rows and columns at -inf; for int8 the int32 GEMM output,
    # padding at INT32_MIN, whose screen values are fl(fl(fl(a) * block scale) * row scale)
    sims: torch.Tensor
    n_rows: int  # real rows (the first n_rows of sims)
    row0: int  # position of the first row within the current block
    x: torch.Tensor  # (n_rows, d) float32 copy of the tile's base rows (exact)
    row_ids: torch.Tensor  # (n_rows,) int64 global row ids
    tests: TestTile
    eps: float  # bound on |screen - exact| for every pair of the tile, incl. slack
    fp32_products: bool  # base rows and tests are all fp16 values
    scratch: Scratch
    stats: ScanStats = field(default_factory=lambda: ScanStats())
    row_scale: torch.Tensor | None = None  # (Rp,) float32 int8 row scales (1 at padding)
    memo_keys: list[torch.Tensor] = field(default_factory=list)  # pairs stored in the memo

    def _float(
        self, v: torch.Tensor, rows: torch.Tensor | None, blocks: torch.Tensor
    ) -> torch.Tensor:
        """Screen values of int32 GEMM outputs v whose rows and blocks broadcast against v."""
        if self.row_scale is None:
            return v.float()
        bs = self.tests.block_scale
        assert bs is not None
        rs = self.row_scale if rows is None else self.row_scale[rows]
        return v.float().mul_(bs[blocks]).mul_(rs)

    @cached_property
    def _block_max_padded(self) -> torch.Tensor:
        rp, c = self.sims.shape
        g = self.tests.group
        view = self.sims.view(rp, g, c // g)
        out = self.scratch.get("block_max", (rp, c // g), torch.float32)
        if self.sims.dtype == torch.float32:
            return torch.amax(view, 1, out=out)
        low = torch.amax(view, 1, out=self.scratch.get("bm_low", out.shape, view.dtype))
        if self.row_scale is None:
            return out.copy_(low)
        bs = self.tests.block_scale
        assert bs is not None
        return out.copy_(low).mul_(bs).mul_(self.row_scale[:, None])

    def dense(self) -> torch.Tensor:
        """(Rp, C) screen values as floats (padding -inf); for int8 converted here, so only for
        the rare dense steps (top-k warm start, dense screening of early tiles)."""
        if self.row_scale is None:
            return self.sims
        out = self.scratch.get("dense", self.sims.shape, torch.float32).copy_(self.sims)
        assert self.tests.scale is not None
        out.mul_(self.tests.scale).mul_(self.row_scale[:, None])
        out[self.n_rows :] = -math.inf
        if len(self.tests.pad_cols):
            out.index_fill_(1, self.tests.pad_cols, -math.inf)
        return out

    @property
    def block_max(self) -> torch.Tensor:
        """(n_rows, nb) float32: per row, the max over each block of ``group`` tests."""
        return self._block_max_padded[: self.n_rows]

    def buffer(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A (n_rows, nb) scratch array for handler temporaries."""
        rp, c = self.sims.shape
        return self.scratch.get(name, (rp, c // self.tests.group), dtype)[: self.n_rows]

    def row_block(self, r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, g) screen values of row r over the tests of block b (column i*nb + b)."""
        rp, c = self.sims.shape
        v = self.sims.view(rp, self.tests.group, c // self.tests.group)[r, :, b]
        return self._float(v, r[:, None], b[:, None])

    def exact(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Reference similarities of (tile row, tile column) pairs, each pair computed once per
        tile: the handlers' candidates overlap (row max and margin both look near a row's max,
        pilots are candidates again), and a recomputation costs ~100x a screened pair. The memo
        is a dense NaN-filled array over the tile's pairs (``Scratch.memo``): one gather to look
        pairs up, no sorting; ``release`` clears what this tile stored."""
        keys = rows * self.tests.cols + cols
        memo = self.scratch.memo(self.sims.numel())
        out = memo[keys]
        todo = torch.nonzero(torch.isnan(out)).flatten()
        if len(todo) == len(keys):
            todo_rows, todo_cols, todo_keys = rows, cols, keys
        else:
            todo_rows, todo_cols, todo_keys = rows[todo], cols[todo], keys[todo]
        if len(todo) == 0:
            return out
        # Keys are unique within a request (handlers ask for distinct pairs).
        new = exact_sims(
            self.x, todo_rows, self.tests.exact, todo_cols, self.fp32_products, self.scratch
        )
        self.stats.rechecked += len(new)
        out[todo] = new
        memo[todo_keys] = new
        self.memo_keys.append(todo_keys)
        return out

    def release(self) -> None:
        """Clear this tile's memo entries: the buffer serves the next tiles."""
        if self.memo_keys:
            self.scratch.memo(self.sims.numel())[torch.cat(self.memo_keys)] = math.nan
            self.memo_keys = []
