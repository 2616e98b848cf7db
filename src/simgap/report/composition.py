"""The report's "What pruning removed" section, from ``analysis/composition.json``
(:mod:`simgap.select.composition`).

On the world, where what each pool sample is is known, a stacked-bar figure and a table compare
the removed points with the kept ones (by kind: domain, distractor, planted near-duplicate; and
by caption noise), and one computed sentence per pruned split names the kind most
over-represented among its removed points. On real data, galleries show removed points at
several scores (margin over the threshold, or similarity to the benchmarks), with captions.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np

from simgap.io import read_json
from simgap.layout import RunLayout
from simgap.report.blocks import FigureBlock, Note, Paragraph, Section, Table
from simgap.report.figures import figure_style, new_figure, png_bytes
from simgap.report.gallery import GallerySample, fetch_thumbnails
from simgap.report.imagegrid import Thumb, nn_gallery
from simgap.report.runfiles import NOT_COMPUTED, RunFiles, split_order

GROUP_TITLES = {"kind": "kind of pool sample", "caption": "caption"}
# matplotlib's tab10: one colour per category, the order matplotlib itself cycles through.
_CATEGORY_COLORS = tuple(matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors)
_CAPTION_CHARS = 18  # per line under a gallery thumbnail


def load_composition(files: RunFiles) -> dict[str, Any] | None:
    path = None if files.run_dir is None else RunLayout(files.run_dir).composition
    return read_json(path) if path is not None and path.is_file() else None


def pruned_splits(files: RunFiles, comp: Mapping[str, Any]) -> list[str]:
    """Splits that removed something, in the report's split order (then by name)."""
    rank = {name: i for i, name in enumerate(split_order(files))}
    names = sorted(comp["splits"], key=lambda n: (rank.get(n, len(rank)), n))
    return [n for n in names if comp["splits"][n]["removed"] > 0]


def shares(counts: Mapping[str, Sequence[int]], column: int) -> dict[str, float]:
    """category -> its share of the kept (column 0) or removed (column 1) points."""
    total = sum(c[column] for c in counts.values())
    return {k: (c[column] / total if total else 0.0) for k, c in counts.items()}


def over_represented(
    counts: Mapping[str, Sequence[int]], among: int = 1
) -> tuple[str, float, float]:
    """The category whose share of the removed (``among`` 1) or kept (0) points most exceeds its
    share of the other side (ties to the first in name order): (category, its share there, its
    share on the other side)."""
    here, there = shares(counts, among), shares(counts, 1 - among)
    best = max(sorted(counts), key=lambda k: here[k] - there[k])
    return best, here[best], there[best]


def removed_sentence(
    name: str, split: Mapping[str, Any], pool: int, control: tuple[str, Mapping] | None = None
) -> str:
    """Computed sentences: how much the split removed, the kind most over-represented among the
    removed and among the kept points, the caption noise most over-represented among the
    removed, and what share of that kept kind its size-matched ``control`` (name, entry) keeps."""
    kinds = split["counts"]["kind"]
    gone, r, k = over_represented(kinds, 1)
    stays, ks, rs = over_represented(kinds, 0)
    noise, nr, nk = over_represented(split["counts"]["caption"], 1)
    text = (
        f"{name} removed {split['removed']:,} of {pool:,} pool points "
        f"({100 * split['removed'] / pool:.1f}%): {100 * r:.1f}% of the removed are {gone} "
        f"samples against {100 * k:.1f}% of the kept; {100 * ks:.1f}% of the kept are {stays} "
        f"samples against {100 * rs:.1f}% of the removed; {100 * nr:.1f}% of the removed have a "
        f"{noise} caption against {100 * nk:.1f}% of the kept."
    )
    if control is not None:
        other, entry = control
        share = shares(entry["counts"]["kind"], 0).get(stays, 0.0)
        text += f" Its size-matched control {other} keeps {100 * share:.1f}% {stays} samples."
    return text


def _control_of(files: RunFiles, comp: Mapping[str, Any], name: str) -> tuple[str, Mapping] | None:
    for other, split in files.splits.items():
        if split.get("control_of") == name and other in comp["splits"]:
            return other, comp["splits"][other]
    return None


def composition_figure(comp: Mapping[str, Any], names: Sequence[str]) -> bytes:
    """Stacked horizontal bars, one panel per ground-truth group: for each split a bar of its
    kept points and one of its removed points, each split into the shares of every category."""
    groups = list(GROUP_TITLES)
    with figure_style():
        fig = new_figure(11.0, 1.6 + 0.42 * len(names))
        axes = fig.subplots(1, len(groups), sharey=True)
        labels = [f"{n} {side}" for n in names for side in ("kept", "removed")]
        y = np.arange(len(labels))
        for ax, group in zip(axes, groups, strict=True):
            categories = comp["groups"][group]
            left = np.zeros(len(labels))
            for i, category in enumerate(categories):
                widths = np.array(
                    [
                        shares(comp["splits"][n]["counts"][group], side).get(category, 0.0)
                        for n in names
                        for side in (0, 1)
                    ]
                )
                color = _CATEGORY_COLORS[i % len(_CATEGORY_COLORS)]
                ax.barh(y, widths, left=left, height=0.75, color=color, label=category)
                left += widths
            ax.set_yticks(y, labels)
            ax.set_xlim(0, 1)
            ax.set_xlabel(f"share of points, by {GROUP_TITLES[group]}")
            ax.grid(axis="y", visible=False)
            ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
        axes[0].invert_yaxis()  # once: the panels share the axis
        return png_bytes(fig)


def composition_table(comp: Mapping[str, Any], names: Sequence[str]) -> Table:
    kinds = comp["groups"]["kind"]
    rows = []
    for n in names:
        counts = comp["splits"][n]["counts"]["kind"]
        removed, kept = shares(counts, 1), shares(counts, 0)
        rows.append(
            [n, f"{comp['splits'][n]['removed']:,}"]
            + [f"{100 * removed.get(k, 0):.1f} / {100 * kept.get(k, 0):.1f}" for k in kinds]
        )
    return Table(
        ["split", "removed", *kinds],
        rows,
        caption="Share (%) of each kind of pool sample among the removed / the kept points.",
    )


def _caption_lines(text: str | None) -> list[str]:
    lines = textwrap.wrap(text or "(no caption)", _CAPTION_CHARS)[:2]
    return lines or ["(no caption)"]


def removed_gallery(split: Mapping[str, Any], images: Mapping[GallerySample, np.ndarray]) -> bytes:
    """One row: the split's removed examples, each titled with its score and caption."""
    score = split["score"] or "row"
    cells = []
    for e in split["examples"]:
        value = "" if e["score"] is None else f" {e['score']:.3f}"
        title = [f"q{e['quantile']:.2f} {score}{value}", e["key"], *_caption_lines(e["caption"])]
        cells.append(Thumb(images.get(GallerySample(e["key"], e["source"])), "\n".join(title)))
    return nn_gallery([cells])


def _galleries(comp: Mapping[str, Any], names: Sequence[str]) -> list[FigureBlock | Note]:
    shown = [n for n in names if comp["splits"][n]["examples"]]
    samples = [
        GallerySample(e["key"], e["source"]) for n in shown for e in comp["splits"][n]["examples"]
    ]
    missing: Counter[str] = Counter()
    images = fetch_thumbnails(samples, missing)
    blocks: list[FigureBlock | Note] = [
        FigureBlock(
            f"fig-removed-{n}.png",
            removed_gallery(comp["splits"][n], images),
            f"Image row: pool points removed by {n}, with their captions",
            f"{n}: removed pool points at the highest, 75%, median, 25% and lowest "
            f"{comp['splits'][n]['score'] or 'row position'} among its removed points.",
        )
        for n in shown
    ]
    if missing:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
        blocks.append(Note(f"{sum(missing.values())} removed images not found again ({reasons})."))
    return blocks


def composition_section(files: RunFiles) -> Section:
    section = Section("What pruning removed")
    comp = load_composition(files)
    if comp is None:
        section.blocks.append(
            Note(
                f"Composition of the removed points: {NOT_COMPUTED} (no analysis/composition.json)."
            )
        )
        return section
    names = pruned_splits(files, comp)
    if not names:
        section.blocks.append(Note("No split removed any pool point."))
        return section
    if comp["ground_truth"]:
        section.blocks += [
            Paragraph(
                "On the world each pool sample's kind (its domain, a class-less distractor, or a "
                "planted near-duplicate of a test image) and its caption (clean, without a class "
                "word, with a wrong one) are known. For every split that removed points: the "
                "composition of the points it removed against the points it kept."
            ),
            FigureBlock(
                "fig-composition.png",
                composition_figure(comp, names),
                "Stacked bars: composition of kept and removed pool points per split",
                "Per split, the kept and the removed pool points, as shares of each kind of "
                "sample (left) and each kind of caption (right).",
            ),
            composition_table(comp, names),
            *(
                Paragraph(
                    removed_sentence(
                        n, comp["splits"][n], comp["pool"], _control_of(files, comp, n)
                    )
                )
                for n in names
                if comp["splits"][n]["policy"] != "random"  # a random split removes no kind
            ),
        ]
        return section
    section.blocks.append(
        Paragraph(
            "What each pool point is cannot be known on real data: for every split that removed "
            "points, removed pool images with their captions, at several scores among the "
            "removed points (the margin over a test point's threshold for a gap-matched split, "
            "the similarity to the benchmarks for near / far / coreset)."
        )
    )
    section.blocks += _galleries(comp, names)
    section.blocks.append(examples_table(comp, names))
    return section


def examples_table(comp: Mapping[str, Any], names: Sequence[str]) -> Table:
    rows = [
        [
            n,
            f"{e['quantile']:.2f}",
            "—" if e["score"] is None else f"{e['score']:.3f}",
            e["key"],
            e["caption"] or "(no caption)",
        ]
        for n in names
        for e in comp["splits"][n]["examples"]
    ]
    return Table(
        ["split", "quantile", "score", "key", "caption"],
        rows,
        caption="Removed pool points shown in the galleries, with their captions.",
        numeric=(1, 2),
    )
