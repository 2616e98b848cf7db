"""A run's lifecycle: prepare the folder, retire stale splits, execute the plan, write
`run.json` and the report."""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simgap import __version__
from simgap.experiment.config import Config, to_json
from simgap.experiment.engines import executors_of
from simgap.experiment.estimate import scan_lines
from simgap.experiment.plan import (
    Plan,
    make_plan,
)
from simgap.experiment.runner import Runner, execute
from simgap.experiment.specs import (
    missing_paths,
    reference_points_path,
    where,
)
from simgap.io import write_json
from simgap.layout import RunLayout
from simgap.lock import locks_output
from simgap.train import Recipe
from simgap.types import Log

Results = dict[str, Any]


# ----------------------------------------------------------------------------- running


def _prepare_dir(run: Path) -> None:
    stages = RunLayout(run).stages
    if run.is_dir() and any(run.iterdir()) and not stages.is_dir():
        # Resuming writes into the folder: never mix a run into someone else's files.
        raise ValueError(f"{run}: folder is not empty and is not a simgap run; choose another")
    run.mkdir(parents=True, exist_ok=True)
    stages.mkdir(exist_ok=True)


def _retire_stale(run: Path, plan: Plan, log: Log) -> None:
    """Splits a previous config made but this one does not: remove their outputs so the report
    shows only this config's splits (their checkpoints stay, as train/<split>)."""
    layout = RunLayout(run)
    planned = {s.name for s in plan.splits}
    for folder in sorted(layout.splits.glob("*/")):
        name = folder.name
        if name in planned:
            continue
        log(f"[retire] split {name}: not in this config")
        shutil.rmtree(folder)
        shutil.rmtree(layout.gaps_by_split / name, ignore_errors=True)
        layout.eval_result(name).unlink(missing_ok=True)
        for p in layout.eval_seeds.glob(f"{name}@s*.json"):
            if _seed_of(p.stem, name) is not None:
                p.unlink()
        for p in layout.predictions.glob(f"{name}*-*.parquet"):
            model, bench = _model_and_benchmark(p.stem, plan.benchmarks)
            if model == name or _seed_of(model, name) is not None:
                p.unlink()
        for stage in ("select", "gaps", "materialize", "train", "evaluate"):
            layout.stage_record(f"{stage}-{name}").unlink(missing_ok=True)
            for p in layout.stages.glob(f"{stage}-{name}@s*.json"):
                if _seed_of(p.stem[len(stage) + 1 :], name) is not None:
                    p.unlink()


def _retire_reference_line(run: Path, plan: Plan, log: Log) -> None:
    """Reference-line models a previous config trained but this one does not: their
    evaluations would otherwise be counted as the line's (their checkpoints stay)."""
    folder = RunLayout(run).reference_line_eval
    for path in sorted(folder.glob("*.json")):
        if path.stem in plan.reference_line:
            continue
        log(f"[retire] reference-line model {path.stem}: not in this config")
        path.unlink()
        for p in (folder / "predictions").glob(f"{path.stem}-*.parquet"):
            if _model_and_benchmark(p.stem, plan.benchmarks)[0] == path.stem:
                p.unlink()
        for stage in ("train", "evaluate"):
            RunLayout(run).stage_record(f"{stage}-{path.stem}").unlink(missing_ok=True)


def _seed_of(model: str, split: str) -> int | None:
    """k for a model named <split>@s<k>, else None."""
    prefix = f"{split}@s"
    rest = model[len(prefix) :]
    return int(rest) if model.startswith(prefix) and rest.isdigit() else None


def _model_and_benchmark(stem: str, benchmarks: list[str]) -> tuple[str, str]:
    for bench in benchmarks:
        if stem.endswith(f"-{bench}"):
            return stem[: -len(bench) - 1], bench
    return stem, ""


def format_plan(runner: Runner, cfg: Config, plan: Plan) -> str:
    rows = runner.plan()
    todo = sum(not r["cached"] for r in rows)
    lines = [
        f"plan of {cfg.name} ({cfg.path or 'config'}): {len(rows)} stages, "
        f"{len(rows) - todo} cached, {todo} to run",
        f"benchmarks: {', '.join(plan.benchmarks)}",
        f"splits ({len(plan.splits)}): {', '.join(s.name for s in plan.splits)}",
        f"trained ({len(plan.trained)}): {', '.join(plan.trained)}",
        f"engine: {cfg.engine.name}; training: {cfg.train.gpus} x {cfg.train.device}, "
        f"recipe {cfg.train.recipe.model} {_budget(cfg.train.recipe)}, "
        f"global batch {cfg.train.recipe.batch_size}; seeds: {cfg.train.seeds}",
    ]
    lines += scan_lines(cfg, runner.dir, plan.splits, [r["stage"] for r in rows])
    missing = missing_paths(cfg)
    if missing:
        lines.append(f"missing paths ({len(missing)}); a real run stops on them:")
        lines += [f"  missing: {m}" for m in missing]
    width = max(len(r["stage"]) for r in rows)
    lines += [
        f"  {'cached' if r['cached'] else 'run   '}  {r['stage']:<{width}}  {r['key']}"
        for r in rows
    ]
    return "\n".join(lines)


@locks_output("run_dir", unless="dry_run")
def run_config(
    cfg: Config, run_dir: Path, log: Log = print, dry_run: bool = False, report: bool = True
) -> dict[str, Any]:
    """Plan the config's stages in ``run_dir`` and run them (or, dry, only print the plan)."""
    run = Path(run_dir)
    # Per kind of work, from the one engine builder the CLI uses (GPUs for CUDA tasks).
    plan = make_plan(cfg, run, log, executors_of(cfg))
    if dry_run:
        # Reads stage records only: a dry run writes nothing, not even the run folder.
        runner = Runner(run, plan.stages, log)
        return {"plan": runner.plan(), "text": format_plan(runner, cfg, plan)}
    missing = missing_paths(cfg)
    points = reference_points_path(cfg) if cfg.analysis.reference_points else None
    if points is not None and not points.is_file():
        missing.append(f"analysis.reference_points: {points}")  # found out now, not days later
    if missing:
        raise FileNotFoundError(f"{where(cfg)}: missing inputs: " + "; ".join(missing))
    _prepare_dir(run)
    _retire_stale(run, plan, log)
    _retire_reference_line(run, plan, log)
    runner = Runner(run, plan.stages, log)
    started = time.time()
    provenance = {
        "config": {**to_json(cfg), "benchmarks": plan.benchmarks},
        "config_text": cfg.text,
        "config_path": cfg.path,
        "versions": _versions(),
        "started": _utc(started),
    }
    write_json(RunLayout(run).run_json, provenance)  # a killed run still says what it was
    execute(runner, cfg.train.parallel)
    write_json(
        RunLayout(run).run_json,
        {
            **provenance,
            "world": runner.results.get("world"),
            "splits": [s.name for s in plan.splits],
            "trained": plan.trained,
            "timings": runner.timings,
            "finished": _utc(time.time()),
            "wall_seconds": round(time.time() - started, 1),
            "seeds": cfg.train.seeds,
            "analysis": {
                k: runner.results.get(k)
                for k in (
                    "analysis-robustness",
                    "analysis-statistics",
                    "analysis-similarity",
                    "analysis-separation",
                    "audit",
                )
            },
        },
    )
    paths: dict[str, str] = {}
    if report:
        from simgap.report import build_report

        paths = {k: str(v) for k, v in build_report(run).items()}
    return {
        "timings": runner.timings,
        "report": paths,
        "splits": plan.splits,
        "trained": plan.trained,
    }


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _versions() -> dict[str, str]:
    import open_clip
    import torch

    return {
        "simgap": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }


def _budget(recipe: Recipe) -> str:
    if recipe.samples_seen is None:
        return f"{recipe.epochs} epochs"
    return f"{recipe.samples_seen:,} samples seen in {recipe.epochs} parts"
