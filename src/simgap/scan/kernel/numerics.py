"""Rounding models and error bounds of the float screens (fp32, bf16) against float32(x.t)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

U32 = 2.0**-24  # unit roundoff of float32
UBF16 = 2.0**-8  # unit roundoff of bfloat16
# Tensor-core accumulation (bf16, TF32) aligns the k products of a block FMA to the largest
# exponent and truncates: modelled as fp32 accumulation with 4x the unit roundoff (Fasi, Higham,
# Mikaitis, Pranesh, PeerJ CS 7:e330, 2021).
UTC = 2.0**-22
SLACK = 2.0**-18  # absolute slack for float32 rounding in the bounds computed on screen values

SCREEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
PRECISIONS = ("auto", *SCREEN_DTYPES)


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
