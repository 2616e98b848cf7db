"""Pixel-level verification of near-duplicate candidates.

A near-duplicate as a web crawl holds it is the same picture, slightly cropped or shifted and
resized back, a little brighter or darker, re-encoded as JPEG. Embedding similarity (of any model)
also ranks other images of the same class high, so it can propose candidates but not decide. Here
a candidate is decided on pixels: the base image is shrunk to each crop side in a small range and
slid over every position of the test image; the score is the best normalised cross-correlation
(mean-centred, so a brightness gain cancels) of the two images after a light blur that removes
most JPEG block noise. Candidates come from a cheap thumbnail descriptor (and the embedding top-k).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

# Verification defaults, measured on two worlds (seeds 0 and 1; see the README's audit section).
SIDE = 64  # working resolution: images are resized so their longer side is this
MAX_CROP = 0.06  # the base image may show as little as 94% of the test image's side
PIXEL_THRESHOLD = 0.975  # minimum best-alignment correlation of a near-duplicate
THUMB_SIDE = 8  # thumbnail descriptor for candidates: 8x8 gray, mean-centred, unit norm
THUMB_TOPK = 10  # candidates per test point from the thumbnail descriptor
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode(members: Mapping[str, bytes], key: str) -> Image.Image:
    """The image member of one sample, decoded as RGB."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return Image.open(io.BytesIO(members[ext])).convert("RGB")
    raise ValueError(f"sample {key!r} has no image member (has {sorted(members)})")


def load_images(
    keys: list[str], sources: list[str], fetch: Callable[[str, set[str]], dict] | None = None
) -> list[np.ndarray]:
    """Working-resolution float32 RGB images of ``keys``, found again via their ``sources``."""
    if fetch is None:
        from simgap.data.sources import fetch_samples as fetch
    by_source: dict[str, set[str]] = {}
    for k, s in zip(keys, sources, strict=True):
        by_source.setdefault(s, set()).add(k)
    found: dict[str, np.ndarray] = {}
    for s, want in by_source.items():
        for k, members in fetch(s, want).items():
            found[k] = to_working(decode(members, k))
    missing = [k for k in keys if k not in found]
    if missing:
        src = sources[keys.index(missing[0])]
        raise FileNotFoundError(f"{len(missing)} samples not found again, e.g. {missing[0]!r} in {src}")
    return [found[k] for k in keys]


def to_working(img: Image.Image, side: int = SIDE) -> np.ndarray:
    """``img`` resized (area average) so its longer side is ``side``, as float32 (H, W, 3)."""
    w, h = img.size
    s = side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BOX)
    return np.asarray(img, np.float32)


def thumbnails(images: Iterable[np.ndarray], side: int = THUMB_SIDE) -> np.ndarray:
    """(N, side*side) gray thumbnails, mean-centred and unit-norm (a brightness gain cancels)."""
    out = []
    for im in images:
        g = Image.fromarray(im.mean(-1).astype(np.float32), mode="F")
        t = np.asarray(g.resize((side, side), Image.Resampling.BOX), np.float32).ravel()
        t = t - t.mean()
        out.append(t / max(float(np.linalg.norm(t)), 1e-6))
    return np.stack(out) if out else np.zeros((0, side * side), np.float32)


def blur(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over the two spatial axes, edges replicated."""
    for axis in (0, 1):
        p = np.concatenate([x.take([0], axis), x, x.take([-1], axis)], axis)
        n = x.shape[axis]
        x = (p.take(range(n), axis) + 2 * p.take(range(1, n + 1), axis)) / 4 + p.take(
            range(2, n + 2), axis
        ) / 4
    return x.astype(np.float32)


def _resize(x: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize of a float RGB array, per channel in float (no 8-bit rounding)."""
    if x.shape[:2] == (h, w):
        return x
    chans = [
        np.asarray(
            Image.fromarray(x[..., c], mode="F").resize((w, h), Image.Resampling.BILINEAR),
            np.float32,
        )
        for c in range(x.shape[2])
    ]
    return np.stack(chans, -1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    return x / max(float(np.linalg.norm(x)), 1e-6)


def match_score(test: np.ndarray, base: np.ndarray, max_crop: float = MAX_CROP) -> float:
    """Best normalised cross-correlation of ``base`` (resized to the test image's shape) shrunk to
    each crop side within ``max_crop`` and placed at every offset inside ``test``.

    Both are float (H, W, 3) arrays; 1.0 means identical up to a brightness gain and offset."""
    h, w = test.shape[:2]
    base = _resize(base, w, h)
    t = blur(test)
    best = -1.0
    longest = max(h, w)
    for c in range(longest - int(np.floor(longest * max_crop)), longest + 1):
        cw, ch = max(1, round(w * c / longest)), max(1, round(h * c / longest))
        tmpl = _unit(blur(_resize(base, cw, ch)))
        # Every (ch, cw) window of the test image, each mean-centred and normalised.
        win = sliding_window_view(t, (ch, cw, t.shape[2]))[:, :, 0].reshape(-1, ch * cw * t.shape[2])
        win = win - win.mean(1, keepdims=True)
        norms = np.maximum(np.linalg.norm(win, axis=1), 1e-6)
        best = max(best, float(((win @ tmpl.ravel()) / norms).max()))
    return best
