"""The experiment's answer: ``report/findings.json`` and the report's opening Findings section,
both from analysis/statistics.json, analysis/robustness.json and run.json (issue 14, section 6).

Every sentence is the analysis's computed text (simgap.claims): directions and verdicts come from
the numbers, never from a fixed string."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simgap.io import read_json
from simgap.layout import RunLayout
from simgap.report.blocks import Note, Paragraph, Section
from simgap.report.runfiles import NOT_COMPUTED, RunFiles, why_not_computed

# The keys of findings.json, in this order (the schema; tests check exactly these).
KEYS = (
    "seeds",
    "test_points",
    "chance",
    "top1",
    "differences",
    "effective_robustness",
    "reference_models",
    "claims",
    "wall_seconds",
)


def _optional(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def findings(run_dir: Path) -> dict[str, Any] | None:
    """The findings document, or None when the run computed no statistics."""
    run_dir = Path(run_dir)
    st = _optional(RunLayout(run_dir).statistics)
    if st is None:
        return None
    rob = _optional(RunLayout(run_dir).robustness) or {}
    run = _optional(RunLayout(run_dir).run_json) or {}
    doc = {
        "seeds": st["seeds"],
        "test_points": st["test_points"],
        "chance": st["chance"],
        "top1": st["top1"],
        "differences": st["differences"],
        "effective_robustness": rob.get("effective_robustness", {}),
        "reference_models": _reference_models(run_dir, rob),
        "claims": st["claims"],
        "wall_seconds": run.get("wall_seconds"),
    }
    return {k: doc[k] for k in KEYS}


def _reference_models(run_dir: Path, robustness: dict) -> int:
    """The models of the effective-robustness line: those it was fitted to, or (where no line
    could be fitted) the reference-line models the run evaluated."""
    if "reference_models" in robustness:
        return int(robustness["reference_models"])
    return len(list(RunLayout(run_dir).reference_line_eval.glob("*.json")))


def findings_section(files: RunFiles, doc: dict[str, Any] | None) -> Section:
    section = Section("Findings")
    if doc is None:
        section.blocks.append(
            Note(
                f"Findings: {NOT_COMPUTED} (no analysis/statistics.json"
                f"{why_not_computed(files, 'analysis-statistics')})."
            )
        )
        return section
    tests = ", ".join(f"{b} {n:,}" for b, n in doc["test_points"].items())
    section.blocks.append(
        Paragraph(
            f"Each number is a mean over {doc['seeds']} training seed(s) and the benchmarks' test "
            f"points ({tests}), with a 95% bootstrap interval over both; differences are paired "
            "over the same test points and seeds."
        )
    )
    for i, claim in enumerate(doc["claims"], start=1):
        section.blocks.append(Paragraph(f"{i}. {claim['text']}"))
    return section
