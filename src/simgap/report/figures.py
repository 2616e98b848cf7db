"""Report figures: plain data in, PNG bytes out.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so no
global figure state and no GUI backend), under matplotlib's default style plus the fixed settings
below, so a user's matplotlibrc cannot change the output. PNGs carry no "Software" or date
metadata: the same data gives the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

# Fixed colours for the two sets every gap is measured against; splits get the palette below,
# assigned once per report so a split has the same colour in every figure.
REFERENCE_COLOR = "#4d4d4d"
POOL_COLOR = "#1f77b4"
_SPLIT_PALETTE = (
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)
_DPI = 110
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


@dataclass(frozen=True)
class GapPanel:
    """One benchmark's subplot: NN similarities of its test points to each set, in draw order."""

    benchmark: str
    series: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class RemovedBar:
    label: str
    removed: int
    pool_size: int
    color: str


@dataclass(frozen=True)
class AccuracyBar:
    """One split's top-1 (fraction) per benchmark; None where it was not evaluated."""

    split: str
    values: Sequence[float | None]
    color: str
    hatched: bool


def split_colors(splits: Sequence[str]) -> dict[str, str]:
    """Give each split a palette colour by its position, so figures agree on colours."""
    return {name: _SPLIT_PALETTE[i % len(_SPLIT_PALETTE)] for i, name in enumerate(splits)}


def gap_histograms(panels: Sequence[GapPanel], colors: Mapping[str, str]) -> bytes:
    """One subplot per benchmark: histograms of NN similarity to each set, on shared bins.

    The reference set is drawn filled and every other set as an outline, so a pruned split whose
    gap matches the reference shows as an outline tracing the grey area.
    """
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with _style():
        fig = _figure(4.0 * ncols, 3.0 * nrows + 0.7)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        labels = list(dict.fromkeys(name for p in panels for name in p.series))
        styles = {name: _gap_style(name, i, colors) for i, name in enumerate(labels)}
        for ax, panel in zip(axes.flat, panels, strict=False):
            _draw_gap_panel(ax, panel, styles)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        handles = [_gap_handle(name, styles[name]) for name in labels]
        # Splits are often named after the benchmark they were pruned for: say which is which.
        names = [n if n in ("reference", "pool") else f"split {n}" for n in labels]
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(labels), 5))
        return _png(fig)


def removed_counts(bars: Sequence[RemovedBar]) -> bytes:
    """Horizontal bars: pool points each gap-matched split removed, annotated with % of pool."""
    with _style():
        fig = _figure(7.0, 0.9 + 0.45 * len(bars))
        ax = fig.subplots()
        y = np.arange(len(bars))
        ax.barh(y, [b.removed for b in bars], color=[b.color for b in bars], height=0.6)
        ax.set_yticks(y, [b.label for b in bars])
        ax.invert_yaxis()  # largest removal on top
        ax.set_xlabel("pool points removed")
        ax.grid(axis="y", visible=False)
        top = max([b.removed for b in bars] + [1])
        ax.set_xlim(0, top * 1.25)
        for yi, bar in zip(y, bars, strict=True):
            share = bar.removed / bar.pool_size if bar.pool_size else float("nan")
            ax.annotate(
                f"{bar.removed:,} ({100 * share:.1f}%)",
                (bar.removed, yi),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
            )
        return _png(fig)


def accuracy_bars(benchmarks: Sequence[str], bars: Sequence[AccuracyBar]) -> bytes:
    """Grouped bars of top-1 (%) per benchmark; controls hatched in their split's colour."""
    width = 0.8 / max(len(bars), 1)
    with _style():
        fig = _figure(min(11.0, max(6.0, 1.0 + 0.14 * len(bars) * len(benchmarks))), 3.8)
        ax = fig.subplots()
        x = np.arange(len(benchmarks))
        for i, bar in enumerate(bars):
            heights = [np.nan if v is None else 100 * v for v in bar.values]
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                heights,
                width=width,
                color=bar.color,
                alpha=0.55 if bar.hatched else 1.0,
                hatch="//" if bar.hatched else None,
                edgecolor="white" if not bar.hatched else bar.color,
                linewidth=0.5,
                label=bar.split,
            )
        ax.set_xticks(x, benchmarks)
        ax.set_ylabel("zero-shot top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="x", visible=False)
        fig.legend(loc="outside lower center", ncol=min(len(bars), 4))
        return _png(fig)


def _gap_style(name: str, index: int, colors: Mapping[str, str]) -> dict:
    """Reference filled grey, pool blue, splits outlined in their colour. A gap-matched split
    with the reference added equals the reference, and several splits can coincide, so splits
    also cycle through dash patterns to stay visible on top of each other."""
    if name == "reference":
        return {"color": REFERENCE_COLOR, "alpha": 0.35}
    if name == "pool":
        return {"histtype": "step", "color": POOL_COLOR, "linewidth": 1.6}
    dashes = ("-", "--", ":", "-.")
    return {
        "histtype": "step",
        "color": colors[name],
        "linewidth": 1.6,
        "linestyle": dashes[max(index - 2, 0) % len(dashes)],
    }


def _draw_gap_panel(ax, panel: GapPanel, styles: Mapping[str, dict]) -> None:
    finite = [v[np.isfinite(v)] for v in panel.series.values()]
    values = np.concatenate(finite) if finite else np.zeros(0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:  # a constant column still needs a bin range of non-zero width
        lo, hi = lo - 0.01, hi + 0.01
    bins = np.linspace(lo, hi, 41)
    n = max((v.size for v in finite), default=0)
    for name, data in zip(panel.series, finite, strict=True):
        ax.hist(data, bins=bins, label=name, **styles[name])
    ax.set_title(f"{panel.benchmark} (n={n:,})")
    ax.set_xlabel("NN similarity of test point to set")
    ax.set_ylabel("test points")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _gap_handle(name: str, style: Mapping) -> Patch:
    if style.get("histtype") != "step":
        return Patch(facecolor=style["color"], alpha=style["alpha"], label=name)
    return Patch(
        facecolor="none",
        edgecolor=style["color"],
        linewidth=style["linewidth"],
        linestyle=style.get("linestyle", "-"),
        label=name,
    )


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib defaults plus _RC for one figure, so a user's matplotlibrc changes nothing."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        yield


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # "Software" would embed the matplotlib version; Agg PNGs carry no date otherwise.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()
