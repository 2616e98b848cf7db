"""The run's results as text for the terminal (``simgap run`` and ``simgap report`` print it):
top-1 per evaluated split and benchmark, each control under its split with the split's lead
over it, and the findings when the run has statistics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from simgap.report.blocks import diff, mean, pct, pct_ci, pp
from simgap.report.runfiles import (
    MEAN_OOD,
    RunFiles,
    difference_ci,
    evaluated_benchmarks,
    load_run,
    split_order,
    top1,
    top1_ci,
)


def summary_table(run_dir: Path) -> str:
    """Top-1 (%) per evaluated split × benchmark, each control followed by its split's lead over
    it, as aligned text; splits without evaluation are listed on a last line."""
    files = load_run(Path(run_dir))
    splits = split_order(files)
    if not splits:
        return "no splits in this run"
    if not files.evals:
        return "evaluation was not run (no eval/*.json); splits: " + ", ".join(splits)
    benches = evaluated_benchmarks(files, splits)
    if files.statistics is not None:
        return _summary_with_intervals(files, splits, benches)
    rows: list[list[str]] = []
    for split in (s for s in splits if s in files.evals):
        own = [top1(files, split, b) for b in benches]
        parent = files.splits.get(split, {}).get("control_of")
        if parent not in files.evals or parent == split:
            rows.append([split, *map(pct, own), pct(mean(own))])
            continue
        # A control is indented under its split and followed by the split's lead over it.
        rows.append([f"  {split} (control)", *map(pct, own), pct(mean(own))])
        ref = [top1(files, parent, b) for b in benches]
        delta = diff(ref, own)
        rows.append([f"  Δ {parent} − control", *map(pp, delta), pp(mean(delta))])
    text = _text_table(["top-1 (%)", *benches, "mean"], rows)
    unevaluated = [s for s in splits if s not in files.evals]
    return text + ("\nnot evaluated: " + ", ".join(unevaluated) if unevaluated else "")


def _summary_with_intervals(files: RunFiles, splits: Sequence[str], benches: Sequence[str]) -> str:
    """Means over seeds per benchmark, the mean OOD top-1 with its 95% interval; each control's
    paired difference (* resolved); then the findings' sentences."""
    stats = files.statistics or {}

    def means(split: str) -> list[str]:
        return [pct((top1_ci(files, split, b) or {}).get("mean")) for b in benches]

    rows: list[list[str]] = []
    for split in (s for s in splits if s in files.evals):
        parent = files.splits.get(split, {}).get("control_of")
        ood = pct_ci(top1_ci(files, split, MEAN_OOD))
        if parent not in files.evals or parent == split:
            rows.append([split, *means(split), ood])
            continue
        rows.append([f"  {split} (control)", *means(split), ood])
        deltas = [difference_ci(files, parent, split, b) for b in benches]
        cells = [
            "—" if d is None else pp(d["mean"]) + ("*" if d.get("resolved") else "") for d in deltas
        ]
        ood_delta = pct_ci(difference_ci(files, parent, split, MEAN_OOD), signed=True)
        rows.append([f"  Δ {parent} − control", *cells, ood_delta])
    head = f"top-1 (%), mean of {stats.get('seeds', 1)} seed(s)"
    text = _text_table([head, *benches, "mean OOD [95% CI]"], rows)
    text += "\n(* paired difference resolved: its 95% interval excludes 0)"
    unevaluated = [s for s in splits if s not in files.evals]
    if unevaluated:
        text += "\nnot evaluated: " + ", ".join(unevaluated)
    claims = stats.get("claims") or []
    if claims:
        text += "\n\nFindings:\n" + "\n".join(f"{i}. {c['text']}" for i, c in enumerate(claims, 1))
    return text


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
