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
tie.) The tile GEMM runs in a cheaper *screen* precision (fp32, bf16 or int8) with a proven
bound ``|screen - sim| <= eps`` for every pair of the tile: ``c * |x| * |t|`` for the float
screens (``error_coefficient``), and for int8 one from the rows' quantization residual norms
(``Int8Bound``). Handlers use the screen only to discard pairs that provably cannot matter and
recompute the remaining candidates exactly, so every reported value and every decision equals
the brute force. docs/scan-numerics.md collects the derivations.

What is proven, on which hardware:
- fp32 screen: IEEE fp32 GEMMs (OpenBLAS/oneDNN on CPUs, cuBLAS SGEMM); TF32 or bf16-input fp32
  modes (torch's fp32_precision / matmul precision) are detected and bounded with bf16's unit
  roundoff and, on CUDA, truncating accumulation.
- bf16 screen: CPUs accumulate bf16 products in IEEE fp32. NVIDIA tensor cores truncate in their
  multi-term adds: modelled with 4x fp32's unit roundoff (``UTC``), after Fasi, Higham,
  Mikaitis and Pranesh (PeerJ CS 2021) and Khattak and Mikaitis (arXiv:2512.07004, with the
  H100). The screen GEMM runs with bf16 reduced-precision split-K reductions off
  (``screen_gemm_guard``), so no partial sum is rounded to bf16. The tensor-core model is taken
  from those papers, not proven here; ``benchmarks/gpu_check_scan.py`` probes it.
- int8 screen: any backend, because the bound needs only that the int32 GEMM is exact, and that
  is checked on the running backend for every tile shape before use (``int8_gemm_exact``):
  oneDNN without VNNI saturates int16 pair sums at full range, and the check then narrows the
  range. Integer tensor cores and VNNI accumulate exactly in int32.

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
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch

U32 = 2.0**-24  # unit roundoff of float32
UBF16 = 2.0**-8  # unit roundoff of bfloat16
# Tensor-core accumulation (bf16, TF32) aligns the k products of a block FMA to the largest
# exponent and truncates: modelled as fp32 accumulation with 4x the unit roundoff (Fasi, Higham,
# Mikaitis, Pranesh, PeerJ CS 7:e330, 2021).
UTC = 2.0**-22
SLACK = 2.0**-18  # absolute slack for float32 rounding in the bounds computed on screen values
EXACT_CHUNK = 1024  # pairs per exact recomputation step (its gathers live in Scratch)
EXACT_CHUNK_CUDA = 16384  # on a GPU each step is a handful of launches: fewer, larger steps
BLOCK_CHUNK = 512  # 2D blocks gathered per step by the per-test handlers
DENSE_SCREEN = 0.125  # fraction of candidate 2D blocks above which top-k screens densely

SCREEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
PRECISIONS = ("auto", *SCREEN_DTYPES)
# Symmetric int8 ranges tried in turn, (base rows, tests): the first one whose tile GEMM is
# exact on this backend is used (see ``int8_range``). Without VNNI, oneDNN's s8s8s32 GEMM adds
# 128 to one operand and sums pairs of u8*s8 products in int16 (vpmaddubsw), which saturates
# unless the other operand stays within +-63.
INT8_RANGES = ((127, 127), (127, 63), (63, 127), (63, 63))


def screen_for_cpu(flags: frozenset[str] | set[str]) -> str:
    """The fastest exact screen, end to end, for a CPU with these /proc/cpuinfo flags.

    bf16 where the CPU multiplies bf16 natively (AVX512_BF16, AMX); fp32 otherwise. The int8
    GEMM alone runs at 1.3-2.5x the fp32 rate under AVX2, but its error bound (0.023 at d=512,
    twice bf16's) sends 2-4x more pairs to the exact recheck, and the scan measured slower end to
    end with int8 than with fp32, both with VNNI (21.8 vs 28.9 GOP/s) and with oneDNN held to
    AVX2 (19.5 vs 26.1): docs/scan-numerics.md. int8 stays available by name, and on CUDA
    ``auto`` measures it against bf16."""
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    return "fp32"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; torch's own checks elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = {
        "avx2": torch.cpu._is_avx2_supported,
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported,
        "amx_bf16": torch.cpu._is_amx_tile_supported,
        "avx512_vnni": torch.cpu._is_vnni_supported,
    }
    return frozenset(name for name, probe in probes.items() if probe())


def screen_for_cuda(rates: dict[str, float]) -> str:
    """The screen with the higher measured tile-GEMM rate on a GPU (``cuda_screen_rates``)."""
    return "int8" if rates.get("int8", 0.0) > rates.get("bf16", 0.0) else "bf16"


_CUDA_RATES: dict[str, dict[str, float]] = {}


def cuda_screen_rates(device: torch.device, rows: int, cols: int, dim: int) -> dict[str, float]:
    """Measured bf16 and int8 tile-GEMM rates (ops/s) on a GPU, once per process and device.

    Timed with CUDA events over 20 repetitions after a warm-up, on the scan's tile shape."""
    key = f"{device}:{rows}x{cols}x{dim}"
    if key not in _CUDA_RATES:
        rates = {}
        for precision in ("bf16", "int8"):
            dtype = SCREEN_DTYPES[precision]
            a = torch.ones((rows, dim), dtype=dtype, device=device)
            b = torch.ones((cols, dim), dtype=dtype, device=device)
            out_dtype = torch.int32 if precision == "int8" else dtype
            out = torch.empty((rows, cols), dtype=out_dtype, device=device)
            try:
                tile_gemm(a, b, out, "torch")
            except RuntimeError:  # no int8 GEMM for this GPU or shape
                rates[precision] = 0.0
                continue
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                tile_gemm(a, b, out, "torch")
            stop.record()
            stop.synchronize()
            rates[precision] = 2.0 * rows * cols * dim * 20 / (start.elapsed_time(stop) / 1e3)
        _CUDA_RATES[key] = rates
    return _CUDA_RATES[key]


def resolve_precision(
    precision: str, device: str | torch.device, flags: frozenset[str] | None = None
) -> str:
    """``auto`` picks the fastest exact screen of the hardware: ``screen_for_cpu`` on CPUs (from
    ``flags``, default this CPU's); on CUDA the faster of bf16 and int8 as measured on the
    default tile shape (``cuda_screen_rates``; this initialises CUDA in the calling process).

    Without native bf16 instructions torch emulates bf16 GEMMs: 4-15x slower than fp32."""
    if precision in SCREEN_DTYPES:
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return screen_for_cuda(cuda_screen_rates(dev, 8192, 16384, 512))
    return screen_for_cpu(cpu_flags() if flags is None else flags)


@dataclass(frozen=True)
class GemmNumerics:
    """Rounding model of a screen GEMM, as unit roundoffs: the inputs' rounding to the screen
    dtype, the fp32 accumulation, the output's rounding, and extra roundings of partial sums
    (split-K reductions in a reduced precision)."""

    u_in: float
    u_acc: float
    u_out: float
    extra_out_roundings: int = 0


def fp32_matmul_mode(device_type: str) -> str:
    """How torch runs fp32 GEMMs on a backend: "ieee", or "tf32"/"bf16"/"reduced" (faster modes).

    Reads the precision API of torch >= 2.9 first (``fp32_precision``, "none" defers to the
    global setting); the legacy getters raise RuntimeError once the new API was used, so they
    are read only as a fallback, and an unreadable state counts as reduced (conservative)."""
    backend = torch.backends.cuda.matmul if device_type == "cuda" else torch.backends.mkldnn.matmul
    try:
        mode = getattr(backend, "fp32_precision", "none")
        if mode == "none":
            mode = getattr(torch.backends, "fp32_precision", "none")
        if mode != "none":
            return mode
    except (AttributeError, RuntimeError):
        pass
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return "reduced"
        if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
    except RuntimeError:
        return "reduced"
    return "ieee"


def gemm_numerics(precision: str, device_type: str, fp32_mode: str = "ieee") -> GemmNumerics:
    """The rounding model of the bf16/fp32 screen GEMM on a device.

    CPU (oneDNN/OpenBLAS) and cuBLAS SGEMM accumulate in IEEE fp32 (round to nearest). NVIDIA
    tensor cores (bf16, TF32) truncate in their multi-term adds: ``UTC``. On CUDA the screen GEMM
    runs with reduced-precision split-K reductions turned off (``screen_gemm_guard``), so partial
    sums are never rounded to bf16. A reduced fp32 mode (TF32, or bf16 inputs on CPUs) rounds the
    inputs to at most bf16's unit roundoff."""
    cuda = device_type == "cuda"
    if precision == "bf16":
        return GemmNumerics(UBF16, UTC if cuda else U32, UBF16)
    if precision != "fp32":
        raise ValueError(f"no float rounding model for the {precision} screen")
    if fp32_mode == "ieee":
        return GemmNumerics(0.0, U32, 0.0)
    return GemmNumerics(UBF16, UTC if cuda else U32, 0.0)


def error_coefficient(
    dim: int, precision: str, device: str | torch.device, numerics: GemmNumerics | None = None
) -> float:
    """c with ``|screen(x.t) - float32(x.t)| <= c * sum_i |x_i t_i| <= c * |x| * |t|``.

    Terms (u: unit roundoff of the GEMM inputs; gamma_d = d*v/(1-d*v) with v the accumulation's
    unit roundoff, Higham's bound for a d-term sum in any order or blocking): rounding of x and t
    to the screen dtype (2u + u^2), the accumulation (gamma_d (1+u)^2), rounding of the output
    to the screen dtype (u_out (1+u)^2 (1+gamma_d)) and of any partial sums, and the reference's
    own rounding of the exact dot product to float32 (u32). Products of bf16, fp16 or TF32
    values are exact in fp32. The int8 screen has its own, per-row bound (``Int8Bound``)."""
    dev = torch.device(device).type
    if numerics is None:
        mode = fp32_matmul_mode(dev) if precision == "fp32" else "ieee"
        numerics = gemm_numerics(precision, dev, mode)
    u_in, u_out = numerics.u_in, numerics.u_out
    gamma = dim * numerics.u_acc / (1 - dim * numerics.u_acc)
    c = (2 * u_in + u_in**2) + gamma * (1 + u_in) ** 2
    grow = (1 + u_out) ** numerics.extra_out_roundings
    c += (grow * (1 + u_out) - 1) * (1 + u_in) ** 2 * (1 + gamma) + U32
    return c


@contextmanager
def screen_gemm_guard(device_type: str) -> Iterator[None]:
    """Around the CUDA screen GEMM: no split-K partial sums rounded to bf16 (the bound assumes
    fp32 accumulation throughout). torch reads the flag at every GEMM; restored after."""
    if device_type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before


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


# ----------------------------------------------------------------------------- int8 screen


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


_INT8_EXACT: dict[tuple, bool] = {}


def int8_gemm_exact(rows: int, cols: int, dim: int, ranges: tuple[int, int], device) -> bool:
    """Whether the int8 tile GEMM of this shape accumulates exactly at these ranges, once per
    process, shape and thread count.

    Saturating backends (int16 pair sums) go wrong first where every product has its largest
    magnitude with one sign; rows of +-m and alternating signs, against the same on the test
    side, reach every such extreme of every partial sum at every output position."""
    dev = torch.device(device)
    key = (rows, cols, dim, ranges, str(dev), torch.get_num_threads())
    if key not in _INT8_EXACT:
        mx, mt = ranges
        sign = torch.ones((4, dim), dtype=torch.int32, device=dev)
        sign[1] = -1
        sign[2, 1::2] = -1
        sign[3] = -sign[2]
        a = (sign * mx)[torch.arange(rows, device=dev) % 4].to(torch.int8)
        b = (sign * mt)[torch.arange(cols, device=dev) % 4].to(torch.int8)
        want = ((sign.double() @ sign.double().T) * (mx * mt)).tolist()
        out = torch.empty((rows, cols), dtype=torch.int32, device=dev)
        got = tile_gemm(a, b, out, "torch")
        if rows % 4 == 0 and cols % 4 == 0:  # one pass (the usual case: padded tiles)
            w = torch.tensor(want, dtype=torch.int32, device=dev).view(1, 4, 1, 4)
            _INT8_EXACT[key] = bool((got.view(rows // 4, 4, cols // 4, 4) == w).all())
        else:
            _INT8_EXACT[key] = all(
                bool((got[i::4, j::4] == int(want[i][j])).all()) for i in range(4) for j in range(4)
            )
    return _INT8_EXACT[key]


def int8_range(rows: int, cols: int, dim: int, device) -> tuple[int, int]:
    """The widest int8 ranges (base rows, tests) at which the tile GEMM is exact here."""
    for ranges in INT8_RANGES:
        if int8_gemm_exact(rows, cols, dim, ranges, device):
            return ranges
    raise RuntimeError(
        f"the int8 GEMM on {device} is not exact for {rows}x{cols}x{dim} tiles at any range; "
        "scan with precision fp32 or bf16"
    )


# ----------------------------------------------------------------------------- tests, tiles


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
    row_group: int  # rows per 2D block (h)
    fp32_products: bool  # base rows and tests are all fp16 values
    scratch: Scratch
    stats: ScanStats = field(default_factory=lambda: ScanStats())
    row_scale: torch.Tensor | None = None  # (Rp,) float32 int8 row scales (1 at padding)

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

    def values(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Screen values of (tile row, tile column) pairs, as floats."""
        return self._float(self.sims[rows, cols], rows, cols % self.tests.nb)

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
        v = self.sims.view(rp, self.tests.group, c // self.tests.group)[r, :, b]
        return self._float(v, r[:, None], b[:, None])

    def block_2d(self, j: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, h, g) screen values of 2D block (row group j, test block b)."""
        rp, c = self.sims.shape
        g, h = self.tests.group, self.row_group
        v = self.sims.view(rp // h, h, g, c // g)[j, :, :, b]
        rows = j[:, None] * h + torch.arange(h, device=j.device)
        return self._float(v, rows[:, :, None], b[:, None, None])

    def exact(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Reference similarities of (tile row, tile column) pairs, each pair computed once per
        tile: the handlers' candidates overlap (row max and margin both look near a row's max,
        pilots are candidates again), and a recomputation costs ~100x a screened pair."""
        keys = rows * self.tests.cols + cols
        known, values = self._memo
        out = torch.empty(len(keys), dtype=torch.float32, device=keys.device)
        miss = torch.ones(len(keys), dtype=torch.bool, device=keys.device)
        if len(known) and len(keys):
            at = torch.searchsorted(known, keys).clamp_(max=len(known) - 1)
            hit = known[at] == keys
            out[hit] = values[at[hit]]
            miss = ~hit
        todo = torch.nonzero(miss).flatten()
        if len(todo) == len(keys):
            todo_rows, todo_cols, todo_keys = rows, cols, keys
        else:
            todo_rows, todo_cols, todo_keys = rows[todo], cols[todo], keys[todo]
        # Keys are unique within a request (handlers ask for distinct pairs).
        new = exact_sims(
            self.x, todo_rows, self.tests.exact, todo_cols, self.fp32_products, self.scratch
        )
        self.stats.rechecked += len(new)
        out[todo] = new
        if len(new):
            keys_all = torch.cat([known, todo_keys])
            order = torch.argsort(keys_all)
            self._memo = (keys_all[order], torch.cat([values, new])[order])
        return out

    @cached_property
    def _memo(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.x.device
        return torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, device=dev)


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
        torch.ge(tile.dense(), lo, out=mask)
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
        sure = tile.values(rows, cols) > hi[cols]
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
    ``resolved()``: the screen by CPU flags (``screen_for_cpu``: int8 on AVX2/VNNI CPUs, bf16
    with AVX512_BF16/AMX) or, on CUDA, by measuring bf16 against int8; numpy's OpenBLAS GEMM for
    an fp32 screen on CPUs (~1.4x torch's GEMM on the AMD development CPU), single-threaded
    reductions, tiles of 2048 rows x 8192 tests; on CUDA large tiles.
    Results never depend on these choices (the screen is exact), only speed does."""

    precision: str = "auto"  # screen: "fp32", "bf16", "int8" or "auto" (resolve_precision)
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

    def resolved(self, measure: bool = True) -> KernelConfig:
        """This config with every "auto"/None choice made for its device.

        ``measure=False`` leaves an "auto" precision on CUDA unresolved, so a driver process
        never initialises CUDA: the worker that scans resolves it (by measurement) itself."""
        cuda = torch.device(self.device).type == "cuda"
        if cuda and measure and not torch.cuda.is_available():
            raise ValueError(f"device {self.device}: this torch sees no CUDA device")
        if cuda and not measure and self.precision == "auto":
            precision = "auto"
        else:
            precision = resolve_precision(self.precision, self.device)
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
    """out = xs @ ts.T: float screens in their dtype, int8 into int32 (``torch._int_mm``)."""
    if gemm == "numpy":
        np.matmul(xs.numpy(), ts.numpy().T, out=out.numpy())
    elif xs.dtype == torch.int8:
        _int8_mm(xs, ts, out)
    else:
        torch.mm(xs, ts.T, out=out)
    return out


def _int8_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """int32 a @ b.T. cuBLAS's int8 GEMM wants more than 16 rows and multiples of 8 elsewhere:
    zero padding there changes no dot product."""
    (m, k), n = a.shape, len(b)
    if a.device.type != "cuda" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        torch._int_mm(a, b.T, out=out)
        return
    mp, kp, np_ = max(24, -(-m // 8) * 8), -(-k // 8) * 8, -(-n // 8) * 8
    ap = torch.zeros((mp, kp), dtype=torch.int8, device=a.device)
    bp = torch.zeros((np_, kp), dtype=torch.int8, device=a.device)
    ap[:m, :k], bp[:n, :k] = a, b
    out.copy_(torch._int_mm(ap, bp.T)[:m, :n])


@dataclass
class ScanStats:
    """Work counts of a scan: pairs screened, and exact recomputations (a pair can be
    recomputed by more than one handler)."""

    screened: int = 0
    rechecked: int = 0

    def add(self, other: ScanStats) -> None:
        self.screened += other.screened
        self.rechecked += other.rechecked


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
                    sims = _screen(xs, tt, row_scale, cfg, scratch, tests.int8_ranges)
                low = torch.iinfo(torch.int32).min if int8 else -math.inf
                sims[rn:] = low
                if len(tt.pad_cols):
                    sims.index_fill_(1, tt.pad_cols, low)
                tile = SimTile(
                    sims, rn, r0, x32, ids, tt, eps, hg, fp32_products, scratch, stats, row_scale
                )
                for h in handlers:
                    h.add_results(tile)


def _screen(
    xs: torch.Tensor,
    tt: TestTile,
    row_scale: torch.Tensor | None,
    cfg: KernelConfig,
    scratch: Scratch,
    int8_ranges: tuple[int, int],
) -> torch.Tensor:
    """The screen similarities of a row tile against a test tile (int32 dot products for int8:
    ``SimTile`` scales them, in the order fl(fl(fl(a) * st) * sx) that Int8Bound assumes)."""
    rp, c, d = len(xs), tt.cols, xs.shape[1]
    dev = torch.device(cfg.device).type
    if row_scale is None:
        out = scratch.get("sims", (rp, c), SCREEN_DTYPES[cfg.precision])
        with screen_gemm_guard(dev):
            return tile_gemm(xs, tt.screen, out, cfg.gemm)
    if not int8_gemm_exact(rp, c, d, int8_ranges, xs.device):
        raise RuntimeError(
            f"the int8 GEMM on {cfg.device} is not exact for {rp}x{c}x{d} tiles at ranges "
            f"{int8_ranges}; scan with precision fp32 or bf16"
        )
    return tile_gemm(xs, tt.screen, scratch.get("acc", (rp, c), torch.int32), "torch")


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
