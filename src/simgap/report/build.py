"""Build the run report (HTML + Markdown) from the files of a run directory alone.

The report reads only what the pipeline wrote (docs/CONTRACTS.md, "Run directory"): run.json,
gaps/*.parquet, splits/*/split.json, eval/*.json, analysis/, audit/, and for the galleries the scan
results and stores' keys tables. Every number shown is computed from those files here; a part whose
files are absent is replaced by a line saying it was not computed in this run.

Both outputs are rendered from one list of sections, so HTML and Markdown always agree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from simgap.io import write_bytes, write_json
from simgap.layout import RunLayout
from simgap.report import (
    analysis,
    audit,
    composition,
    figures,
    findings,
    gallery,
    gaps,
    structure,
)
from simgap.report.blocks import (
    FigureBlock,
    Note,
    Paragraph,
    Pre,
    Section,
    Table,
    diff,
    mean,
    pct,
    pct_ci,
    pp,
)
from simgap.report.render import render_html, render_markdown
from simgap.report.runfiles import (
    MEAN_OOD,
    NOT_COMPUTED,
    RunFiles,
    controls,
    difference_ci,
    evaluated_benchmarks,
    is_gap_matched,
    load_run,
    split_benchmarks,
    split_order,
    top1,
    top1_ci,
)

# split.json keys that may hold the guarantee check's verdict, in order of preference.
_VERDICT_KEYS = ("ok", "holds", "passed", "satisfied", "valid")

# ----------------------------------------------------------------------------- sections


def _intro(files: RunFiles) -> Section:
    parts = [
        f"{len(files.gaps)} benchmark(s) with similarity gaps",
        f"{len(files.splits)} split(s)",
        f"{len(files.evals)} evaluated split(s)",
    ]
    return Section(
        "simgap report",
        [
            Paragraph(
                "Does CLIP's generalization mainly stem from high train–test similarity? "
                "This run measures how similar each benchmark's test points are to a small "
                "reference training set and to a large pool, prunes the pool until its "
                "similarity to the benchmarks is no higher than the reference's "
                "(gap-matched splits), and compares models trained on each split, against "
                "random splits of the same size."
            ),
            Paragraph("This run directory holds: " + "; ".join(parts) + "."),
        ],
    )


def _accuracy_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("Zero-shot accuracy")
    if not files.evals:
        section.blocks.append(Note(f"Evaluation: {NOT_COMPUTED} (no eval/*.json files)."))
        return section
    benches = evaluated_benchmarks(files, files.evals)
    evaluated = [s for s in split_order(files) if s in files.evals]
    stats = files.statistics
    if stats is not None:
        tests = ", ".join(f"{b} {n:,}" for b, n in stats["test_points"].items())
        text = (
            f"Zero-shot top-1 accuracy (%) of the models trained on each split: the mean over "
            f"{stats['seeds']} training seed(s) and each benchmark's test points ({tests}), "
            "with its 95% interval in brackets (a bootstrap over both seeds and test points). "
            f"Mean OOD: the mean over the benchmarks other than {stats['id_benchmark']}."
        )
    else:
        text = (
            "Zero-shot top-1 accuracy (%) of the model trained on each split. The mean is "
            "over the benchmarks a split was evaluated on."
        )
    section.blocks += [Paragraph(text), _accuracy_table(files, evaluated, benches)]
    pairs = _control_pairs(files)
    if pairs:
        section.blocks.append(_control_table(files, pairs, benches))
    else:
        section.blocks.append(Note("No evaluated split has an evaluated size-matched control."))
    if stats is not None and stats["differences"]:
        section.blocks.append(_differences_table(files))
    unevaluated = [s for s in split_order(files) if s not in files.evals]
    if unevaluated:
        section.blocks.append(Note("Not evaluated: " + ", ".join(unevaluated) + "."))
    section.blocks.append(
        FigureBlock(
            "fig-accuracy.png",
            figures.accuracy_bars(
                [*benches, _mean_label(files)], _accuracy_bars(files, evaluated, benches, colors)
            ),
            "Bar chart of top-1 accuracy per benchmark and split",
            f"Top-1 (%) per benchmark and the {_mean_label(files)} top-1; hatched bars are "
            "random controls, drawn in the colour of the split they control"
            + ("; error bars: 95% intervals." if stats is not None else "."),
        )
    )
    return section


def _mean_label(files: RunFiles) -> str:
    return "mean OOD" if files.statistics is not None else "mean"


def _accuracy_table(files: RunFiles, splits: Sequence[str], benches: Sequence[str]) -> Table:
    rows = []
    for split in splits:
        policy = str(files.splits.get(split, {}).get("policy", "—"))
        if files.statistics is not None:
            cells = [pct_ci(top1_ci(files, split, b)) for b in [*benches, MEAN_OOD]]
        else:
            values = [top1(files, split, b) for b in benches]
            cells = [*map(pct, values), pct(mean(values))]
        rows.append([split, policy, *cells])
    header = ["split", "policy", *benches, _mean_label(files)]
    caption = "Zero-shot top-1 (%) per split and benchmark" + (
        ", with 95% intervals." if files.statistics is not None else "."
    )
    return Table(header, rows, caption, numeric=tuple(range(2, len(header))))


def _control_pairs(files: RunFiles) -> list[tuple[str, str]]:
    by_split = controls(files)
    return [
        (split, control)
        for split in split_order(files)
        for control in by_split.get(split, [])
        if split in files.evals and control in files.evals
    ]


def _control_table(
    files: RunFiles, pairs: Sequence[tuple[str, str]], benches: Sequence[str]
) -> Table:
    if files.statistics is not None:
        return _control_table_ci(files, pairs, benches)
    rows = []
    for split, control in pairs:
        own = [top1(files, split, b) for b in benches]
        ctl = [top1(files, control, b) for b in benches]
        delta = diff(own, ctl)
        rows += [
            [split, *map(pct, own), pct(mean(own))],
            [f"control: {control}", *map(pct, ctl), pct(mean(ctl))],
            [f"Δ {split} − control", *map(pp, delta), pp(mean(delta))],
        ]
    return Table(
        ["split", *benches, "mean"],
        rows,
        caption="Each split against its size-matched random control: top-1 (%) and the "
        "difference in percentage points (computed from unrounded values).",
    )


def _control_table_ci(
    files: RunFiles, pairs: Sequence[tuple[str, str]], benches: Sequence[str]
) -> Table:
    cols = [*benches, MEAN_OOD]
    rows = []
    for split, control in pairs:
        rows += [
            [split, *(pct_ci(top1_ci(files, split, b)) for b in cols)],
            [f"control: {control}", *(pct_ci(top1_ci(files, control, b)) for b in cols)],
            [
                f"Δ {split} − control",
                *(pct_ci(difference_ci(files, split, control, b), signed=True) for b in cols),
            ],
        ]
    return Table(
        ["split", *benches, "mean OOD"],
        rows,
        caption="Each split against its size-matched random control: top-1 (%) and the paired "
        "difference in percentage points (over the same test points and seeds), with 95% "
        "intervals; * marks a difference whose interval excludes 0 (resolved).",
    )


def _differences_table(files: RunFiles) -> Table:
    """Every paired difference the run computed (split − control, split − full), mean OOD and
    per benchmark, with a plain resolved / not resolved column."""
    stats = files.statistics or {}
    rows = []
    for pair, by_bench in stats["differences"].items():
        ood = by_bench.get(MEAN_OOD) or next(iter(by_bench.values()))
        rows.append(
            [
                pair.replace(" - ", " − "),
                pct_ci(ood, signed=True),
                "resolved" if ood.get("resolved") else "not resolved",
                ", ".join(
                    f"{b} {pp(v['mean'])}" + ("*" if v.get("resolved") else "")
                    for b, v in by_bench.items()
                    if b != MEAN_OOD
                ),
            ]
        )
    return Table(
        ["difference", "mean OOD (pp)", "verdict", "per benchmark (pp; * resolved)"],
        rows,
        caption="Paired differences of mean OOD top-1 with 95% intervals: resolved when the "
        "interval excludes 0.",
        numeric=(1,),
    )


def _accuracy_bars(
    files: RunFiles, splits: Sequence[str], benches: Sequence[str], colors: Mapping[str, str]
) -> list[figures.AccuracyBar]:
    controlled = {c for cs in controls(files).values() for c in cs}
    bars = []
    for split in splits:
        hatched = split in controlled
        if files.statistics is not None:
            ivs = [top1_ci(files, split, b) for b in [*benches, MEAN_OOD]]
            values = [None if iv is None else iv["mean"] for iv in ivs]
            errors = [None if iv is None else (iv["lo"], iv["hi"]) for iv in ivs]
            bars.append(figures.AccuracyBar(split, values, colors[split], hatched, errors))
            continue
        values = [top1(files, split, b) for b in benches]
        bars.append(figures.AccuracyBar(split, [*values, mean(values)], colors[split], hatched))
    return bars


def _splits_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("Splits")
    if not files.splits:
        section.blocks.append(
            Note(f"Split selection: {NOT_COMPUTED} (no splits/*/split.json files).")
        )
        return section
    section.blocks += [
        Paragraph(
            "Each split is the subset of the pool a model was trained on. Removed = pool size − "
            "kept size. A control is a random split of the same size as the split it names."
        ),
        _sizes_table(files),
    ]
    bars = _removed_bars(files, colors)
    if bars:
        section.blocks.append(
            FigureBlock(
                "fig-removed.png",
                figures.removed_counts(bars),
                "Bar chart of pool points removed by each gap-matched split",
                "Pool points removed by each gap-matched split (the benchmarks it was pruned "
                "for in brackets), with the share of the pool.",
            )
        )
    else:
        section.blocks.append(Note("No gap-matched split in this run."))
    return section


def _sizes_table(files: RunFiles) -> Table:
    rows = []
    for name in split_order(files):
        split = files.splits.get(name)
        if split is None:
            continue
        size, pool = int(split["size"]), int(split["pool_size"])
        rows.append(
            [
                name,
                str(split.get("policy", "—")),
                ", ".join(split_benchmarks(split)) or "—",
                f"{size:,}",
                f"{pool - size:,}",
                f"{100 * size / pool:.1f}" if pool else "—",
                "yes" if split.get("reference_added") else "no",
                str(split.get("control_of") or "—"),
                _guarantee_text(split.get("guarantee")),
                json.dumps(split.get("params", {}), sort_keys=True),
            ]
        )
    return Table(
        [
            "split",
            "policy",
            "benchmarks",
            "kept",
            "removed",
            "% of pool",
            "reference added",
            "control of",
            "guarantee",
            "params",
        ],
        rows,
        caption="Split sizes.",
        numeric=(3, 4, 5),
    )


def _guarantee_text(guarantee: object) -> str:
    if not guarantee:
        return "—"
    if not isinstance(guarantee, Mapping):
        return str(guarantee)
    verdict = next((k for k in _VERDICT_KEYS if isinstance(guarantee.get(k), bool)), None)
    details = [
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
        for k, v in sorted(guarantee.items())
        if k != verdict
    ]
    head = [] if verdict is None else ["pass" if guarantee[verdict] else "FAIL"]
    return "; ".join(head + details)


def _removed_bars(files: RunFiles, colors: Mapping[str, str]) -> list[figures.RemovedBar]:
    bars = []
    for name in split_order(files):
        split = files.splits.get(name)
        if not split or not is_gap_matched(split):
            continue
        benches = split_benchmarks(split)
        target = benches[0] if len(benches) == 1 else f"{len(benches)} benchmarks"
        label = name if target == name else f"{name} ({target})"
        size, pool = int(split["size"]), int(split["pool_size"])
        bars.append(figures.RemovedBar(label, pool - size, pool, colors[name]))
    return sorted(bars, key=lambda b: -b.removed)


def _provenance_section(files: RunFiles) -> Section:
    run = files.run
    section = Section("Run provenance")
    if isinstance(run.get("config_text"), str):
        section.blocks.append(Pre("Configuration file (as given)", run["config_text"], "text"))
    for key, title in (("config", "Configuration (resolved)"), ("world", "World")):
        if run.get(key):
            section.blocks.append(Pre(title, json.dumps(run[key], indent=2, ensure_ascii=False)))
    versions = run.get("versions") or {}
    if versions:
        rows = [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in versions.items()]
        section.blocks.append(Table(["package", "version"], rows, "Versions.", numeric=()))
    timings = _seconds(run.get("timings") or {})
    if timings:
        section.blocks.append(_timings_table(timings))
    else:
        section.blocks.append(Note("No stage timings recorded in run.json."))
    return section


def _seconds(timings: Mapping) -> dict[str, float]:
    """Stage -> seconds; a stage may record a number or an object with "seconds"."""
    out = {}
    for stage, value in timings.items():
        if isinstance(value, Mapping):
            value = value.get("seconds")
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(stage)] = float(value)
    return out


def _timings_table(timings: Mapping[str, float]) -> Table:
    total = sum(float(v) for v in timings.values())
    rows = [
        [stage, f"{float(s):.1f}", f"{100 * float(s) / total:.1f}" if total else "—"]
        for stage, s in timings.items()
    ]
    rows.append(["total", f"{total:.1f}", "100.0" if total else "—"])
    return Table(["stage", "seconds", "% of total"], rows, "Stage timings.")


def _colors(files: RunFiles) -> dict[str, str]:
    """One colour per split for every figure; a control shares its split's colour (it is told
    apart by hatching), so controls do not use up the palette."""
    parent = {c: split for split, cs in controls(files).items() for c in cs}
    colors = figures.split_colors([s for s in split_order(files) if s not in parent])
    colors.update({c: colors[split] for c, split in parent.items()})
    return colors


def build_sections(files: RunFiles) -> list[Section]:
    """The report's content, independent of output format."""
    colors = _colors(files)
    doc = findings.findings(files.run_dir) if files.run_dir else None
    body = [
        findings.findings_section(files, doc),
        structure.structure_section(files),
        gaps.gaps_section(files, colors),
        gallery.gallery_section(files),
        _accuracy_section(files, colors),
        analysis.curves_section(files),
        analysis.similarity_section(files, colors),
        analysis.robustness_section(files),
        audit.audit_section(files),
        _splits_section(files, colors),
        composition.composition_section(files),
        _provenance_section(files),
    ]
    for i, section in enumerate(body, start=1):
        section.title = f"{i}. {section.title}"
    return [_intro(files), *body]


# ----------------------------------------------------------------------------- writing


def build_report(run_dir: Path) -> dict[str, Path]:
    """Write run/report/report.html (self-contained) and report.md (+ PNGs); return their paths."""
    run_dir = Path(run_dir)
    sections = build_sections(load_run(run_dir))
    out = RunLayout(run_dir).report
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for block in (b for s in sections for b in s.blocks):
        if isinstance(block, FigureBlock):
            write_bytes(out / block.filename, block.png)
            written.add(block.filename)
    # A figure left from an earlier, fuller build of this run would no longer match the report.
    for stale in out.glob("fig-*.png"):
        if stale.name not in written:
            stale.unlink()
    paths = {"html": out / "report.html", "markdown": out / "report.md"}
    doc = findings.findings(run_dir)
    if doc is not None:
        paths["findings"] = out / "findings.json"
        write_json(paths["findings"], doc)
    else:  # an earlier build's findings would no longer match this report
        (out / "findings.json").unlink(missing_ok=True)
    write_bytes(paths["markdown"], render_markdown(sections).encode("utf-8"))
    write_bytes(paths["html"], render_html(sections).encode("utf-8"))
    return paths
