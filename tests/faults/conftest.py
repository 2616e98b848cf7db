"""Fixtures of the fault suite; the helpers are in faultlib.py (see its docstring)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from .faultlib import _STATS, ODD_NAME, write_pool


def pytest_terminal_summary(terminalreporter):
    if not _STATS:
        return
    if path := os.environ.get("SIMGAP_FAULT_STATS"):
        with open(path, "a") as f:
            for row in _STATS:
                f.write(json.dumps(row) + "\n")
    counts: Counter = Counter()
    for r in _STATS:  # a fuzz row stands for ``count`` inputs with the same outcome
        counts[(r["kind"], r["stage"], r["outcome"])] += r.get("count", 1)
    terminalreporter.section("simgap fault suite")
    for (kind, stage, outcome), n in sorted(counts.items()):
        terminalreporter.write_line(f"{kind:10s} {stage:26s} {outcome:28s} {n}")


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
