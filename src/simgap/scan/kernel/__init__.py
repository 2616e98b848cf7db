"""Exact blocked similarity scan: one GEMM per tile, reductions in result handlers.

The loop follows faiss ``exhaustive_inner_product_blas`` (faiss/utils/distances.cpp): the GEMM of
a tile of base rows against a tile of tests lands in one scratch buffer, then every handler's
``add_results`` reduces it; the loop never knows which reductions run. Pure torch (plus numpy's
BLAS as an optional CPU GEMM), the same code on CPU and CUDA; it imports nothing of simgap.

Modules: ``numerics`` (float screens' rounding models and bounds), ``quant`` (int8 quantization
and its bound), ``screen`` (the screen GEMM, its backend checks, the choice of screen),
``tiles`` (test tiles, the screen tile and its shared reductions, exact recomputation),
``handlers`` (the reductions), ``config`` (``KernelConfig``), ``driver`` (the tile loop).

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
(an inner-axis reduction over 16 elements measured ~4x slower on CPU). That maximum is the one
full pass over a tile besides the GEMM: every handler screens row blocks (a row x the tests of a
block) with it and gathers only the blocks that can matter. Tests are sorted by threshold, so a
block's thresholds are close and the margin bounds tight.
"""

from simgap.scan.kernel.config import KernelConfig
from simgap.scan.kernel.driver import scan_block
from simgap.scan.kernel.handlers import (
    CountAboveHandler,
    MarginHandler,
    ResultHandler,
    RowMaxHandler,
    TopKHandler,
    merge_topk,
)
from simgap.scan.kernel.numerics import (
    PRECISIONS,
    SCREEN_DTYPES,
    U32,
    UBF16,
    UTC,
    GemmNumerics,
    error_coefficient,
    fp32_matmul_mode,
    gemm_numerics,
)
from simgap.scan.kernel.quant import Int8Bound, QuantNorms, QuantRows, quantize_rows
from simgap.scan.kernel.screen import (
    cpu_flags,
    int8_gemm_exact,
    int8_range,
    resolve_precision,
    screen_for_cpu,
    screen_for_cuda,
    screen_gemm_guard,
    tile_gemm,
)
from simgap.scan.kernel.tiles import (
    ScanStats,
    Scratch,
    SimTile,
    TestSet,
    TestTile,
    exact_sims,
    prepare_tests,
)

__all__ = [
    "CountAboveHandler",
    "GemmNumerics",
    "Int8Bound",
    "KernelConfig",
    "MarginHandler",
    "PRECISIONS",
    "QuantNorms",
    "QuantRows",
    "ResultHandler",
    "RowMaxHandler",
    "SCREEN_DTYPES",
    "ScanStats",
    "Scratch",
    "SimTile",
    "TestSet",
    "TestTile",
    "TopKHandler",
    "U32",
    "UBF16",
    "UTC",
    "cpu_flags",
    "error_coefficient",
    "exact_sims",
    "fp32_matmul_mode",
    "gemm_numerics",
    "int8_gemm_exact",
    "int8_range",
    "merge_topk",
    "prepare_tests",
    "quantize_rows",
    "resolve_precision",
    "scan_block",
    "screen_for_cpu",
    "screen_for_cuda",
    "screen_gemm_guard",
    "tile_gemm",
]
