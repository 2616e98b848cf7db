"""The classes of the built-in world: one plane shape each, in unit coordinates."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# A shape is a list of parts; each part is a closed polygon in unit coordinates (x right, y down)
# that is either solid or a hole cut out of the parts drawn before it.
Part = tuple[np.ndarray, bool]
Shape = list[Part]


# --------------------------------------------------------------------------------------------
# Class shapes


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, n: int = 40, a0: float = 0.0
) -> np.ndarray:
    t = a0 + np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _circle(cx: float, cy: float, r: float, n: int = 40) -> np.ndarray:
    return _ellipse(cx, cy, r, r, n)


def _regular(n: int, r: float, phase: float = -math.pi / 2) -> np.ndarray:
    return _ellipse(0.0, 0.0, r, r, n, phase)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _poly(*xy: tuple[float, float]) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 30) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _crescent(n: int = 120) -> np.ndarray:
    """The unit disc minus a shifted disc, as one polygon: a hole part would draw the whole
    shifted circle in a sketch."""
    bite, bite_r = np.array([0.45, -0.2]), 0.85
    outer, inner = _circle(0, 0, 1, n), _circle(*bite, bite_r, n)
    keep_outer = np.linalg.norm(outer - bite, axis=1) > bite_r
    keep_inner = np.linalg.norm(inner, axis=1) < 1.0
    # Roll each circle so its kept arc is contiguous, then walk outer arc forward, inner back.
    outer = np.roll(outer, -int(np.argmax(keep_outer & ~np.roll(keep_outer, 1))), axis=0)
    inner = np.roll(inner, -int(np.argmax(keep_inner & ~np.roll(keep_inner, 1))), axis=0)
    keep_outer = np.linalg.norm(outer - bite, axis=1) > bite_r
    keep_inner = np.linalg.norm(inner, axis=1) < 1.0
    return np.concatenate([outer[keep_outer], inner[keep_inner][::-1]])


def _semicircle(r: float, n: int = 24) -> np.ndarray:
    t = np.linspace(math.pi, 2 * math.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _solid(points: np.ndarray) -> Part:
    return points, True


def _hole(points: np.ndarray) -> Part:
    return points, False


def _flower() -> Shape:
    angles = np.linspace(-math.pi / 2, 1.5 * math.pi, 5, endpoint=False)
    petals = [_solid(_circle(0.55 * math.cos(a), 0.55 * math.sin(a), 0.38, 24)) for a in angles]
    return [*petals, _hole(_circle(0, 0, 0.25, 24))]


# Class name (a plain word used in captions) -> its shape. The first ten are the default world
# and are the most distinct from each other at 64 px.
# fmt: off
_SHAPE_BUILDERS: tuple[tuple[str, Callable[[], Shape]], ...] = (
    ("circle", lambda: [_solid(_circle(0, 0, 1))]),
    ("square", lambda: [_solid(_poly((-1, -1), (1, -1), (1, 1), (-1, 1)))]),
    ("triangle", lambda: [_solid(_poly((0, -1), (1, 0.75), (-1, 0.75)))]),
    ("star", lambda: [_solid(_star(5, 1.0, 0.42))]),
    ("cross", lambda: [_solid(_poly(
        (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
        (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)))]),
    ("ring", lambda: [_solid(_circle(0, 0, 1)), _hole(_circle(0, 0, 0.58))]),
    ("crescent", lambda: [_solid(_crescent())]),
    ("heart", lambda: [_solid(_heart())]),
    ("arrow", lambda: [_solid(_poly(
        (-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22),
        (-1, 0.22)))]),
    ("house", lambda: [
        _solid(_poly((-0.7, 1), (-0.7, 0), (-0.95, 0), (0, -0.9), (0.95, 0), (0.7, 0), (0.7, 1))),
        _hole(_poly((-0.15, 1), (-0.15, 0.45), (0.15, 0.45), (0.15, 1)))]),
    ("diamond", lambda: [_solid(_poly((0, -1), (0.62, 0), (0, 1), (-0.62, 0)))]),
    ("hexagon", lambda: [_solid(_regular(6, 1.0, 0.0))]),
    ("tree", lambda: [
        _solid(_poly((0, -1), (0.75, 0.35), (-0.75, 0.35))),
        _solid(_poly((-0.16, 0.3), (0.16, 0.3), (0.16, 1), (-0.16, 1)))]),
    ("flower", _flower),
    ("bolt", lambda: [_solid(_poly(
        (0.15, -1), (-0.55, 0.1), (-0.05, 0.1), (-0.3, 1), (0.55, -0.2), (0.05, -0.2),
        (0.4, -1)))]),
    ("fish", lambda: [
        _solid(_ellipse(-0.2, 0, 0.75, 0.45)),
        _solid(_poly((0.4, 0), (1, -0.5), (1, 0.5))),
        _hole(_circle(-0.6, -0.1, 0.09, 12))]),
    ("drop", lambda: [_solid(np.concatenate(
        [_poly((0, -1)), _arc(0, 0.35, 0.62, -0.4, math.pi + 0.4)]))]),
    ("cloud", lambda: [
        _solid(_circle(-0.5, 0.15, 0.42)),
        _solid(_circle(0.05, -0.15, 0.55)),
        _solid(_circle(0.55, 0.15, 0.4)),
        _solid(_poly((-0.5, 0.15), (0.55, 0.15), (0.55, 0.55), (-0.5, 0.57)))]),
    ("mushroom", lambda: [
        _solid(np.concatenate([_semicircle(1.0), _poly((1, 0.05), (-1, 0.05))])),
        _solid(_poly((-0.28, 0), (0.28, 0), (0.35, 1), (-0.35, 1)))]),
    ("hourglass", lambda: [_solid(_poly(
        (-0.75, -1), (0.75, -1), (0.1, 0), (0.75, 1), (-0.75, 1), (-0.1, 0)))]),
)
# fmt: on


def _normalise(shape: Shape) -> Shape:
    """Centre the bounding box at 0 and fit it in [-1, 1] so every class has the same size."""
    allpts = np.concatenate([p for p, solid in shape if solid])
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    return [((p - centre) / half, solid) for p, solid in shape]


CLASSNAMES: tuple[str, ...] = tuple(name for name, _ in _SHAPE_BUILDERS)
SHAPES: tuple[Shape, ...] = tuple(_normalise(build()) for _, build in _SHAPE_BUILDERS)
MAX_CLASSES = len(CLASSNAMES)
