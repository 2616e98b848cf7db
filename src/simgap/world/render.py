"""Render any image of the built-in world: a class in a domain (`render_image`), a class-less
pool image (`render_distractor`) or a near-duplicate of a test image (`near_duplicate`).

The shapes live in `shapes`, the shared drawing helpers and scenes in `scene`, the six domain
renderers in `domains`; every renderer draws all its randomness from the generator it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from simgap.world.domains import (
    render_hard,
    render_photo,
    render_photo_v2,
    render_pose,
    render_rendition,
    render_sketch,
)
from simgap.world.scene import (
    SUPERSAMPLE,
    clutter,
    finish,
    flat_xy,
    jitter,
    photo_scene,
    rgb_tuple,
    smooth_noise,
    to_image,
    unusual_background,
)
from simgap.world.shapes import MAX_CLASSES

# --------------------------------------------------------------------------------------------
# Class-less pool images and near-duplicates


def render_distractor(rng: np.random.Generator, size: int) -> Image.Image:
    """A pool image with no class: a scene with clutter, a colour texture, a pattern or doodles."""
    kind = int(rng.integers(4))
    if kind == 0:
        img = clutter(rng, to_image(photo_scene(rng, size)), int(rng.integers(3, 8)), 0.08, 0.22)
    elif kind == 1:
        img = to_image(128.0 + 70.0 * smooth_noise(rng, size, int(rng.integers(4, 16))))
    elif kind == 2:
        img = to_image(unusual_background(rng, size))
    else:
        hires = size * SUPERSAMPLE
        img = Image.new("RGB", (hires, hires), rgb_tuple(jitter(rng, (244, 241, 230), 8)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            walk = np.cumsum(rng.normal(0, hires * 0.05, (12, 2)), axis=0)
            walk = walk + rng.uniform(0, hires, 2)
            width = max(1, round(hires * rng.uniform(0.012, 0.03)))
            draw.line(flat_xy(walk), fill=(40, 40, 45), width=width, joint="curve")
        img = img.reduce(SUPERSAMPLE)
    return finish(img, rng, noise=rng.uniform(2, 6))


def near_duplicate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A mild copy of a test image as a web crawl would hold it: small crop or shift, resized back,
    slightly brighter or darker. (The caller re-encodes it at another JPEG quality.)"""
    w, h = image.size
    frac = rng.uniform(0.95, 0.99)
    cw, ch = round(w * frac), round(h * frac)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = image.convert("RGB").crop((x0, y0, x0 + cw, y0 + ch))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, np.float32) * rng.uniform(0.92, 1.08)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


Renderer = Callable[[int, np.random.Generator, int], Image.Image]

RENDERERS: dict[str, Renderer] = {
    "photo": render_photo,
    "photo-v2": render_photo_v2,
    "sketch": render_sketch,
    "rendition": render_rendition,
    "hard": render_hard,
    "pose": render_pose,
}

DOMAINS: tuple[str, ...] = tuple(RENDERERS)


def render_image(domain: str, label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """Render class `label` in `domain` at `size`x`size`, drawing all randomness from `rng`."""
    if domain not in RENDERERS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"label {label} outside 0..{MAX_CLASSES - 1}")
    return RENDERERS[domain](label, rng, size)
