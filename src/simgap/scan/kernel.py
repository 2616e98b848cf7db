"""Exact blocked similarity scan: one GEMM per tile, reductions in result handlers.

The loop follows faiss ``exhaustive_inner_product_blas`` (faiss/utils/distances.cpp): the GEMM of
a tile of base rows against a tile of tests lands in one scratch buffer, then every handler's
``add_results`` reduces it; the loop never knows which reductions run. Pure torch (plus numpy's
BLAS as an optional CPU GEMM), the same code on CPU and CUDA; it imports nothing of simgap.

Exactness. The similarity of a base row x and a test t is ``float32(x . t)`` with the dot product
computed exactly: for float16 inputs every product is a multiple of 2**-48 of magnitude < 1, so
every partial sum of a unit-norm dot product fits float64's 53 bits and float64 accumulation is
exact in any order; the cast to float32 then rounds once, to nearest. (float32 tests: the sum is
float64-accurate, ~1e-16, so it can differ from another float64 order only at a float32 rounding
tie.) The tile GEMM runs in a cheaper *screen* precision (bf16 or fp32) with a proven bound
``|screen - sim| <= eps = c * |x| * |t|`` (``error_coefficient``). Handlers use the screen only to
discard pairs that provably cannot matter and recompute the remaining candidates exactly, so every
reported value and every decision equals the brute force.

Tile layout. Rows are padded to a multiple of ``row_group`` and tests to ``test_group * nb``;
column ``i * nb + b`` holds the ``i``-th test of block ``b``, so the per-block maximum is a
reduction over the middle axis of ``sims.view(R, test_group, nb)``: contiguous and vectorised
(an inner-axis reduction over 16 elements measured ~4x slower on CPU). 2D blocks of
``row_group`` rows x ``test_group`` tests screen the per-test outputs. Tests are sorted by
threshold, so a block's thresholds are close and the margin bounds tight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

U32 = 2.0**-24  # unit roundoff of float32
UBF16 = 2.0**-8  # unit roundoff of bfloat16
SLACK = 2.0**-18  # absolute slack for float32 rounding in the bounds computed on screen values
EXACT_CHUNK = 1024  # pairs per exact recomputation step (its gathers live in Scratch)
BLOCK_CHUNK = 512  # 2D blocks gathered per step by the per-test handlers
DENSE_SCREEN = 0.125  # fraction of candidate 2D blocks above which top-k screens densely

SCREEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` picks bf16 where bf16 GEMMs are fast (CUDA, AVX512_BF16/AMX CPUs), else fp32.

    Without native bf16 instructions torch emulates bf16 GEMMs: 4-15x slower than fp32."""
    if precision in SCREEN_DTYPES:
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
    if torch.device(device).type == "cuda":
        return "bf16"
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if fast_bf16 else "fp32"


def error_coefficient(dim: int, precision: str, device: str | torch.device) -> float:
    """c with ``|screen(x.t) - float32(x.t)| <= c * sum_i |x_i t_i| <= c * |x| * |t|``.

    Terms (u: unit roundoff of the GEMM inputs; Higham's gamma_d = d*u32/(1-d*u32)): rounding of
    x and t to the screen dtype (2u + u^2), fp32 accumulation in any order or blocking
    (gamma_d (1+u)^2), rounding of the output to the screen dtype (u (1+u)^2 (1+gamma_d)), and
    the reference's own rounding of the exact dot product to float32 (u32)."""
    gamma = dim * U32 / (1 - dim * U32)
    dev = torch.device(device).type
    if precision == "bf16":
        u_in = u_out = UBF16
    else:
        # fp16 and fp32 inputs are exact in fp32, unless torch may run fp32 GEMMs as TF32/bf16.
        u_in = 0.0 if torch.get_float32_matmul_precision() == "highest" else UBF16
        if dev == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            u_in = UBF16
        u_out = 0.0
    c = (2 * u_in + u_in**2) + gamma * (1 + u_in) ** 2
    c += u_out * (1 + u_in) ** 2 * (1 + gamma) + U32
    if precision == "bf16" and dev == "cuda":
        # cuBLAS may split K and round partial sums to bf16 (allow_bf16_reduced_precision_
        # reduction): allow four more output roundings.
        if torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction:
            c += 4 * UBF16
    return c


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
    xb = scratch.get("exact_x", (EXACT_CHUNK, d), torch.float32)
    tb = scratch.get("exact_t", (EXACT_CHUNK, d), torch.float32)
    sb = scratch.get("exact_s", (EXACT_CHUNK,), torch.float64)
    out = torch.empty(len(rows), dtype=torch.float32, device=x.device)
    # Per-row handlers ask for one pair per row, in order: then x needs no gather.
    in_order = len(rows) == len(x) and bool(
        torch.equal(rows, torch.arange(len(x), device=x.device))
    )
    for s in range(0, len(rows), EXACT_CHUNK):
        r, c = rows[s : s + EXACT_CHUNK], cols[s : s + EXACT_CHUNK]
        n = len(r)
        xr = x[s : s + n] if in_order else torch.index_select(x, 0, r, out=xb[:n])
        torch.index_select(t, 0, c, out=tb[:n])
        if fp32_products:
            prod = tb[:n].mul_(xr)
        else:
            prod = scratch.get("exact_p", (EXACT_CHUNK, d), torch.float64)[:n]
            prod.copy_(tb[:n]).mul_(xr)  # xr promotes to float64 exactly
        torch.sum(prod, 1, dtype=torch.float64, out=sb[:n])
        out[s : s + n] = sb[:n]
    return out


# ----------------------------------------------------------------------------- tests, tiles


@dataclass
class TestTile:
    """One tile of tests in screen layout: column ``i * nb + b`` is test ``i`` of block ``b``."""

    screen: torch.Tensor  # (C, d) screen dtype, zero rows at padding (shares `exact` for fp32)
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
    eps_per_row_norm: float  # c * max |t|: times max |x| of a row tile gives eps
    fp16_values: bool  # every test value is exactly a float16


def prepare_tests(
    tests: torch.Tensor,
    thresholds: torch.Tensor | None,
    precision: str,
    tile_tests: int,
    test_group: int = 32,
) -> TestSet:
    m, d = tests.shape
    dev = tests.device
    screen_dtype = SCREEN_DTYPES[precision]
    tests32 = tests.float()
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
        screen = exact if screen_dtype == torch.float32 else exact.to(screen_dtype)
        pad = torch.nonzero(~is_real).flatten()
        tiles.append(TestTile(screen, exact, index, thr, tmin, tmax, pad, g))
    t_norm = float(torch.linalg.vector_norm(tests.double(), dim=1).max()) if m else 0.0
    c = error_coefficient(d, precision, dev)
    fp16_values = bool((tests32.half().float() == tests32).all())
    return TestSet(tiles, m, d, precision, c * t_norm, fp16_values)


@dataclass
class SimTile:
    """Screen similarities of one row tile against one test tile, plus exact recomputation."""

    sims: torch.Tensor  # (Rp, C) screen dtype; padding rows and columns hold -inf
    n_rows: int  # real rows (the first n_rows of sims)
    row0: int  # position of the first row within the current block
    x: torch.Tensor  # (n_rows, d) float32 copy of the tile's base rows (exact)
    row_ids: torch.Tensor  # (n_rows,) int64 global row ids
    tests: TestTile
    eps: float  # bound on |screen - exact| for every pair of the tile, incl. slack
    row_group: int  # rows per 2D block (h)
    fp32_products: bool  # base rows and tests are all fp16 values
    scratch: Scratch

    @cached_property
    def _block_max_padded(self) -> torch.Tensor:
        rp, c = self.sims.shape
        g = self.tests.group
        view = self.sims.view(rp, g, c // g)
        out = self.scratch.get("block_max", (rp, c // g), torch.float32)
        if self.sims.dtype == torch.float32:
            return torch.amax(view, 1, out=out)
        return out.copy_(torch.amax(view, 1, out=self.scratch.get("bm_low", out.shape, view.dtype)))

    @property
    def block_max(self) -> torch.Tensor:
        """(n_rows, nb) float32: per row, the max over each block of ``group`` tests."""
        return self._block_max_padded[: self.n_rows]

    @cached_property
    def block_max_2d(self) -> torch.Tensor:
        """(Rp/h, nb) float32: max over ``row_group`` rows x ``group`` tests."""
        q = self._block_max_padded
        out = self.scratch.get("block_max_2d", (q.shape[0] // self.row_group, q.shape[1]), q.dtype)
        return torch.amax(q.view(-1, self.row_group, q.shape[1]), 1, out=out)

    def buffer(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A (n_rows, nb) scratch array for handler temporaries."""
        rp, c = self.sims.shape
        return self.scratch.get(name, (rp, c // self.tests.group), dtype)[: self.n_rows]

    def row_block(self, r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, g) screen values of row r over the tests of block b (column i*nb + b)."""
        rp, c = self.sims.shape
        return self.sims.view(rp, self.tests.group, c // self.tests.group)[r, :, b].float()

    def block_2d(self, j: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, h, g) screen values of 2D block (row group j, test block b)."""
        rp, c = self.sims.shape
        g = self.tests.group
        return self.sims.view(rp // self.row_group, self.row_group, g, c // g)[j, :, :, b].float()

    def exact(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Reference similarities of (tile row, tile column) pairs."""
        return exact_sims(self.x, rows, self.tests.exact, cols, self.fp32_products, self.scratch)


def _pairs_from_row_blocks(
    tile: SimTile, r: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the elements selected by ``mask`` (n, g) within row blocks (r, b)."""
    k, i = torch.nonzero(mask, as_tuple=True)
    return r[k], i * tile.tests.nb + b[k]


def _pairs_from_2d_blocks(
    tile: SimTile, j: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the elements selected by ``mask`` (n, h, g) within 2D blocks, real rows."""
    k, ih, ig = torch.nonzero(mask, as_tuple=True)
    rows = j[k] * tile.row_group + ih
    cols = ig * tile.tests.nb + b[k]
    real = rows < tile.n_rows
    return rows[real], cols[real]


def _screen_pairs(tile: SimTile, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every real pair whose screen value is >= lo[column].

    2D blocks whose max is below the smallest lo of their tests are skipped; when most blocks
    qualify (early in a scan) one dense comparison is cheaper than gathering them."""
    tt = tile.tests
    j, b = torch.nonzero(tile.block_max_2d >= lo.view(tt.group, tt.nb).amin(0), as_tuple=True)
    if len(j) > DENSE_SCREEN * tile.block_max_2d.numel():
        mask = tile.scratch.get("dense_mask", tile.sims.shape, torch.bool)
        # Compared in float32 (type promotion): rounding lo to bf16 would not be conservative.
        torch.ge(tile.sims, lo, out=mask)
        return torch.nonzero(mask[: tile.n_rows], as_tuple=True)
    rows, cols = [], []
    for s in range(0, len(j), BLOCK_CHUNK):
        jj, bb = j[s : s + BLOCK_CHUNK], b[s : s + BLOCK_CHUNK]
        mask = tile.block_2d(jj, bb) >= _col_values(lo, tile, bb)[:, None, :]
        r, c = _pairs_from_2d_blocks(tile, jj, bb, mask)
        rows.append(r)
        cols.append(c)
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64, device=lo.device)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


def _col_values(v: torch.Tensor, tile: SimTile, b: torch.Tensor) -> torch.Tensor:
    """Per-column values v (C,) of the tests of blocks b, as (n, g)."""
    return v.view(tile.tests.group, tile.tests.nb)[:, b].T


# ----------------------------------------------------------------------------- handlers
# faiss ResultHandler style: begin(n_rows) before a block, add_results(tile) per tile, end()
# after it. Per-row handlers hold one block's rows; per-test handlers accumulate over the scan
# and hand their totals over with result().


class RowMaxHandler:
    """Per base row: max similarity over all tests and its test index (ties: lowest index)."""

    def begin(self, n_rows: int, device: torch.device) -> None:
        self.value = torch.full((n_rows,), -math.inf, dtype=torch.float32, device=device)
        self.index = torch.full((n_rows,), -1, dtype=torch.int64, device=device)

    def add_results(self, tile: SimTile) -> None:
        n, eps = tile.n_rows, tile.eps
        q = tile.block_max
        span = slice(tile.row0, tile.row0 + n)
        # The tile's exact max is >= screen max - eps, so its test has screen >= screen max - 2eps;
        # and only a pair reaching the max of earlier test tiles (exact) can change the result.
        cut = torch.maximum(q.amax(1) - 2 * eps, self.value[span] - eps)
        above = torch.ge(q, cut[:, None], out=tile.buffer("mask", torch.bool))
        r, b = torch.nonzero(above, as_tuple=True)
        rows, cols = _pairs_from_row_blocks(tile, r, b, tile.row_block(r, b) >= cut[r, None])
        sims = tile.exact(rows, cols)
        best = torch.full((n,), -math.inf, dtype=torch.float32, device=q.device)
        best.scatter_reduce_(0, rows, sims, "amax")
        at_best = sims == best[rows]
        idx = torch.full((n,), torch.iinfo(torch.int64).max, device=q.device)
        idx.scatter_reduce_(0, rows[at_best], tile.tests.index[cols[at_best]], "amin")
        old_v, old_i = self.value[span], self.index[span]
        take = (best > old_v) | ((best == old_v) & (idx < old_i))
        self.value[span] = torch.where(take, best, old_v)
        self.index[span] = torch.where(take, idx, old_i)

    def end(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.value, self.index


class MarginHandler:
    """Per base row: ``max_t float32(sim(x, t) - thr(t))``; a row is above a threshold iff > 0."""

    def begin(self, n_rows: int, device: torch.device) -> None:
        self.value = torch.full((n_rows,), -math.inf, dtype=torch.float32, device=device)

    def add_results(self, tile: SimTile) -> None:
        eps, tt = tile.eps, tile.tests
        q = tile.block_max
        span = slice(tile.row0, tile.row0 + tile.n_rows)
        buf = tile.buffer("margin", torch.float32)
        # Block b holds a pair with margin >= q - eps - thr_max(b): a lower bound for the row.
        # No pair of b exceeds q + eps - thr_min(b): keep the blocks that can reach the bound.
        bound = torch.sub(q, tt.thr_block_max, out=buf).amax(1) - eps
        reach = torch.maximum(bound, self.value[span]) - eps  # screen - thr must reach this
        upper = torch.sub(q, tt.thr_block_min, out=buf)
        mask = torch.ge(upper, reach[:, None], out=tile.buffer("mask", torch.bool))
        r, b = torch.nonzero(mask, as_tuple=True)
        vals = tile.row_block(r, b) - _col_values(tt.thr, tile, b)
        rows, cols = _pairs_from_row_blocks(tile, r, b, vals >= reach[r, None])
        margins = tile.exact(rows, cols) - tt.thr[cols]
        best = self.value[span].clone()
        best.scatter_reduce_(0, rows, margins, "amax")
        self.value[span] = best

    def end(self) -> torch.Tensor:
        return self.value


class TopKHandler:
    """Per test: the k most similar base rows (similarity descending, ties: lower row id).

    Candidates are buffered and merged in batches: a merge sorts every touched test's list, so
    merging per tile would cost more than the GEMM. Screening against the k-th value of the last
    merge stays exact, only less tight (that value can only rise)."""

    def __init__(self, n_tests: int, k: int, device: torch.device):
        self.k = k
        self.sim = torch.full((n_tests, k), -math.inf, dtype=torch.float32, device=device)
        self.row = torch.full((n_tests, k), -1, dtype=torch.int64, device=device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0
        self.flush_at = max(n_tests * k // 2, 4096)

    def begin(self, n_rows: int, device: torch.device) -> None:
        pass

    def add_results(self, tile: SimTile) -> None:
        tt, eps, k = tile.tests, tile.eps, self.k
        real = tt.index >= 0
        # A pair enters the top-k only if exact >= the current k-th value: screen >= kth - eps.
        kth = torch.where(real, self.sim[tt.index.clamp(min=0), -1], math.inf)
        lo = kth - eps
        fresh = torch.isneginf(kth)
        any_fresh = bool(fresh.any())
        if tile.n_rows >= k and any_fresh:
            # Warm start: k rows of this tile have screen >= the k-th screen value v, so the
            # exact k-th value after this tile is >= v - eps and candidates have screen >= v - 2eps.
            v = torch.topk(tile.sims[: tile.n_rows], k, dim=0).values[-1].float()
            lo = torch.where(fresh, v - 2 * eps, lo)
        rows, cols = _screen_pairs(tile, lo)
        if len(rows):
            sims = tile.exact(rows, cols)
            keep = sims >= kth[cols]
            self.pending.append((tt.index[cols[keep]], sims[keep], tile.row_ids[rows[keep]]))
            self.n_pending += len(rows)
        # Merge now if the buffer is large or some test has no k-th value yet to screen with.
        if self.n_pending >= self.flush_at or any_fresh:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tests, sims, rows = (torch.cat(p) for p in zip(*self.pending, strict=True))
        self.pending, self.n_pending = [], 0
        if len(tests) == 0:
            return
        k = self.k
        u, inv = torch.unique(tests, return_inverse=True)
        group = torch.cat([torch.arange(len(u), device=u.device).repeat_interleave(k), inv])
        s = torch.cat([self.sim[u].flatten(), sims])
        r = torch.cat([self.row[u].flatten(), rows])
        o = _lexsort_topk(group, s, r)
        group, s, r = group[o], s[o], r[o]
        counts = torch.bincount(group, minlength=len(u))
        rank = torch.arange(len(group), device=u.device) - (torch.cumsum(counts, 0) - counts)[group]
        first = rank < k
        self.sim[u[group[first]], rank[first]] = s[first]
        self.row[u[group[first]], rank[first]] = r[first]

    def end(self) -> None:
        pass

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.flush()
        return self.sim, self.row


class CountAboveHandler:
    """Per test: the number of base rows with similarity strictly above its threshold."""

    def __init__(self, n_tests: int, device: torch.device):
        self.count = torch.zeros(n_tests, dtype=torch.int64, device=device)

    def begin(self, n_rows: int, device: torch.device) -> None:
        pass

    def add_results(self, tile: SimTile) -> None:
        tt, eps = tile.tests, tile.eps
        # Screen below thr - eps: never above; above thr + eps: surely above; between: recheck.
        lo, hi = tt.thr - eps, tt.thr + eps
        rows, cols = _screen_pairs(tile, lo)
        if len(rows) == 0:
            return
        sure = tile.sims[rows, cols].float() > hi[cols]
        band = ~sure
        exact_above = tile.exact(rows[band], cols[band]) > tt.thr[cols[band]]
        hits = torch.cat([cols[sure], cols[band][exact_above]])
        per_col = torch.zeros(tt.cols, dtype=torch.int64, device=lo.device)
        per_col.index_add_(0, hits, torch.ones_like(hits))
        real = tt.index >= 0
        self.count.index_add_(0, tt.index[real], per_col[real])

    def end(self) -> None:
        pass

    def result(self) -> torch.Tensor:
        return self.count


def _lexsort_topk(group: torch.Tensor, sim: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Order by group ascending, similarity descending, row id ascending (stable sorts)."""
    o = torch.argsort(row, stable=True)
    o = o[torch.argsort(sim[o], descending=True, stable=True)]
    return o[torch.argsort(group[o], stable=True)]


def merge_topk(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-test top-k partials (sim (M,k), row (M,k)) over disjoint row sets.

    The result is the top-k of the union in the total order (sim desc, row asc), so the merge is
    associative and commutative: shards can be scanned and merged in any order."""
    sim = np.concatenate([a[0], b[0]], axis=1)
    row = np.concatenate([a[1], b[1]], axis=1)
    k = a[0].shape[1]
    # -inf padding (row -1) sorts last: -sim is +inf there.
    order = np.lexsort((row, -sim), axis=1)[:, :k]
    return (
        np.take_along_axis(sim, order, axis=1).astype(np.float32),
        np.take_along_axis(row, order, axis=1).astype(np.int64),
    )


# ----------------------------------------------------------------------------- the tile loop


@dataclass(frozen=True)
class KernelConfig:
    """Where and how blocks are scanned; chosen by the caller, never global.

    The one home of the scan's tuning parameters. "auto" and None fields are resolved by
    ``resolved()`` from measurements on the 2-core AVX2 development machine: fp32 screen (no
    native bf16 there), numpy's OpenBLAS GEMM (~1.4x torch's GEMM on that AMD CPU),
    single-threaded reductions, tiles of 2048 rows x 8192 tests; on CUDA bf16 and large tiles.
    Results never depend on these choices (the screen is exact), only speed does."""

    precision: str = "auto"  # screen GEMM dtype: "fp32", "bf16" or "auto" (resolve_precision)
    device: str = "cpu"
    tile_rows: int | None = None
    tile_tests: int | None = None
    row_group: int = 4
    test_group: int = 32
    gemm: str = "auto"  # "numpy": fp32 CPU GEMM through numpy's BLAS; "torch"; "auto"
    # torch intra-op threads for the reductions between GEMMs (None: leave torch's setting).
    # On small CPUs 1 is faster: those ops are short, and parallel regions stall on barriers
    # while BLAS threads still spin after a GEMM or other processes hold a core.
    reduce_threads: int | None | str = "auto"

    def resolved(self) -> KernelConfig:
        """This config with every "auto"/None choice made for its device."""
        precision = resolve_precision(self.precision, self.device)
        cuda = torch.device(self.device).type == "cuda"
        gemm = self.gemm
        if gemm == "auto":
            gemm = "numpy" if precision == "fp32" and not cuda else "torch"
        if gemm not in ("torch", "numpy") or (gemm == "numpy" and (cuda or precision != "fp32")):
            raise ValueError(f"gemm {gemm!r} is not available for {precision} on {self.device}")
        threads = self.reduce_threads
        if threads == "auto":
            threads = None if cuda else 1
        return replace(
            self,
            precision=precision,
            gemm=gemm,
            tile_rows=self.tile_rows or (8192 if cuda else 2048),
            tile_tests=self.tile_tests or (16384 if cuda else 8192),
            reduce_threads=threads,
        )


def tile_gemm(xs: torch.Tensor, ts: torch.Tensor, out: torch.Tensor, gemm: str) -> torch.Tensor:
    if gemm == "numpy":
        np.matmul(xs.numpy(), ts.numpy().T, out=out.numpy())
    else:
        torch.mm(xs, ts.T, out=out)
    return out


def scan_block(
    x: torch.Tensor,
    row_ids: torch.Tensor,
    tests: TestSet,
    handlers: list,
    cfg: KernelConfig,
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
    screen_dtype = SCREEN_DTYPES[tests.precision]
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
            xs = x32
            if screen_dtype != torch.float32:
                xs = scratch.get("xs", (rp, d), screen_dtype).copy_(x32)
            # A float32 norm is within d*u32 relative; the (1 + 2**-10) factor covers it and
            # the float32 rounding of the bounds evaluated on values up to ~|x||t|.
            x_norm = float(torch.linalg.vector_norm(x32[:rn], dim=1).max()) if rn else 0.0
            eps = tests.eps_per_row_norm * x_norm * (1 + 2**-10) + SLACK
            ids = row_ids[r0 : r0 + rn]
            for tt in tests.tiles:
                out = scratch.get("sims", (rp, tt.cols), screen_dtype)
                with _intra_op_threads(gemm_threads if cfg.gemm == "torch" else None):
                    sims = tile_gemm(xs, tt.screen, out, cfg.gemm)
                sims[rn:] = -math.inf
                if len(tt.pad_cols):
                    sims.index_fill_(1, tt.pad_cols, -math.inf)
                tile = SimTile(sims, rn, r0, x32, ids, tt, eps, hg, fp32_products, scratch)
                for h in handlers:
                    h.add_results(tile)


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
