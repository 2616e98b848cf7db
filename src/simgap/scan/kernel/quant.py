"""The int8 screen's quantization and its proven per-tile bound (``Int8Bound``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simgap.scan.kernel.numerics import U32


@dataclass(frozen=True)
class QuantNorms:
    """Upper bounds over a set of quantized rows v ~ scale*q: max |v|, the largest residual
    |v - scale*q| and max |scale*q| (float64 norms of exact residuals, rounded up)."""

    norm: float
    resid: float
    qnorm: float

    def max(self, other: QuantNorms) -> QuantNorms:
        return QuantNorms(
            *(max(a, b) for a, b in zip(self.astuple(), other.astuple(), strict=True))
        )

    def astuple(self) -> tuple[float, float, float]:
        return self.norm, self.resid, self.qnorm


@dataclass(frozen=True)
class QuantRows:
    """Rows v quantized as ``v ~ scale * q`` with q int8 in [-m, m], one scale per row."""

    q: torch.Tensor  # (n, d) int8
    scale: torch.Tensor  # (n,) float32, > 0
    norms: QuantNorms


def quantize_rows(v: torch.Tensor, m: int, scale: torch.Tensor | None = None) -> QuantRows:
    """Symmetric int8 quantization of float32 rows v (n, d): per row, or with given scales
    (one per row, >= max|v_i| / m for the row, e.g. shared by a block of tests).

    Any positive scale is valid for the bound, whose residuals are measured, not assumed: the
    scale max|v_i|/m only makes them small. Everything is float32, with its rounding bounded
    (u = 2**-24): ``deq = fl(q*s)`` is within u|deq|/(1-u) of q*s and ``r = fl(v - deq)`` within
    u|r|/(1-u) of v - deq, so elementwise |v - q*s| <= (1+2u)|r| + 2u|deq| and the norms follow
    by the triangle inequality; a float32 norm N of d terms, in any order, satisfies
    |a| <= N (1 + (d+4)u)."""
    if scale is None:
        amax = v.abs().amax(1) if v.shape[1] else torch.zeros(len(v), device=v.device)
        scale = torch.where(amax > 0, amax / m, torch.ones_like(amax))
    q = torch.round(v / scale[:, None]).clamp_(-m, m).to(torch.int8)
    deq = q.float().mul_(scale[:, None])
    resid = torch.sub(v, deq)
    up = 1 + (v.shape[1] + 4) * U32

    def biggest(a: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(a, dim=1).max()) * up if len(a) else 0.0

    n_deq = biggest(deq)
    norms = QuantNorms(
        biggest(v), (1 + 2 * U32) * biggest(resid) + 2 * U32 * n_deq, (1 + 2 * U32) * n_deq
    )
    return QuantRows(q, scale, norms)


@dataclass(frozen=True)
class Int8Bound:
    """The int8 screen's bound for one (row tile, test tile).

    The screen of a pair is ``s = fl(fl(fl(a) * st) * sx)`` with ``a = qx . qt`` the int32 dot
    product of the quantized rows (exact: the GEMM is checked to accumulate exactly in int32,
    ``int8_range``, and |a| <= d*127**2 < 2**31). With ``x = sx*qx + rx`` and ``t = st*qt + rt``,

        x.t - (sx qx).(st qt) = rx.t + (sx qx).rt,  so  |x.t - sx st a| <= |rx||t| + |sx qx||rt|

    (Cauchy-Schwarz), and the three float32 roundings add at most ((1+u)^3 - 1)|sx st a| <=
    3.0001 u |sx qx||st qt| (u = 2**-24; the int32-to-float32 conversion is one of them). The
    reference float32(x.t) is within u |x||t| of x.t. So, per pair and hence over the tile,

        |s - float32(x.t)| <= |rx||t| + |sx qx||rt| + 3.0001 u |sx qx||st qt| + u |x||t|.

    Nothing here depends on the GEMM's order of summation, its blocking or its hardware."""

    rows: QuantNorms
    tests: QuantNorms

    def eps(self) -> float:
        x, t = self.rows, self.tests
        quant = x.resid * t.norm + x.qnorm * t.resid
        return quant + 3.0001 * U32 * x.qnorm * t.qnorm + U32 * x.norm * t.norm
