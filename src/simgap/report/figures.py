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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from simgap.robustness import logit

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
    errors: Sequence[tuple[float, float] | None] | None = None  # 95% interval (lo, hi)


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
    with figure_style():
        fig = new_figure(4.0 * ncols, 3.0 * nrows + 0.7)
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
        return png_bytes(fig)


def removed_counts(bars: Sequence[RemovedBar]) -> bytes:
    """Horizontal bars: pool points each gap-matched split removed, annotated with % of pool."""
    with figure_style():
        fig = new_figure(7.0, 0.9 + 0.45 * len(bars))
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
        return png_bytes(fig)


def accuracy_bars(benchmarks: Sequence[str], bars: Sequence[AccuracyBar]) -> bytes:
    """Grouped bars of top-1 (%) per benchmark; controls hatched in their split's colour."""
    width = 0.8 / max(len(bars), 1)
    with figure_style():
        fig = new_figure(min(11.0, max(6.0, 1.0 + 0.14 * len(bars) * len(benchmarks))), 3.8)
        ax = fig.subplots()
        x = np.arange(len(benchmarks))
        for i, bar in enumerate(bars):
            heights = [np.nan if v is None else 100 * v for v in bar.values]
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                heights,
                yerr=_yerr(heights, bar.errors),
                error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#333333"},
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
        return png_bytes(fig)


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
def figure_style() -> Iterator[None]:
    """matplotlib defaults plus _RC for one figure, so a user's matplotlibrc changes nothing."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        yield


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # "Software" would embed the matplotlib version; Agg PNGs carry no date otherwise.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


# ----------------------------------------------------------------------------- near / far / random

POLICY_COLORS = {"near": "#d62728", "far": "#2ca02c", "random": "#7f7f7f"}
_POLICY_MARKERS = {"near": "o", "far": "s", "random": "^"}


@dataclass(frozen=True)
class SizeCurve:
    """One policy's splits, ordered by size: top-1 (fraction) per panel, None where missing."""

    policy: str
    sizes: Sequence[int]
    values: Mapping[str, Sequence[float | None]]  # panel title -> one value per size
    # panel title -> the 95% interval (lo, hi) per size; None: no error bars
    errors: Mapping[str, Sequence[tuple[float, float] | None]] | None = None


def _yerr(
    heights: Sequence[float], errors: Sequence[tuple[float, float] | None] | None
) -> np.ndarray | None:
    """Asymmetric error bars (2 x n, in %) from intervals; None where there are none."""
    if errors is None:
        return None
    lo = [np.nan if e is None else h - 100 * e[0] for h, e in zip(heights, errors, strict=True)]
    hi = [np.nan if e is None else 100 * e[1] - h for h, e in zip(heights, errors, strict=True)]
    return np.array([lo, hi])


def size_curves(
    panels: Sequence[str], curves: Sequence[SizeCurve], full: Mapping[str, tuple[int, float]]
) -> bytes:
    """One subplot per benchmark (and the mean): top-1 against split size, a line per policy;
    the full pool, where evaluated, is a star every line runs towards."""
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with figure_style():
        fig = new_figure(3.3 * ncols, 2.7 * nrows + 0.5)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            for curve in curves:
                y = [np.nan if v is None else 100 * v for v in curve.values[panel]]
                ax.errorbar(
                    curve.sizes,
                    y,
                    yerr=_yerr(y, curve.errors[panel]) if curve.errors else None,
                    capsize=2,
                    elinewidth=0.8,
                    marker=_POLICY_MARKERS.get(curve.policy, "D"),
                    color=POLICY_COLORS.get(curve.policy, "#9467bd"),
                    label=curve.policy,
                )
            if panel in full:
                size, value = full[panel]
                ax.plot([size], [100 * value], marker="*", markersize=11, color="black", ls="")
            ax.set_title(panel)
            ax.set_xlabel("split size (pool points kept)")
            ax.set_ylabel("top-1 (%)")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        handles = [
            Line2D(
                [],
                [],
                color=POLICY_COLORS.get(c.policy, "#9467bd"),
                marker=_POLICY_MARKERS.get(c.policy, "D"),
                label=c.policy,
            )
            for c in curves
        ]
        if full:
            handles.append(Line2D([], [], color="black", marker="*", ls="", label="full pool"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
        return png_bytes(fig)


# ----------------------------------------------------------------- accuracy vs similarity


@dataclass(frozen=True)
class BinnedAccuracy:
    """One split's accuracy per NN-similarity bin on one benchmark."""

    split: str
    bin_lo: np.ndarray
    bin_hi: np.ndarray
    accuracy: np.ndarray  # fraction per bin


def accuracy_by_similarity_figure(
    panels: Mapping[str, Sequence[BinnedAccuracy]], colors: Mapping[str, str]
) -> bytes:
    """One subplot per benchmark: accuracy per bin of the test points' NN similarity, a line per
    split, each bin's value drawn at its midpoint and its extent as a horizontal bar."""
    names = list(panels)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    with figure_style():
        fig = new_figure(4.0 * ncols, 3.0 * nrows + 0.6)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        splits: dict[str, str] = {}
        for ax, bench in zip(axes.flat, names, strict=False):
            for series in panels[bench]:
                mid = (series.bin_lo + series.bin_hi) / 2
                color = colors.get(series.split, "#333333")
                ax.errorbar(
                    mid,
                    100 * series.accuracy,
                    xerr=(series.bin_hi - series.bin_lo) / 2,
                    color=color,
                    marker="o",
                    markersize=3,
                    linewidth=1.3,
                    elinewidth=0.6,
                )
                splits[series.split] = color
            ax.set_title(bench)
            ax.set_xlabel("NN similarity of test point (bin)")
            # Similarities crowd near 1: plain tick values, not an offset like "+1".
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.ticklabel_format(axis="x", useOffset=False)
            ax.set_ylabel("top-1 (%)")
            ax.set_ylim(-2, 102)
        for ax in axes.flat[len(names) :]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=c, marker="o", label=s) for s, c in splits.items()]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5))
        return png_bytes(fig)


# ----------------------------------------------------------------------------- effective robustness


@dataclass(frozen=True)
class RobustnessPoint:
    split: str
    id_acc: float
    ood_acc: float
    reference: bool  # one of the models the line was fitted to
    id_ci: tuple[float, float] | None = None  # 95% intervals: error bars
    ood_ci: tuple[float, float] | None = None


def robustness_plot(
    slope: float, intercept: float, points: Sequence[RobustnessPoint], xlabel: str, ylabel: str
) -> bytes:
    """OOD against ID accuracy on logit-scaled axes (Taori et al.): the fitted line
    logit(ood) = slope * logit(id) + intercept is straight there; a point above it has positive
    effective robustness. Ticks are labelled in accuracy (%)."""
    with figure_style():
        fig = new_figure(6.0, 4.6)
        ax = fig.subplots()
        ids = np.array([logit(p.id_acc) for p in points] or [0.0])
        oods = np.array([logit(p.ood_acc) for p in points] or [0.0])
        lo = min(ids.min(), oods.min()) - 0.5
        hi = max(ids.max(), oods.max()) + 0.5
        x = np.linspace(lo, hi, 50)
        ax.plot(x, slope * x + intercept, color="#1f77b4", label="fitted line")
        ax.plot(x, x, color="#999999", ls=":", linewidth=1, label="y = x")
        for p in points:
            x0, y0 = logit(p.id_acc), logit(p.ood_acc)
            ax.errorbar(
                x0,
                y0,
                xerr=_logit_err(x0, p.id_ci),
                yerr=_logit_err(y0, p.ood_ci),
                marker="o" if p.reference else "D",
                color="#1f77b4" if p.reference else "#d62728",
                ls="",
                elinewidth=0.7,
                capsize=1.5,
            )
            ax.annotate(
                p.split,
                (logit(p.id_acc), logit(p.ood_acc)),
                xytext=(4, 3),
                textcoords="offset points",
                fontsize=7,
            )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ticks = _logit_ticks(lo, hi)
        ax.set_xticks([logit(t) for t in ticks], [f"{100 * t:g}" for t in ticks])
        ax.set_yticks([logit(t) for t in ticks], [f"{100 * t:g}" for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        handles = [
            Line2D([], [], color="#1f77b4", label="fitted line (logit axes)"),
            Line2D([], [], color="#999999", ls=":", label="y = x"),
            Line2D([], [], color="#1f77b4", marker="o", ls="", label="line's models"),
            Line2D([], [], color="#d62728", marker="D", ls="", label="other splits"),
        ]
        ax.legend(handles=handles, loc="upper left")
        return png_bytes(fig)


def _logit_err(center: float, ci: tuple[float, float] | None) -> np.ndarray | None:
    if ci is None:
        return None
    return np.array([[max(0.0, center - logit(ci[0]))], [max(0.0, logit(ci[1]) - center)]])


def _logit_ticks(lo: float, hi: float) -> list[float]:
    candidates = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
    return [t for t in candidates if lo <= logit(t) <= hi]
