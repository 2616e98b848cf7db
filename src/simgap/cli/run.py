"""``simgap run`` and ``simgap demo``: an experiment config end to end, with the run console."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import log

# `simgap demo`'s flags and the config keys each one sets.
DEMO_KEYS = {
    "seed": ["seed", "sources.world.seed", "similarity.recipe.seed", "train.recipe.seed"],
    "scale": ["sources.world.scale"],
    "classes": ["sources.world.n_classes"],
    "epochs": ["similarity.recipe.epochs", "train.recipe.epochs"],
    "engine": ["engine.name"],
    "workers": ["engine.workers"],
}


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment config (a file, or a shipped name)")
    p.add_argument("config", help="config file (.toml/.yaml) or demo | paper-world | paper-laion")
    p.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    _console_args(p)
    p.add_argument("--engine", choices=["local", "ray"], help="override engine.name")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="run the shipped demo config end to end on the world")
    p.add_argument("run_dir", nargs="?", default="demo-run")
    p.add_argument("--seed", type=int)
    p.add_argument("--scale", type=float, help="world size knob (1.0 = default demo)")
    p.add_argument("--classes", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--engine", choices=["local", "ray"])
    p.add_argument("--workers", type=int)
    _console_args(p)
    p.set_defaults(fn=cmd_demo)


def _console_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="stream every stage's log (trainer output)"
    )


def cmd_run(a: argparse.Namespace) -> None:
    from simgap.experiment.config import parse_setting

    settings = dict(parse_setting(s) for s in a.set)
    if a.engine:
        settings["engine.name"] = a.engine
    if a.run_dir is None:
        a.run_dir = f"runs/{Path(a.config).stem}"
    _run_config(a, a.config, settings)


def cmd_demo(a: argparse.Namespace) -> None:
    """`simgap run demo` with the world's knobs on the command line."""
    settings = {
        key: getattr(a, flag)
        for flag, keys in DEMO_KEYS.items()
        if getattr(a, flag) is not None
        for key in keys
    }
    _run_config(a, "demo", settings)


def _run_config(a: argparse.Namespace, name: str, settings: dict) -> None:
    from simgap.console import RunConsole
    from simgap.experiment import config, run_config
    from simgap.report import summary_table

    cfg = config.load(name)
    if settings:
        cfg = config.override(cfg, settings)
    run_dir = Path(a.run_dir)
    plan = run_config(cfg, run_dir, log, dry_run=True)  # reads stage records, writes nothing
    if a.dry_run:
        print(plan["text"])
        return
    stages = [p["stage"] for p in plan["plan"]]
    cached = sum(p["cached"] for p in plan["plan"])
    print(
        f"{cfg.name}: {len(stages)} stages ({cached} cached) in {run_dir}; "
        f"stage logs in {run_dir / 'logs'}" + ("" if a.verbose else " (-v streams them)"),
        flush=True,
    )
    with RunConsole(run_dir, stages, cached=cached, verbose=a.verbose) as console:
        result = run_config(cfg, run_dir, console)
    print(summary_table(run_dir))
    print(f"report: {result['report']['html']}")
    total = sum(result["timings"].values())
    print(
        f"run: {len(stages)} stages ({cached} cached), {len(result['splits'])} splits, "
        f"{len(result['trained'])} trained, {total:.0f}s of stage time -> {run_dir}"
    )
