"""The similarity structure the experiment rests on (issue 14, section 2): how much more similar
the pool is than the reference set to each benchmark (from gaps/*.parquet), and how well the
similarity model separates classes at all (analysis/separation.json)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simgap.report.blocks import Note, Paragraph, Section, Table, pct_ci, sim
from simgap.report.runfiles import NOT_COMPUTED, RunFiles, benchmark_order, why_not_computed


def structure_rows(files: RunFiles) -> list[dict]:
    """Per benchmark: median NN similarity of its test points to the reference set and to the
    pool, the median of their per-test difference, and the share of test points whose nearest
    neighbour in the pool is more similar than any in the reference set."""
    rows = []
    for bench in [b for b in benchmark_order(files) if b in files.gaps]:
        ref, pool = files.gaps[bench]["reference"], files.gaps[bench]["pool"]
        ok = np.isfinite(ref) & np.isfinite(pool)
        if not ok.any():
            continue
        rows.append(
            {
                "benchmark": bench,
                "tests": int(ok.sum()),
                "reference": float(np.median(ref[ok])),
                "pool": float(np.median(pool[ok])),
                "gap": float(np.median(pool[ok] - ref[ok])),
                "closer_to_pool": float(np.mean(pool[ok] > ref[ok])),
            }
        )
    return rows


def _ranking(rows: Sequence[dict]) -> str:
    """The benchmarks ordered by how much more similar the pool is than the reference set: a
    sentence computed from the medians."""
    ordered = sorted(rows, key=lambda r: -r["gap"])
    parts = [f"{r['benchmark']} ({r['gap']:+.3f})" for r in ordered]
    most, least = ordered[0], ordered[-1]
    text = "Median gap (pool − reference NN similarity), largest first: " + ", ".join(parts) + "."
    if most["gap"] <= 0:
        return text + " The pool is more similar than the reference set on no benchmark."
    return text + (
        f" The pool is most ahead of the reference set on {most['benchmark']}, where "
        f"{100 * most['closer_to_pool']:.0f}% of test points have a more similar pool image, "
        f"and least on {least['benchmark']} ({100 * least['closer_to_pool']:.0f}%)."
    )


def structure_section(files: RunFiles) -> Section:
    section = Section("Similarity structure")
    rows = structure_rows(files)
    if rows:
        section.blocks += [
            Paragraph(
                "The paper's setting: LAION is markedly more similar than ImageNet-train to the "
                "far shifts (Sketch, Rendition), and about as similar to ImageNet-Val. "
                + _ranking(rows)
            ),
            Table(
                [
                    "benchmark",
                    "test points",
                    "reference (median)",
                    "pool (median)",
                    "gap (median)",
                    "closer to pool (%)",
                ],
                [
                    [
                        r["benchmark"],
                        f"{r['tests']:,}",
                        sim(r["reference"]),
                        sim(r["pool"]),
                        f"{r['gap']:+.3f}",
                        f"{100 * r['closer_to_pool']:.1f}",
                    ]
                    for r in rows
                ],
                caption="NN similarity of each benchmark's test points to the reference set and "
                "to the pool: medians, the median per-test gap, and the share of test points "
                "more similar to the pool.",
            ),
        ]
    else:
        section.blocks.append(
            Note(f"Similarity structure: {NOT_COMPUTED} (no gaps/*.parquet files).")
        )
    sep = files.separation
    if sep is None:
        section.blocks.append(
            Note(
                f"Class separation of the similarity model: {NOT_COMPUTED} (no analysis/"
                f"separation.json{why_not_computed(files, 'analysis-separation')})."
            )
        )
        return section
    acc = sep["accuracy"]
    ratio = acc["mean"] / sep["chance"] if sep["chance"] else float("nan")
    section.blocks.append(
        Paragraph(
            f"Class separation of the similarity model: the {sep['k']} nearest reference images "
            f"of each of {sep['tests']:,} {sep['benchmark']} test points vote for its class; "
            f"k-NN top-1 is {pct_ci(acc)}% against {100 * sep['chance']:.1f}% chance "
            f"({ratio:.1f}× chance). Every similarity gap is measured in this model's "
            "embedding space."
        )
    )
    return section
