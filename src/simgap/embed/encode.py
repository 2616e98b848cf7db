"""The similarity model's forward: its numerics (autocast, fixed threads, padded batches) and
the image and caption encoders."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch

from simgap.models import LoadedModel, ModelSpec, ieee_fp32, load_model

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=2)
def cached_model(spec: ModelSpec, device: str) -> LoadedModel:
    # One load per worker process, reused across that process's shards.
    return load_model(spec, device=device)


@functools.lru_cache(maxsize=2)
def model_dim(spec: ModelSpec, device: str) -> int:
    from PIL import Image

    loaded = cached_model(spec, device)
    with torch.inference_mode():
        x = loaded.preprocess(Image.new("RGB", (8, 8))).unsqueeze(0).to(device)
        return int(loaded.model.encode_image(x).shape[-1])


def autocast_dtype(device: str, precision: str) -> torch.dtype | None:
    """The autocast dtype for a device and precision choice; None runs in float32.

    ``auto`` is bf16 on GPUs that support it natively (Ampere and later), else fp16 on GPU,
    float32 on CPU. fp16 on CPU is refused: CPU fp16 matmul is two orders of magnitude slower
    than float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {PRECISIONS}")
    on_gpu = str(device).startswith("cuda")
    if precision == "auto":
        if not on_gpu:
            return None
        # Emulated bf16 (a V100 "supports" it in software) is far slower than fp16.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if precision == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a GPU (device cuda); on CPU use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Intra-op threads of every embed forward. CPU conv/GEMM kernels (oneDNN, the im2col GEMM) pick
# their algorithm from the input shape *and* the thread count, and algorithms differ in the last
# float bits: a fixed count (and fixed shapes, see ``padded``) makes the stored bytes the same in
# any process (CLI, pool worker, Ray task), whatever ``torch.set_num_threads`` it runs with.
FORWARD_THREADS = 1


@contextlib.contextmanager
def forward_threads(n: int = FORWARD_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows``: a shard's last, partial batch then runs the
    same kernels as its full batches (each image's result does not depend on the other rows,
    only on the batch shape)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


def _autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def forward_context(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """What every embed forward runs under: ``FORWARD_THREADS``, inference mode, float32 GPU
    kernels in IEEE float32 (no TF32) and autocast to ``dtype`` (None: none)."""
    with forward_threads(), torch.inference_mode(), ieee_fp32(), _autocast(device, dtype):
        yield


def encode_batch(
    loaded: LoadedModel,
    pixels: torch.Tensor,
    device: str,
    precision: str = "auto",
    rows: int = 0,
) -> np.ndarray:
    """One batch of preprocessed images → float32 image features (not yet normalised).

    The forward runs on ``rows`` rows (the batch zero-padded; 0: as given) with
    ``FORWARD_THREADS`` threads, so an image's bytes do not depend on its batch or process.
    """
    dtype = autocast_dtype(device, precision)
    x = padded(pixels, rows).to(device, non_blocking=True)
    with forward_context(device, dtype):
        return loaded.model.encode_image(x)[: len(pixels)].float().cpu().numpy()


def encode_texts(
    loaded: LoadedModel, texts: list[str], device: str, batch_size: int, precision: str = "auto"
) -> np.ndarray:
    """Captions → float32 text features; a missing caption is embedded as the empty string.

    Batches are padded to ``batch_size`` and run with ``FORWARD_THREADS``, as images are."""
    dtype = autocast_dtype(device, precision)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(texts[start : start + batch_size])
        x = padded(tokens, batch_size).to(device)
        with forward_context(device, dtype):
            out.append(loaded.model.encode_text(x)[: len(tokens)].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
