"""Report section for the contamination audit (audit/audit.json + audit/pairs.parquet): how many
test points of each benchmark have a near-duplicate in the base set (similarity above a
threshold)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from simgap.report.blocks import Note, Paragraph, Section, Table, sim
from simgap.report.runfiles import NOT_COMPUTED, RunFiles, benchmark_order, why_not_computed

_TOP_PAIRS = 10


def audit_section(files: RunFiles) -> Section:
    section = Section("Contamination audit")
    audit = files.audit
    if audit is None:
        section.blocks.append(
            Note(
                f"Contamination audit: {NOT_COMPUTED} (no audit/audit.json"
                f"{why_not_computed(files, 'audit')})."
            )
        )
        return section
    threshold = audit.get("threshold")
    section.blocks += [
        Paragraph(
            "A test point counts as contaminated when some base-set image has similarity "
            f"above {threshold} to it: a near-duplicate the model may have seen in training."
        ),
        _counts_table(files, audit),
    ]
    truth = audit.get("ground_truth")
    if truth:
        section.blocks.append(
            Table(
                ["precision", "recall", "true positives", "false positives", "false negatives"],
                [
                    [
                        sim(float(truth["precision"])),
                        sim(float(truth["recall"])),
                        *(f"{int(truth[k]):,}" for k in ("tp", "fp", "fn")),
                    ]
                ],
                caption="Audit against the known near-duplicates (ground truth).",
                numeric=(0, 1, 2, 3, 4),
            )
        )
    pairs = files.audit_pairs
    if pairs is None:
        section.blocks.append(Note(f"Audit pairs: {NOT_COMPUTED} (no audit/pairs.parquet)."))
    elif pairs.num_rows:
        section.blocks.append(_pairs_table(pairs))
    return section


def _counts_table(files: RunFiles, audit: dict) -> Table:
    entries = audit["benchmarks"]
    order = [b for b in benchmark_order(files) if b in entries]
    order += sorted(b for b in entries if b not in order)
    rows = []
    for bench in order:
        e = entries[bench]
        rows.append(
            [
                bench,
                f"{int(e['tests']):,}",
                f"{int(e['contaminated']):,}",
                f"{100 * float(e['fraction']):.2f}",
            ]
        )
    return Table(
        ["benchmark", "test points", "contaminated", "% contaminated"],
        rows,
        caption=f"Contaminated test points per benchmark (similarity > {audit.get('threshold')}).",
    )


def _pairs_table(pairs: pa.Table) -> Table:
    # Most similar pairs first; ties by key so the table does not depend on file order.
    order = pc.sort_indices(
        pairs,
        sort_keys=[
            ("similarity", "descending"),
            ("benchmark", "ascending"),
            ("test_key", "ascending"),
            ("base_key", "ascending"),
        ],
    )
    top = pairs.take(order[:_TOP_PAIRS]).to_pylist()
    rows = [
        [r["benchmark"], r["test_key"], r["base_key"], sim(float(r["similarity"]))] for r in top
    ]
    return Table(
        ["benchmark", "test key", "base key", "similarity"],
        rows,
        caption=f"The {len(rows)} most similar of {pairs.num_rows:,} contaminated pairs.",
        numeric=(3,),
    )
