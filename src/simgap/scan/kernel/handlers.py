"""Result handlers: the reductions of a screen tile, each exact, and the top-k merge."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch

from simgap.scan.kernel.tiles import SimTile

DENSE_SCREEN = 0.125  # fraction of candidate row blocks above which a screen runs densely


def _pairs_from_row_blocks(
    tile: SimTile, r: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the elements selected by ``mask`` (n, g) within row blocks (r, b)."""
    k, i = torch.nonzero(mask, as_tuple=True)
    return r[k], i * tile.tests.nb + b[k]


def _screen_pairs(
    tile: SimTile, lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, screen value as float) of every real pair whose screen value is >= lo[column].

    Row blocks (a row x the ``group`` tests of a block) whose max is below the smallest lo of
    their tests are skipped, and the others gathered in one step; when many qualify (early in a
    scan) one dense comparison is cheaper than gathering them."""
    tt = tile.tests
    lo_block = lo.view(tt.group, tt.nb).amin(0)
    above = torch.ge(tile.block_max, lo_block, out=tile.buffer("screen_mask", torch.bool))
    r, b = torch.nonzero(above, as_tuple=True)
    if len(r) > DENSE_SCREEN * above.numel():
        mask = tile.scratch.get("dense_mask", tile.sims.shape, torch.bool)
        dense = tile.dense()
        # Compared in float32 (type promotion): rounding lo to bf16 would not be conservative.
        torch.ge(dense, lo, out=mask)
        rows, cols = torch.nonzero(mask[: tile.n_rows], as_tuple=True)
        return rows, cols, dense[rows, cols].float()
    vals = tile.row_block(r, b)
    k, i = torch.nonzero(vals >= _col_values(lo, tile, b), as_tuple=True)
    return r[k], i * tt.nb + b[k], vals[k, i]


def _pilot(
    tile: SimTile,
    q: torch.Tensor,
    block: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row, the exact value (minus thr of its test, if given) of the pair with the best
    screen value (minus thr) within ``block`` (default: the block holding the row's screen max).

    One exact recomputation per row, in row order: a cheap, tight lower bound of the row's
    maximum, which narrows the candidates of the per-row handlers."""
    n = tile.n_rows
    ar = torch.arange(n, device=q.device)
    if block is None:
        block = q.argmax(1)
    vals = tile.row_block(ar, block)
    if thr is not None:
        vals = vals - _col_values(thr, tile, block)
    cols = vals.argmax(1) * tile.tests.nb + block
    sims = tile.exact(ar, cols)
    return sims if thr is None else sims - thr[cols]


def _col_values(v: torch.Tensor, tile: SimTile, b: torch.Tensor) -> torch.Tensor:
    """Per-column values v (C,) of the tests of blocks b, as (n, g)."""
    return v.view(tile.tests.group, tile.tests.nb)[:, b].T


# ----------------------------------------------------------------------------- handlers
# faiss ResultHandler style: begin(n_rows) before a block, add_results(tile) per tile, end()
# after it. Per-row handlers hold one block's rows; per-test handlers accumulate over the scan
# and hand their totals over with result().


class ResultHandler(Protocol):
    """What the tile loop calls on every reduction; ``result()`` is the one way to read it."""

    def begin(self, n_rows: int, device: torch.device) -> None: ...

    def add_results(self, tile: SimTile) -> None: ...

    def end(self) -> None: ...

    def result(self) -> Any: ...


class RowMaxHandler:
    """Per base row: max similarity over all tests and its test index (ties: lowest index)."""

    def begin(self, n_rows: int, device: torch.device) -> None:
        self.value = torch.full((n_rows,), -math.inf, dtype=torch.float32, device=device)
        self.index = torch.full((n_rows,), -1, dtype=torch.int64, device=device)

    def add_results(self, tile: SimTile) -> None:
        n, eps = tile.n_rows, tile.eps
        q = tile.block_max
        span = slice(tile.row0, tile.row0 + n)
        # A pilot: the exact similarity of each row's screen-best pair is a lower bound of the
        # row's max, as is the max of earlier test tiles; only a pair whose exact value reaches
        # it, so whose screen reaches it - eps, can change the result. (Without the pilot the
        # bound would be screen max - eps, and the cut twice as far below the max.)
        lower = torch.maximum(_pilot(tile, q), self.value[span])
        cut = lower - eps
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

    def end(self) -> None:
        pass

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
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
        # A pilot pair per row (the best screen margin of the block with the best lower bound)
        # gives an exact margin: a lower bound for the row, as is the margin of earlier tiles.
        # No pair of block b exceeds q + eps - thr_min(b): keep the blocks that can reach it.
        best_block = torch.sub(q, tt.thr_block_max, out=buf).argmax(1)
        pilot = _pilot(tile, q, best_block, tt.thr)
        reach = torch.maximum(pilot, self.value[span]) - eps  # screen - thr must reach this
        upper = torch.sub(q, tt.thr_block_min, out=buf)
        mask = torch.ge(upper, reach[:, None], out=tile.buffer("mask", torch.bool))
        r, b = torch.nonzero(mask, as_tuple=True)
        vals = tile.row_block(r, b) - _col_values(tt.thr, tile, b)
        rows, cols = _pairs_from_row_blocks(tile, r, b, vals >= reach[r, None])
        margins = tile.exact(rows, cols) - tt.thr[cols]
        best = self.value[span].clone()
        best.scatter_reduce_(0, rows, margins, "amax")
        self.value[span] = best

    def end(self) -> None:
        pass

    def result(self) -> torch.Tensor:
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
            # Warm start: the exact values of the k rows of this tile with the best screen
            # values; the k-th value after this tile is >= their minimum v, so candidates have
            # screen >= v - eps.
            cols = torch.nonzero(fresh).flatten()
            top = torch.topk(tile.dense()[: tile.n_rows, cols], k, dim=0).indices
            exact = tile.exact(top.flatten(), cols.repeat(k)).view(k, len(cols))
            lo = lo.clone()
            lo[cols] = exact.amin(0) - eps
        rows, cols, _ = _screen_pairs(tile, lo)
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
        rows, cols, values = _screen_pairs(tile, lo)
        if len(rows) == 0:
            return
        sure = values > hi[cols]
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
