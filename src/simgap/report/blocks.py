"""The report's document model (tables, figures, paragraphs, notes in sections) and the number
formats every section shares. Sections are built once and rendered to HTML and Markdown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    # Indices of the numeric (right-aligned) columns; None: every column but the first.
    numeric: tuple[int, ...] | None = None

    def is_numeric(self, column: int) -> bool:
        return column > 0 if self.numeric is None else column in self.numeric


@dataclass(frozen=True)
class FigureBlock:
    filename: str
    png: bytes
    alt: str
    caption: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Note:
    """A stage that was not run (or a caveat): shown highlighted."""

    text: str


@dataclass(frozen=True)
class Pre:
    title: str
    text: str
    language: str = "json"  # the Markdown fence's info string


Block = Table | FigureBlock | Paragraph | Note | Pre


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# ----------------------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def pp(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"


def sim(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.3f}"


def diff(a: Sequence[float | None], b: Sequence[float | None]) -> list[float | None]:
    return [None if x is None or y is None else x - y for x, y in zip(a, b, strict=True)]


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pct_ci(iv: Mapping | None, signed: bool = False) -> str:
    """A mean with its 95% interval, in %: "45.2 [43.1, 47.3]"; signed for differences (pp),
    where a resolved interval (excluding 0) is marked with *."""
    if not iv:
        return "—"
    fmt = pp if signed else pct
    mark = "*" if signed and iv.get("resolved") else ""
    return f"{fmt(iv['mean'])} [{fmt(iv['lo'])}, {fmt(iv['hi'])}]{mark}"
