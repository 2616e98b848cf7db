"""The session summary the fault section's numbers come from (faultlib.summarize)."""

from __future__ import annotations

from .conftest import summary_lines
from .faultlib import summarize


def test_summary_counts_kills_inputs_load_and_tracebacks():
    rows = [
        {"kind": "kill", "stage": "scan", "outcome": "survived", "kills": 2},
        {"kind": "kill", "stage": "scan", "outcome": "finished-before-kill", "kills": 0},
        {"kind": "ray-kill", "stage": "embed", "outcome": "retried, same bytes", "count": 2},
        {"kind": "fuzz", "stage": "split.json", "outcome": "error", "count": 690},
        {"kind": "fuzz", "stage": "split.json", "outcome": "same", "count": 310},
        {"kind": "input", "stage": "embed", "outcome": "counted-skip", "input": "empty file"},
        {"kind": "hostile", "stage": "embed", "outcome": "refused", "input": "pickle"},
        {"kind": "load", "stage": "scan", "outcome": "within-limit", "store_mib": 2048,
         "limit_mib": 256, "used_mib": 40},
        {"kind": "disk-full", "stage": "scan", "outcome": "survived"},
    ]  # fmt: skip
    s = summarize(rows, {"runs": 7, "tracebacks": 0}, {"passed": 3, "failed": [], "skipped": 0})
    assert s["kills"]["kill"]["scan"] == {
        "points": 2, "kills": 2, "survived": 1, "finished-before-kill": 1
    }  # fmt: skip
    assert s["kills"]["ray-kill"]["embed"]["kills"] == 2
    assert s["inputs"]["fuzz"]["split.json"] == {"tried": 1000, "error": 690, "same": 310}
    assert s["inputs"]["catalogue"]["embed"] == {"tried": 1, "counted-skip": 1}
    assert s["inputs"]["catalogue"]["embed (hostile)"]["refused"] == 1
    assert s["load"]["scan"] == {
        "store_mib": 2048, "limit_mib": 256, "used_mib": 40, "ratio": 8.0, "held": True
    }  # fmt: skip
    assert s["other"]["disk-full"]["scan"] == {"survived": 1}
    assert s["tracebacks"] == {"cli_runs": 7, "cli_tracebacks": 0, "failed_tests": []}
    assert s["clean"] and s["tests"] == {"passed": 3, "failed": 0, "skipped": 0}
    assert any("8.0x" in line and "held" in line for line in summary_lines(s))

    bad = summarize(rows, {"runs": 7, "tracebacks": 1}, {"passed": 2, "failed": ["t::x"]})
    assert not bad["clean"] and bad["tracebacks"]["failed_tests"] == ["t::x"]
