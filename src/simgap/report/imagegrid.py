"""Galleries as one PNG: a grid of captioned thumbnails (the report's nearest-neighbour and
composition galleries). The PNG carries no metadata: the same cells give the same bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class Thumb:
    """One cell of a gallery: an RGB image (None where the sample could not be found again)."""

    image: np.ndarray | None
    title: str


def nn_gallery(rows: Sequence[Sequence[Thumb]], groups: Sequence[int] = ()) -> bytes:
    """A grid of images: a row per test image, its nearest neighbours to the right, each cell
    captioned with its lines of title; a missing image is a grey cell saying so. `groups`: the
    column indices before which a wider gap separates groups (test | reference | pool).

    Drawn with PIL rather than matplotlib: a grid of pictures needs no axes, and matplotlib's
    layout of dozens of subplots takes seconds per gallery."""
    ncols = max(len(r) for r in rows)
    lines = max(len(t.title.splitlines()) for r in rows for t in r)
    cell_w, cell_h = _CELL + 2 * _PAD, _CELL + _PAD + lines * _LINE + _PAD
    xs = [_PAD + c * cell_w + _GROUP_GAP * sum(g <= c for g in groups) for c in range(ncols)]
    canvas = Image.new("RGB", (xs[-1] + cell_w + _PAD, len(rows) * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for r, row in enumerate(rows):
        for x, thumb in zip(xs, row, strict=False):
            _draw_cell(canvas, draw, font, thumb, x + _PAD, _PAD + r * cell_h)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


_CELL, _PAD, _LINE, _GROUP_GAP = 112, 6, 14, 18


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, thumb: Thumb, x: int, y: int):
    box = (x, y, x + _CELL - 1, y + _CELL - 1)
    if thumb.image is None:
        draw.rectangle(box, fill="#dddddd")
        draw.multiline_text(
            (x + _CELL // 2, y + _CELL // 2),
            "image not\navailable",
            fill="#333333",
            font=font,
            anchor="mm",
            align="center",
        )
    else:
        image = Image.fromarray(np.asarray(thumb.image, dtype=np.uint8)).convert("RGB")
        scale = _CELL / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        canvas.paste(image, (x + (_CELL - size[0]) // 2, y + (_CELL - size[1]) // 2))
        draw.rectangle(box, outline="#cccccc")
    for i, line in enumerate(thumb.title.splitlines()):
        draw.text((x, y + _CELL + _PAD // 2 + i * _LINE), line, fill="#222222", font=font)
