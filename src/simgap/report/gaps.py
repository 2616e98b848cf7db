"""The report's similarity-gaps section: per benchmark, histograms of the test points' NN
similarity to the reference set, the pool and the gap-matched splits, their medians, and the
gap check (run layout: gaps/<benchmark>.parquet, splits/*/split.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from simgap.report import figures
from simgap.report.blocks import FigureBlock, Note, Paragraph, Section, Table, sim
from simgap.report.runfiles import (
    GAP_BASE_SETS,
    NOT_COMPUTED,
    RunFiles,
    benchmark_order,
    is_gap_matched,
    split_benchmarks,
    split_order,
)


def gaps_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("Similarity gaps")
    if not files.gaps:
        section.blocks.append(Note(f"Similarity gaps: {NOT_COMPUTED} (no gaps/*.parquet files)."))
        return section
    benches = [b for b in benchmark_order(files) if b in files.gaps]
    panels = [figures.GapPanel(b, _plotted_sets(files, b)) for b in benches]
    section.blocks += [
        Paragraph(
            "For every test point, its NN similarity (highest cosine similarity of its "
            "embedding to any image of a set). Grey area: the reference set; blue outline: "
            "the full pool; other outlines: the gap-matched splits made for that benchmark. "
            "The pool sits to the right of the reference (its images are more similar to "
            "the test points); after pruning, a gap-matched split should trace the grey area "
            "or lie left of it."
        ),
        FigureBlock(
            "fig-gaps.png",
            figures.gap_histograms(panels, colors),
            "Histograms of NN similarity per benchmark",
            "NN similarity of test points to the reference set, the pool and the gap-matched "
            "splits, one panel per benchmark.",
        ),
        _gap_median_table(files, benches),
    ]
    check = _gap_check_table(files, benches)
    if check.rows:
        section.blocks.append(check)
    return section


def _plotted_sets(files: RunFiles, bench: str) -> dict[str, np.ndarray]:
    """Reference, pool, then the gap-matched splits made for this benchmark (controls would crowd
    the plot; their medians are in the table)."""
    columns = files.gaps[bench]
    matched = [
        name
        for name in columns
        if (split := files.splits.get(name))
        and is_gap_matched(split)
        and bench in split_benchmarks(split)
    ]
    # Splits made for more benchmarks first, so the benchmark's own split is drawn on top.
    matched.sort(key=lambda name: -len(split_benchmarks(files.splits[name])))
    return {name: columns[name] for name in [*GAP_BASE_SETS, *matched]}


def _gap_median_table(files: RunFiles, benches: Sequence[str]) -> Table:
    # Splits in the report's split order; columns of unknown splits last, in file order.
    present = [name for b in benches for name in files.gaps[b]]
    known = [s for s in split_order(files) if s in present]
    sets = list(dict.fromkeys([*GAP_BASE_SETS, *known, *present]))
    rows = []
    for name in sets:
        cells = [sim(_nanmedian(files.gaps[b].get(name))) for b in benches]
        rows.append([name, *cells])
    return Table(
        ["set", *benches],
        rows,
        caption="Median NN similarity of each benchmark's test points to each set.",
    )


def _nanmedian(values: np.ndarray | None) -> float:
    if values is None:
        return float("nan")
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def _gap_check_table(files: RunFiles, benches: Sequence[str]) -> Table:
    """Per gap-matched split and target benchmark: test points more similar to the split than to
    the reference (strict >, the pruning rule; the method promises none) and test points whose
    NN similarity equals the reference's (all of them when the reference set is part of the
    split: the gap is replicated exactly)."""
    rows = []
    for name in split_order(files):
        split = files.splits.get(name)
        if not split or not is_gap_matched(split):
            continue
        for bench in benches:
            columns = files.gaps[bench]
            if name not in columns or bench not in split_benchmarks(split):
                continue
            split_nn, reference = columns[name], columns["reference"]
            rows.append(
                [
                    name,
                    bench,
                    f"{split_nn.size:,}",
                    f"{int(np.count_nonzero(split_nn > reference)):,}",
                    f"{int(np.count_nonzero(split_nn == reference)):,}",
                ]
            )
    return Table(
        ["split", "benchmark", "test points", "above reference", "equal to reference"],
        rows,
        caption="Gap check, from the gap files: test points whose NN similarity to a "
        "gap-matched split is above (must be none) or equal to their NN similarity to the "
        "reference set.",
        numeric=(2, 3, 4),
    )
