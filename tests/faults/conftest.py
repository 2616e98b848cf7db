"""Fixtures of the fault suite; the helpers are in faultlib.py (see its docstring)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .faultlib import _STATS, CLI_RUNS, ODD_NAME, summarize, write_pool


def pytest_terminal_summary(terminalreporter):
    if not _STATS and not CLI_RUNS["runs"]:
        return
    if path := os.environ.get("SIMGAP_FAULT_STATS"):
        with open(path, "a") as f:
            for row in _STATS:
                f.write(json.dumps(row) + "\n")
    terminalreporter.section("simgap fault suite")
    stats = terminalreporter.stats
    tests = {
        "passed": len(stats.get("passed", [])),
        "failed": sorted({r.nodeid for k in ("failed", "error") for r in stats.get(k, [])}),
        "skipped": len(stats.get("skipped", [])),
    }
    summary = summarize(_STATS, CLI_RUNS, tests)
    # CPU seconds of this process and of the children it waited for (the CLI runs): on a busy
    # machine a closer measure of the suite's own work than the wall clock.
    t = os.times()
    summary["cpu_seconds"] = {
        "self": round(t.user + t.system, 1),
        "children": round(t.children_user + t.children_system, 1),
    }
    for line in summary_lines(summary):
        terminalreporter.write_line(line)
    if path := os.environ.get("SIMGAP_FAULT_SUMMARY"):
        Path(path).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"fault summary -> {path}")


def summary_lines(summary: dict) -> list[str]:
    """The summary as the fault section's tables, in plain text."""
    lines = ["", "kills (points per outcome; kills injected):"]
    for kind, stages in sorted(summary["kills"].items()):
        for stage, k in sorted(stages.items()):
            outcomes = sorted((o, n) for o, n in k.items() if o not in ("points", "kills"))
            rest = ", ".join(f"{o} {n}" for o, n in outcomes)
            lines.append(f"  {kind:9s} {stage:22s} kills {k['kills']:4d}  {rest}")
    lines.append("inputs tried (per reader, by outcome):")
    for source, readers in sorted(summary["inputs"].items()):
        for reader, i in sorted(readers.items()):
            rest = ", ".join(f"{o} {n}" for o, n in sorted(i.items()) if o != "tried")
            lines.append(f"  {source:9s} {reader:32s} {i['tried']:5d}  {rest}")
    lines.append("load (store / limit above baseline):")
    for stage, d in sorted(summary["load"].items()):
        lines.append(
            f"  {stage:10s} {d['store_mib']} MiB / {d['limit_mib']} MiB = {d['ratio']}x, used "
            f"{d['used_mib']} MiB: {'held' if d['held'] else 'NOT held'}"
        )
    for kind, stages in sorted(summary["other"].items()):
        for stage, o in sorted(stages.items()):
            lines.append(f"  {kind:10s} {stage:12s} " + ", ".join(f"{k} {n}" for k, n in o.items()))
    t = summary["tracebacks"]
    lines.append(
        f"tracebacks: {t['cli_tracebacks']} in {t['cli_runs']} finished CLI runs; "
        f"failed tests: {len(t['failed_tests'])}; clean: {summary['clean']}"
    )
    if cpu := summary.get("cpu_seconds"):
        lines.append(f"cpu: {cpu['self']} s in pytest, {cpu['children']} s in waited children")
    return lines


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A session folder whose name has spaces, '&' and non-ASCII: every test works under it."""
    root = tmp_path_factory.mktemp("faults") / ODD_NAME
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def checkpoint(workdir) -> Path:
    """A real open_clip checkpoint of the tiny similarity model (random init, fixed seed)."""
    import torch

    from simgap.models import ModelSpec, load_model

    path = workdir / "ckpt" / "tiny.pt"
    path.parent.mkdir()
    loaded = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    torch.save({"state_dict": loaded.model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def pool(workdir) -> tuple[Path, list[str]]:
    folder = workdir / "pool"
    return folder, write_pool(folder, shards=6, per_shard=6)
