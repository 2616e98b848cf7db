"""Pixel-level verification of near-duplicate candidates.

A near-duplicate as a web crawl holds it is the same picture, slightly cropped or shifted and
resized back, a little brighter or darker, re-encoded as JPEG. Embedding similarity (of any model)
also ranks other images of the same class high, so it can propose candidates but not decide. Here
a candidate is decided on pixels: every crop of the test image down to ``1 - MAX_CROP`` of its
side, at every whole-pixel offset, is resized back and compared with the base image; the score is
the best normalised cross-correlation (mean-centred, so a brightness gain cancels) after a light
blur that removes most JPEG block noise. Modelling the crop forward (crop the test, resize up)
rather than backward keeps thin strokes aligned to a fraction of a pixel. A cheaper backward
screen at half resolution drops the many candidates that are nowhere near. Candidates come from a
cheap thumbnail descriptor (and the embedding top-k, see :mod:`simgap.audit.contamination`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

# Verification defaults, measured on two worlds (seeds 0 and 1; see the README's audit section).
SIDE = 64  # working resolution: images are resized so their longer side is this
MAX_CROP = 0.06  # the base image may show as little as 94% of the test image's side
PIXEL_THRESHOLD = 0.975  # minimum best-alignment correlation of a near-duplicate
COARSE_THRESHOLD = 0.9  # half-resolution screen before the full comparison (copies score > 0.95)
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
        raise ValueError(f"{len(missing)} samples not found again, e.g. {missing[0]!r} in {src}")
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


@lru_cache(maxsize=256)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear resampling along one axis: a triangle (bilinear) filter, widened by
    the shrink factor so a downscale averages instead of aliasing; rows sum to 1."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    x = np.arange(n_in) + 0.5
    w = np.clip(1 - np.abs(x[None, :] - centres[:, None]) / support, 0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=256)
def blur_matrix(n: int) -> np.ndarray:
    """(n, n) [1, 2, 1] / 4 blur along one axis, edges replicated."""
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        for j, wt in ((i - 1, 0.25), (i, 0.5), (i + 1, 0.25)):
            m[i, min(max(j, 0), n - 1)] += wt
    return m


def resample(x: np.ndarray, h: int, w: int, blurred: bool = False) -> np.ndarray:
    """(H, W, C) float image resampled to (h, w), optionally blurred afterwards."""
    ry, rx = resample_matrix(x.shape[0], h), resample_matrix(x.shape[1], w)
    if blurred:
        ry, rx = blur_matrix(h) @ ry, blur_matrix(w) @ rx
    rows = np.tensordot(ry, np.asarray(x, np.float32), axes=(1, 0))  # (h, W, C)
    return np.ascontiguousarray(np.tensordot(rows, rx, axes=(1, 1)).transpose(0, 2, 1))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    return x / max(float(np.linalg.norm(x)), 1e-6)


def crop_sides(h: int, w: int, max_crop: float = MAX_CROP) -> list[tuple[int, int]]:
    """(height, width) of every crop of an (h, w) image down to ``1 - max_crop`` of its side."""
    longest = max(h, w)
    return [
        (max(1, round(h * c / longest)), max(1, round(w * c / longest)))
        for c in range(longest - int(np.ceil(longest * max_crop)), longest + 1)
    ]


def windows(blurred: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Every (ch, cw) window of a blurred test image as a row, mean-centred and unit-norm."""
    win = sliding_window_view(blurred, (ch, cw, blurred.shape[2]))[:, :, 0]
    win = win.reshape(-1, ch * cw * blurred.shape[2])
    win = win - win.mean(1, keepdims=True)
    return win / np.maximum(np.linalg.norm(win, axis=1, keepdims=True), 1e-6)


def templates(base: np.ndarray, h: int, w: int, max_crop: float = MAX_CROP) -> list[np.ndarray]:
    """``base`` resized to (h, w), then shrunk to each crop side, blurred, mean-centred, unit."""
    if base.shape[:2] != (h, w):
        base = resample(base, h, w)
    return [
        _unit(resample(base, ch, cw, blurred=True)).ravel() for ch, cw in crop_sides(h, w, max_crop)
    ]


def crops(test: np.ndarray, max_crop: float = MAX_CROP) -> np.ndarray:
    """Every crop of ``test`` (each side in ``crop_sides``, each whole-pixel offset) resized back
    to the test image's shape, blurred, mean-centred and unit-norm, as rows: the copies a crop
    and resize could have made of it."""
    h, w = test.shape[:2]
    out = []
    for ch, cw in crop_sides(h, w, max_crop):
        for y in range(h - ch + 1):
            for x in range(w - cw + 1):
                out.append(
                    _unit(resample(test[y : y + ch, x : x + cw], h, w, blurred=True)).ravel()
                )
    return np.stack(out)


def target(base: np.ndarray, h: int, w: int) -> np.ndarray:
    """``base`` resized to (h, w), blurred, mean-centred and unit-norm, as one row."""
    return _unit(resample(base, h, w, blurred=True)).ravel()


def match_score(test: np.ndarray, base: np.ndarray, max_crop: float = MAX_CROP) -> float:
    """Best normalised cross-correlation between ``base`` (resized to the test image's shape) and
    a crop of ``test`` resized back (every crop side within ``max_crop``, every offset), both
    blurred. Both are float (H, W, C) arrays; 1.0 means identical up to a brightness gain and
    offset."""
    h, w = test.shape[:2]
    return float((crops(test, max_crop) @ target(base, h, w)).max())


def screen_score(test: np.ndarray, base: np.ndarray, max_crop: float = MAX_CROP) -> float:
    """A cheaper score for screening: ``base`` shrunk to each crop side and slid over ``test``."""
    h, w = test.shape[:2]
    t = resample(test, h, w, blurred=True)
    tmpls = templates(base, h, w, max_crop)
    sides = crop_sides(h, w, max_crop)
    return max(
        float((windows(t, ch, cw) @ m).max()) for (ch, cw), m in zip(sides, tmpls, strict=True)
    )


class Verifier:
    """Scores base images against many test images. A screen at half resolution (``screen_score``)
    drops pairs far below any copy; survivors get ``match_score``. Each test image's windows and
    crops are computed once and cached, so a base image costs a few resizes and one matrix
    product per test point."""

    def __init__(
        self,
        tests: list[np.ndarray],
        max_crop: float = MAX_CROP,
        coarse: float = COARSE_THRESHOLD,
    ):
        self.tests, self.max_crop, self.coarse = tests, max_crop, coarse
        self._win: dict[int, list[np.ndarray]] = {}
        self._crops: dict[int, np.ndarray] = {}

    def _screen(self, base: np.ndarray, ids: list[int]) -> np.ndarray:
        out = np.full(len(ids), -1.0)
        tmpls: dict[tuple[int, int], list[np.ndarray]] = {}
        for j, t in enumerate(ids):
            h, w = (n // 2 for n in self.tests[t].shape[:2])
            if t not in self._win:
                b = resample(self.tests[t], h, w, blurred=True)
                sides = crop_sides(h, w, self.max_crop)
                self._win[t] = [windows(b, ch, cw) for ch, cw in sides]
            if (h, w) not in tmpls:
                tmpls[h, w] = templates(base, h, w, self.max_crop)
            out[j] = max(
                float((a @ m).max()) for a, m in zip(self._win[t], tmpls[h, w], strict=True)
            )
        return out

    def _match(self, base: np.ndarray, t: int) -> float:
        if t not in self._crops:
            self._crops[t] = crops(self.tests[t], self.max_crop)
        h, w = self.tests[t].shape[:2]
        return float((self._crops[t] @ target(base, h, w)).max())

    def scores(self, base: np.ndarray, ids: list[int]) -> np.ndarray:
        """``match_score`` of each test point in ``ids`` against ``base``; a pair whose
        half-resolution screen is below ``coarse`` keeps its screen score instead."""
        if not ids:
            return np.zeros(0)
        if min(min(self.tests[t].shape[:2]) for t in ids) < 16:  # too small to halve
            return np.array([self._match(base, t) for t in ids])
        out = self._screen(base, ids)
        for j, t in enumerate(ids):
            if out[j] >= self.coarse:
                out[j] = self._match(base, t)
        return out


def verify_score(test: np.ndarray, base: np.ndarray, coarse: float = COARSE_THRESHOLD) -> float:
    """One pair's ``Verifier`` score (screened at half resolution, then full)."""
    return float(Verifier([test], coarse=coarse).scores(base, [0])[0])
