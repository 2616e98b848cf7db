"""The screen GEMM: its backends, the checks that make the int8 one exact, and the choice of
screen per device (``resolve_precision``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from simgap.scan.kernel.numerics import PRECISIONS, SCREEN_DTYPES

if TYPE_CHECKING:
    from simgap.scan.kernel.config import KernelConfig
    from simgap.scan.kernel.tiles import Scratch, TestTile

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


def screen_tile(
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
