"""Read a run directory's files (docs/CONTRACTS.md, "Run directory") for the report, and order
its benchmarks and splits. Every part but run.json may be missing: a missing part is None or empty,
and the report says that stage was not computed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import read_json
from simgap.layout import RunLayout

# What a report section says when the run lacks the files it is built from.
NOT_COMPUTED = "not computed in this run"

_GAP_ID_COLUMNS = ("test_key", "label")
GAP_BASE_SETS = ("reference", "pool")
# The pseudo-benchmark of analysis/statistics.json: mean top-1 over the OOD benchmarks.
MEAN_OOD = "mean-ood"
T = TypeVar("T")
_ACC_BY_SIM_COLUMNS = ("split", "benchmark", "bin_lo", "bin_hi", "n", "accuracy")
_PAIR_COLUMNS = ("benchmark", "test_key", "base_key", "similarity")

# ----------------------------------------------------------------------------- reading the run


@dataclass(frozen=True)
class RunFiles:
    """Everything the report reads from a run directory, already parsed."""

    run: dict
    gaps: dict[str, dict[str, np.ndarray]]  # benchmark -> set name -> NN similarities
    splits: dict[str, dict]  # split name -> split.json
    evals: dict[str, dict]  # split name -> eval/<split>.json
    run_dir: Path | None = None  # where scans/ and stores/ are found for the galleries
    robustness: dict | None = None  # analysis/robustness.json
    accuracy_by_similarity: pa.Table | None = None  # analysis/accuracy_by_similarity.parquet
    audit: dict | None = None  # audit/audit.json
    audit_pairs: pa.Table | None = None  # audit/pairs.parquet
    statistics: dict | None = None  # analysis/statistics.json: intervals (simgap.stats)
    separation: dict | None = None  # analysis/separation.json: k-NN class separation


def load_run(run_dir: Path) -> RunFiles:
    """Parse a run directory; run.json is required, every other part may be missing."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    run_json = layout.run_json
    if not run_json.is_file():
        raise FileNotFoundError(f"{run_json} not found: not a simgap run directory")
    return RunFiles(
        run=read_json(run_json),
        gaps={p.stem: _read_gaps(p) for p in sorted(layout.gaps.glob("*.parquet"))},
        splits={p.parent.name: read_json(p) for p in sorted(layout.splits.glob("*/split.json"))},
        evals=dict(_read_eval(p) for p in sorted(layout.eval.glob("*.json"))),
        run_dir=run_dir,
        robustness=_optional(layout.robustness, _read_robustness),
        accuracy_by_similarity=_optional(
            layout.accuracy_by_similarity,
            lambda p: _read_parquet(p, _ACC_BY_SIM_COLUMNS),
        ),
        audit=_optional(layout.audit / "audit.json", _read_audit),
        audit_pairs=_optional(
            layout.audit / "pairs.parquet", lambda p: _read_parquet(p, _PAIR_COLUMNS)
        ),
        statistics=_optional(layout.statistics, _read_statistics),
        separation=_optional(layout.separation, read_json),
    )


def _optional(path: Path, read: Callable[[Path], T]) -> T | None:
    return read(path) if path.is_file() else None


def _read_parquet(path: Path, columns: Iterable[str]) -> pa.Table:
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return table


def _read_robustness(path: Path) -> dict:
    data = read_json(path)
    line = data.get("line")
    if not isinstance(line, Mapping) or not all(
        isinstance(line.get(k), int | float) for k in ("slope", "intercept")
    ):
        raise ValueError(f"{path}: 'line' must hold numbers 'slope' and 'intercept'")
    points = data.get("points", [])
    for i, point in enumerate(points):
        missing = [k for k in ("split", "id_acc", "ood_acc") if k not in point]
        if missing:
            raise ValueError(f"{path}: points[{i}] lacks {missing}")
    return data


def _read_statistics(path: Path) -> dict:
    data = read_json(path)
    for key in ("seeds", "top1", "differences"):
        if key not in data:
            raise ValueError(f"{path}: lacks {key!r}")
    return data


def _read_audit(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data.get("benchmarks"), Mapping):
        raise ValueError(f"{path}: 'benchmarks' must map benchmark names to counts")
    for name, entry in data["benchmarks"].items():
        missing = [k for k in ("tests", "contaminated", "fraction") if k not in entry]
        if missing:
            raise ValueError(f"{path}: benchmarks.{name} lacks {missing}")
    return data


def _read_gaps(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    missing = [c for c in GAP_BASE_SETS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing gap columns {missing}")
    # Every float column is a set's NN similarity; keys and labels are not.
    return {
        f.name: table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float64)
        for f in table.schema
        if f.name not in _GAP_ID_COLUMNS and pa.types.is_floating(f.type)
    }


def _read_eval(path: Path) -> tuple[str, dict]:
    # The file name is the contract's key; the "split" field inside is only checked against it.
    data = read_json(path)
    if data.get("split", path.stem) != path.stem:
        raise ValueError(f"{path}: names split {data['split']!r}, file name says {path.stem!r}")
    return path.stem, data


# ----------------------------------------------------------------------------- ordering


def benchmark_order(files: RunFiles) -> list[str]:
    """Benchmarks in the config's order where it lists them, the rest sorted by name."""
    seen: set[str] = set(files.gaps)
    for ev in files.evals.values():
        seen.update(ev.get("benchmarks", {}))
    for sp in files.splits.values():
        seen.update(split_benchmarks(sp))
    configured = [b for b in _configured_benchmarks(files.run) if b in seen]
    return list(dict.fromkeys(configured + sorted(seen)))


def _configured_benchmarks(run: Mapping) -> list[str]:
    """Benchmark names as the config or the world lists them (the world's order is the roles')."""
    out: list[str] = []
    for section in ("config", "world"):
        listed = (run.get(section) or {}).get("benchmarks", [])
        if isinstance(listed, list):
            out += [b if isinstance(b, str) else b.get("name") for b in listed]
    return [b for b in out if isinstance(b, str)]


# Splits sort by policy first: the full pool, then the gap-matched splits, then the rest. The
# coreset shares far's rank: runs made before it had its own policy recorded it as "far", and
# both kinds of run list their splits in the same order.
_POLICY_RANK = {"full": 0, "gapmatch": 1, "near": 2, "far": 3, "coreset": 3}


def split_order(files: RunFiles) -> list[str]:
    """All known splits, each control right after the split it controls. Roots sort by policy,
    then single-benchmark splits in benchmark order before multi-benchmark ones, then name."""
    bench_rank = {b: i for i, b in enumerate(benchmark_order(files))}

    def key(name: str) -> tuple:
        split = files.splits.get(name, {})
        policy = "gapmatch" if is_gap_matched(split) else str(split.get("policy", ""))
        benches = split_benchmarks(split)
        first = bench_rank.get(benches[0], len(bench_rank)) if len(benches) == 1 else 0
        return (_POLICY_RANK.get(policy, len(_POLICY_RANK)), len(benches) > 1, first, name)

    names = sorted(set(files.splits) | set(files.evals), key=key)
    by_split = controls(files)
    controlled = {c for cs in by_split.values() for c in cs}
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:  # guards against control_of cycles
            order.append(name)
            for control in by_split.get(name, []):
                visit(control)

    for name in names:
        if name not in controlled:
            visit(name)
    for name in names:  # splits in a control_of cycle have no root
        visit(name)
    return order


def controls(files: RunFiles) -> dict[str, list[str]]:
    """split -> its size-matched controls (splits whose split.json has control_of == split)."""
    known = set(files.splits) | set(files.evals)
    out: dict[str, list[str]] = {}
    for name in sorted(files.splits):
        target = files.splits[name].get("control_of")
        if target and target in known and target != name:
            out.setdefault(target, []).append(name)
    return out


def split_benchmarks(split: Mapping) -> list[str]:
    value = split.get("benchmarks") or []
    return [value] if isinstance(value, str) else list(value)


def is_gap_matched(split: Mapping) -> bool:
    policy = str(split.get("policy", "")).lower().replace("-", "").replace("_", "")
    return policy.startswith("gap")


def top1(files: RunFiles, split: str, bench: str) -> float | None:
    """A split's zero-shot top-1 (fraction) on a benchmark; None where it was not evaluated."""
    entry = files.evals.get(split, {}).get("benchmarks", {}).get(bench)
    return None if entry is None else float(entry["top1"])


def evaluated_benchmarks(files: RunFiles, splits: Iterable[str]) -> list[str]:
    """The benchmarks, in report order, that at least one of ``splits`` was evaluated on."""
    splits = list(splits)
    return [b for b in benchmark_order(files) if any(top1(files, s, b) is not None for s in splits)]


def top1_ci(files: RunFiles, split: str, bench: str) -> dict | None:
    """A split's top-1 on a benchmark (or "mean-ood") as {mean, lo, hi} over its seeds and test
    points; None where the run has no statistics for it."""
    if files.statistics is None:
        return None
    return files.statistics["top1"].get(split, {}).get(bench)


def difference_ci(files: RunFiles, a: str, b: str, bench: str) -> dict | None:
    """The paired difference a − b as {mean, lo, hi, resolved}; None where not computed."""
    if files.statistics is None:
        return None
    return files.statistics["differences"].get(f"{a} - {b}", {}).get(bench)


def why_not_computed(files: RunFiles, part: str) -> str:
    """The runner's reason for skipping an analysis (run.json "analysis": {part: {"computed":
    false, "why": ...}}), as a clause to append to a note; empty when it gave none."""
    analysis = files.run.get("analysis")
    entry = analysis.get(part) if isinstance(analysis, Mapping) else None
    why = entry.get("why") if isinstance(entry, Mapping) else None
    return f"; the run says: {why}" if why else ""
