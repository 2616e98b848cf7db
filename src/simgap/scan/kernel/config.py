"""``KernelConfig``: the scan's tuning knobs, resolved per device."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from simgap.scan.kernel.screen import resolve_precision


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
