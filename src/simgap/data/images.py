"""Decoding web images: convert what can be converted, count what must be skipped."""

from __future__ import annotations

import io
import warnings
from collections import Counter

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit, made explicit here


def pick_image(members: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None


def decode_rgb(data: bytes | None, skipped: Counter[str]) -> Image.Image | None:
    """Decode to RGB; on failure count the reason in ``skipped`` and return None."""
    if not data:
        skipped["empty_image" if data is not None else "missing_image"] += 1
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                skipped["oversized_image"] += 1
                return None
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        skipped["oversized_image"] += 1
        return None
    except (OSError, ValueError, SyntaxError):
        skipped["corrupt_image"] += 1
        return None
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white rather than dropping alpha, which turns transparent pixels black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")
