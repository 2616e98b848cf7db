"""Drawing helpers and photo-like scenes shared by the world's renderers.

Everything here is a pure function of its arguments: all randomness comes from the
``np.random.Generator`` the caller passes, so the writer can make every file reproducible.
Colour fields (backgrounds, shading, noise) are computed at the output size; edges (shape masks,
pencil strokes, clutter) are drawn ``SUPERSAMPLE`` times larger and box-reduced, which
anti-aliases PIL's polygons at a quarter of the cost of supersampling everything.
"""

from __future__ import annotations

import colorsys
import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from simgap.world.shapes import Shape

SUPERSAMPLE = 2


# --------------------------------------------------------------------------------------------
# Geometry and drawing helpers


def place_shape(
    shape: Shape,
    centre: tuple[float, float],
    radius: float,
    angle: float,
    squash: float = 1.0,
    shear: float = 0.0,
) -> Shape:
    """Map unit-coordinate parts to canvas pixels: shear/squash (a cheap stand-in for a
    perspective view), then rotation, then scale and translation."""
    c, s = math.cos(angle), math.sin(angle)
    m = np.array([[c, -s], [s, c]]) @ np.array([[squash, shear], [0.0, 1.0]]) * radius
    off = np.asarray(centre)
    return [(p @ m.T + off, solid) for p, solid in shape]


def flat_xy(points: np.ndarray, factor: float = 1.0) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] list, the cheapest form ImageDraw accepts."""
    return (points * factor).ravel().tolist()


def hires_mask(parts: Shape, size: int) -> Image.Image:
    """Binary mask of `parts` (given in output pixels) drawn at SUPERSAMPLE x size."""
    mask = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for points, solid in parts:
        draw.polygon(flat_xy(points, SUPERSAMPLE), fill=255 if solid else 0)
    return mask


def coverage_mask(parts: Shape, size: int) -> Image.Image:
    """Anti-aliased coverage mask of `parts` at the output size."""
    return hires_mask(parts, size).reduce(SUPERSAMPLE)


def _to_float(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask, dtype=np.float32) * np.float32(1 / 255)


def to_image(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def rgb_tuple(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(v))) for v in np.clip(colour, 0, 255))
    return r, g, b


@functools.lru_cache(maxsize=8)
def pixel_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(side, dtype=np.float32) + np.float32(0.5)  # pixel centres
    x, y = np.meshgrid(ax, ax)
    x.flags.writeable = y.flags.writeable = False  # cached: shared between calls
    return x, y


def smooth_noise(rng: np.random.Generator, side: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise (about unit std), bicubic-upsampled from a coarse random grid."""
    # Upsampling one uint8 image (1/32 steps) is much cheaper than one float image per channel.
    small = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    small = np.clip(128.0 + 32.0 * small, 0, 255).astype(np.uint8)
    layer = Image.fromarray(small[..., 0] if channels == 1 else small)
    out = np.asarray(layer.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    out = (out - np.float32(128)) * np.float32(1 / 32)
    return out[..., None] if channels == 1 else out


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * np.float32(255)


def jitter(rng: np.random.Generator, colour: tuple[float, ...], amount: float) -> np.ndarray:
    c = np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)
    return np.clip(c, 0, 255)


def finish(
    img: Image.Image, rng: np.random.Generator, noise: float = 0.0, blur: float = 0.0
) -> Image.Image:
    """Optional lens blur, then sensor noise."""
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if noise > 0:
        grain = rng.standard_normal((img.height, img.width, 3), dtype=np.float32)
        img = to_image(np.asarray(img, dtype=np.float32) + np.float32(noise) * grain)
    return img


def upsample(img: Image.Image) -> Image.Image:
    side = img.width * SUPERSAMPLE
    return img.resize((side, side), Image.Resampling.BILINEAR)


def blob(rng: np.random.Generator, n_min: int = 5, n_max: int = 9) -> np.ndarray:
    """An irregular polygon (a rock, a bag, a stain): clutter that is not any class."""
    n = int(rng.integers(n_min, n_max + 1))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = rng.uniform(0.5, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def blob_parts(
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    n_min: int = 5,
    n_max: int = 9,
) -> Shape:
    return [(blob(rng, n_min, n_max) * radius + np.asarray(centre), True)]


# --------------------------------------------------------------------------------------------
# Photo-like scenes

# (top, bottom) colours of everyday scenes: sky over grass, wall over floor, sky over sand, ...
_SCENES = (
    ((135, 180, 225), (85, 140, 65)),
    ((205, 195, 175), (125, 90, 60)),
    ((170, 200, 230), (215, 195, 150)),
    ((95, 125, 85), (65, 90, 50)),
    ((185, 185, 190), (110, 110, 118)),
    ((225, 215, 195), (160, 135, 105)),
    ((150, 170, 190), (90, 95, 100)),
)

# Natural object colours: red, orange, yellow, green, blue, brown, purple, white, grey, black, pink.
_NATURAL = (
    (200, 40, 35),
    (230, 130, 30),
    (235, 205, 55),
    (55, 150, 60),
    (40, 90, 185),
    (125, 75, 40),
    (120, 60, 150),
    (238, 236, 230),
    (125, 125, 130),
    (40, 38, 40),
    (230, 130, 165),
)


def natural_colour(rng: np.random.Generator, amount: float = 15) -> np.ndarray:
    return jitter(rng, _NATURAL[int(rng.integers(len(_NATURAL)))], amount)


def photo_scene(rng: np.random.Generator, side: int) -> np.ndarray:
    top, bottom = _SCENES[int(rng.integers(len(_SCENES)))]
    top, bottom = jitter(rng, top, 20), jitter(rng, bottom, 20)
    _, y = pixel_grid(side)
    horizon = rng.uniform(0.3, 0.7) * side
    softness = side * rng.uniform(0.02, 0.12)
    t = 1.0 / (1.0 + np.exp(-(y[:, :1] - np.float32(horizon)) / np.float32(softness)))
    column = top + (bottom - top) * t  # (side, 3): the gradient is vertical
    # Mostly brightness variation (light, foliage, stains); only a little hue variation.
    cells = int(rng.integers(3, 7))
    light = 16.0 * smooth_noise(rng, side, cells, 1) + 6.0 * smooth_noise(rng, side, side // 4, 1)
    return column[:, None, :] + light + 6.0 * smooth_noise(rng, side, cells)


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A natural colour that stands out from the background, so the class stays visible."""
    mean = background[::4, ::4].reshape(-1, 3).mean(axis=0)
    colour = natural_colour(rng)
    for _ in range(6):
        if np.abs(colour - mean).sum() > 150:
            break
        colour = natural_colour(rng)
    return colour


def _shaded_object(
    rng: np.random.Generator,
    side: int,
    colour: np.ndarray,
    centre: tuple[float, float],
    radius: float,
) -> np.ndarray:
    """Object surface: one light direction plus a little low-frequency texture."""
    x, y = pixel_grid(side)
    phi = rng.uniform(0, 2 * math.pi)
    k = 0.22 / max(radius, 1.0)
    ax, ay = np.float32(k * math.cos(phi)), np.float32(k * math.sin(phi))
    d = (x - np.float32(centre[0])) * ax + (y - np.float32(centre[1])) * ay
    shade = np.clip(1.0 + d, 0.6, 1.35)[..., None]
    return colour * shade + 10.0 * smooth_noise(rng, side, 6)


def photo_object(
    rng: np.random.Generator,
    bg: np.ndarray,
    parts: Shape,
    centre: tuple[float, float],
    radius: float,
) -> Image.Image:
    """Composite a shaded, shadow-casting object onto a photo-like background (float array)."""
    side = bg.shape[0]
    dx, dy = rng.uniform(0.02, 0.07, 2) * side
    shadow_parts = [(p + (dx, dy), solid) for p, solid in parts]
    shadow = _to_float(
        coverage_mask(shadow_parts, side).filter(ImageFilter.GaussianBlur(side / 80))
    )
    bg = bg * (1.0 - 0.45 * shadow)[..., None]
    colour = _object_colour(rng, bg)
    surface = _shaded_object(rng, side, colour, centre, radius)
    return Image.composite(to_image(surface), to_image(bg), coverage_mask(parts, side))


# --------------------------------------------------------------------------------------------
# Clutter and home-like backgrounds (the hard and pose domains, class-less images)


def clutter(
    rng: np.random.Generator, img: Image.Image, n: int, lo: float, hi: float
) -> Image.Image:
    """Draw `n` irregular blobs (radius lo..hi of the side) at SUPERSAMPLE x and reduce."""
    big = upsample(img)
    side = big.width
    draw = ImageDraw.Draw(big)
    for _ in range(n):
        points = blob(rng) * (rng.uniform(lo, hi) * side) + rng.uniform(0, side, 2)
        colour = natural_colour(rng, 30) * rng.uniform(0.7, 1.1)
        draw.polygon(flat_xy(points), fill=rgb_tuple(colour))
    return big.reduce(SUPERSAMPLE)


def unusual_background(rng: np.random.Generator, side: int) -> np.ndarray:
    x, y = pixel_grid(side)
    a = hsv(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.5, 0.95))
    b = hsv(rng.uniform(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9))
    kind = int(rng.integers(3))
    angle = rng.uniform(0, math.pi)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u, v = x * c + y * s, y * c - x * s
    cell = np.float32(rng.uniform(0.1, 0.2) * side)
    if kind == 0:  # tiled floor (rotated checkerboard)
        sel = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        bg = np.where(sel[..., None], a, b)
    elif kind == 1:  # bed sheet / cloth with folds
        folds = np.sin(u / cell * 2.0 + 2.0 * np.sin(v / (cell * 3.0)))
        bg = a * (0.8 + 0.2 * folds)[..., None]
    else:  # striped fabric or wood planks
        sel = np.mod(u, cell) < cell * np.float32(rng.uniform(0.3, 0.7))
        bg = np.where(sel[..., None], a, a * 0.6 + b * 0.4)
    return bg + 8.0 * smooth_noise(rng, side, 5)
