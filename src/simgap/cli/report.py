"""``simgap report``: build the HTML/Markdown report of a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="build the HTML/Markdown report of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)


def cmd_report(a: argparse.Namespace) -> None:
    from simgap.report import build_report, summary_table

    paths = build_report(Path(a.run_dir))
    print(summary_table(Path(a.run_dir)))
    figures = len(list(Path(paths["html"]).parent.glob("fig-*.png")))
    print(f"report: {figures} figures -> {paths['html']} (and {Path(paths['markdown']).name})")
