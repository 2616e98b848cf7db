"""`simgap run CONFIG`: config validation, the plan, cache hits and misses, resume after a kill,
and the dry run of the real (paper-laion) setup."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from simgap.cli import main
from simgap.experiment import config, make_plan
from simgap.experiment.config import ConfigError
from simgap.experiment.runner import Runner
from simgap.models import ModelSpec, load_model
from simgap.parallel import Executor, LocalEngine

SRC = str(Path(__file__).resolve().parent.parent / "src")

# A tiny world and a given (random) similarity model: no similarity training to wait for.
TINY = """
name = "tiny"
seed = 1
[sources.world]
seed = 3
scale = 0.05
[similarity]
train_on_pool = false
checkpoint = "{checkpoint}"
[splits.gapmatch]
per_benchmark = false
[splits.near]
sizes = [0.5]
[train]
splits = ["combined", "near-0.5"]
[train.recipe]
epochs = 1
batch_size = 32
[evaluate]
benchmarks = ["photo", "sketch"]
"""


def _parse(text: str, name: str = "config.toml") -> config.Config:
    return config.parse(text, name)


def _error(text: str, name: str = "config.toml") -> str:
    with pytest.raises(ConfigError) as err:
        _parse(text, name)
    return str(err.value)


# ----------------------------------------------------------------------------- config errors


def test_error_names_the_key_and_the_bad_list_element():
    msg = _error('[splits.near]\nsizes = [0.25, "x"]\n')
    assert msg == 'config.toml: splits.near.sizes[1]: expected a number in (0, 1], got "x"'
    msg = _error("[splits.far]\nsizes = [0.5, 1.5]\n")
    assert msg == "config.toml: splits.far.sizes[1]: expected a number in (0, 1], got 1.5"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[splits]\nnearr = 1\n", "config.toml: splits.nearr: unknown key; known keys here: full"),
        ("bogus = 1\n", "config.toml: bogus: unknown key"),
        ('[engine]\nname = "spark"\n', 'engine.name: expected one of "local", "ray", got "spark"'),
        ('[splits]\nfull = "yes"\n', 'splits.full: expected true or false, got "yes"'),
        ("[train]\nparallel = 0\n", "train.parallel: expected an integer >= 1, got 0"),
        ("[train.recipe]\nepochs = 1.5\n", "train.recipe.epochs: expected an integer, got 1.5"),
        ("[sources.world]\nscale = -1.0\n", "sources.world: scale must be > 0"),
        ("splits = 3\n", "splits: expected a table of keys, got 3"),
        ('[reference]\ncaption = "a photo"\n', 'reference.caption: must contain "{c}"'),
        ('[sources]\nkind = "real"\n', "sources.real.reference: required"),
        (
            '[splits.semdedup]\nrule = "all"\n',
            'splits.semdedup.rule: expected one of "kept", "any", got "all"',
        ),
        ("[splits.semdedup]\neps = 2.5\n", "splits.semdedup.eps: expected a number in (0, 2)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(text, fragment):
    msg = _error(text)
    assert msg.startswith("config.toml: ") and fragment in msg, msg


def test_syntax_error_names_the_file():
    assert _error("[splits\n", "mine.toml").startswith("mine.toml: not valid TOML")
    assert _error("splits: [1,\n", "mine.yaml").startswith("mine.yaml: not valid YAML")


def test_yaml_and_toml_give_the_same_config():
    toml = _parse("seed = 4\n[splits.near]\nsizes = [0.25, 0.5]\n[train]\nsplits = 'all'\n")
    yaml = _parse(
        "seed: 4\nsplits:\n  near:\n    sizes: [0.25, 0.5]\ntrain:\n  splits: all\n", "c.yaml"
    )
    assert config.to_json(toml) | {"path": ""} == config.to_json(yaml) | {"path": ""}
    assert toml.splits.near.sizes == (0.25, 0.5) and toml.train.splits == ("all",)


def test_override_is_checked_like_the_file():
    cfg = config.load("demo")
    small = config.override(cfg, {"sources.world.scale": 0.05, "train.recipe.epochs": 1})
    assert small.sources.world.scale == 0.05 and small.train.recipe.epochs == 1
    assert small.overrides == {"sources.world.scale": 0.05, "train.recipe.epochs": 1}
    with pytest.raises(ConfigError, match="engine.workers: expected an integer >= 1, got 0"):
        config.override(cfg, {"engine.workers": 0})
    with pytest.raises(ConfigError, match="--set splits.nope: unknown key"):
        config.override(cfg, {"splits.nope": 1})
    assert config.parse_setting("splits.near.sizes=[0.5]") == ("splits.near.sizes", [0.5])
    assert config.parse_setting("engine.name=ray") == ("engine.name", "ray")


def test_every_shipped_config_parses_and_plans(tmp_path):
    executor = Executor(LocalEngine(1))
    for name in config.SHIPPED:
        cfg = config.load(name)
        assert cfg.name == name and cfg.text == config.shipped_path(name).read_text()
        plan = make_plan(cfg, tmp_path / name, print, executor)
        assert plan.trained and all(
            f"evaluate-{s}" in [x.name for x in plan.stages] for s in plan.trained
        )
    with pytest.raises(FileNotFoundError, match="not a shipped config"):
        config.load("no-such-config")


def test_plan_names_unknown_splits_and_benchmarks(tmp_path):
    executor = Executor(LocalEngine(1))
    cfg = _parse('[train]\nsplits = ["full", "near-0.3"]\n')
    with pytest.raises(ConfigError, match=r'train.splits\[1\]: unknown split "near-0.3"'):
        make_plan(cfg, tmp_path, print, executor)
    cfg = _parse('[splits.far]\nsizes = [0.5]\nbenchmarks = ["photo", "imagenet"]\n')
    with pytest.raises(ConfigError, match=r'splits.far.benchmarks\[1\]: unknown benchmark "imag'):
        make_plan(cfg, tmp_path, print, executor)


# ----------------------------------------------------------------------------- the paper's grid


def test_paper_world_plans_the_papers_grid(tmp_path):
    cfg = config.load("paper-world")
    plan = make_plan(cfg, tmp_path, print, Executor(LocalEngine(1)))
    specs = {s.name: s for s in plan.splits}
    benchmarks = ["photo", "photo-v2", "sketch", "rendition", "hard", "pose"]
    for b in [*benchmarks, "combined", "coreset"]:
        assert specs[f"{b}-random"].control_of == b
    # Trained: what the paper's two claims need (combined vs its control; the far-pruned
    # coreset and its control against both baselines); near, random and the other far sizes
    # are made, not trained.
    for name in ("combined", "combined-random", "coreset", "coreset-random", "full-reference"):
        assert name in plan.trained
    assert specs["combined"].benchmarks == tuple(benchmarks)
    for policy in ("near", "far", "random"):
        for f in (0.25, 0.5, 0.75):
            spec = specs[f"{policy}-{f:g}"]
            assert spec.policy == policy and spec.params["fraction"] == f
            assert (spec.name in plan.trained) == (policy == "far" and f in (0.5, 0.75))
    assert specs["coreset"].policy == "coreset" and specs["coreset"].params == {"fraction": 0.5}
    assert "full" in plan.trained and "semdedup" in specs and "image-based" in specs
    # Every trained split sees the same samples (equal compute); the line keeps epochs.
    assert cfg.train.recipe.samples_seen == 200_000
    assert cfg.train.seeds == 4
    assert cfg.train.recipe.warmup_fraction == 0.08
    # The world's captions fit 17 tokens (tests/test_short_context.py): the same text function
    # as simgap-tiny's 32 at less cost.
    assert cfg.train.recipe.model == "simgap-tiny-ctx17"
    # Parameters in `simgap select`'s vocabulary, as split.json records them.
    assert specs["semdedup"].params == {"clusters": 10, "eps": 0.124, "rule": "kept"}
    assert specs["image-based"].params == {"clusters": 10}
    assert specs["random-0.25"].seed is not None and specs["near-0.25"].seed is None


def _keys(text: str, run: Path) -> dict[str, str]:
    plan = make_plan(_parse(text), run, print, Executor(LocalEngine(1)))
    return Runner(run / "none", plan.stages, print).keys


def test_changing_one_split_changes_only_its_stages(tmp_path):
    base = (
        "[splits.coreset]\nfraction = 0.5\n[splits.near]\nsizes = [0.25, 0.5]\n"
        "[train]\nsplits = 'all'\n"
    )
    before = _keys(base, tmp_path)
    after = _keys(base.replace("fraction = 0.5", "fraction = 0.4"), tmp_path)
    changed = {name for name in before if before[name] != after[name]}
    per_split = {"select", "materialize", "train", "evaluate"}
    expected = {f"{s}-{n}" for s in per_split for n in ("coreset", "coreset-random")}
    # The aggregates read every split: they rerun too, and they are cheap.
    assert changed == expected | {
        "gaps",
        "analysis-composition",
        "analysis-robustness",
        "analysis-statistics",
        "analysis-similarity",
    }
    # Keys are stable: the same text plans the same keys.
    assert before == _keys(base, tmp_path)


def test_semdedup_rule_is_configured_and_reruns_only_its_split(tmp_path):
    base = "[splits.semdedup]\nn_clusters = 4\n[train]\nsplits = ['full', 'semdedup']\n"
    changed = base.replace("n_clusters = 4", 'n_clusters = 4\nrule = "any"')
    spec = {
        s.name: s
        for s in make_plan(_parse(changed), tmp_path, print, Executor(LocalEngine(1))).splits
    }
    assert spec["semdedup"].params["rule"] == "any"
    before, after = _keys(base, tmp_path), _keys(changed, tmp_path)
    ran = {name for name in before if before[name] != after[name]}
    per_split = {f"{s}-semdedup" for s in ("select", "materialize", "train", "evaluate")}
    per_split |= {"select-semdedup-random"}
    assert ran == per_split | {
        "gaps",
        "analysis-composition",
        "analysis-robustness",
        "analysis-statistics",
        "analysis-similarity",
    }


# ----------------------------------------------------------------------------- dry runs


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process (its imports are already paid for)."""
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_paper_laion_dry_run_prints_the_plan_and_the_missing_paths(tmp_path, capsys):
    (tmp_path / "imagenet-train").mkdir()
    run_dir = tmp_path / "run"
    rc, out, err = cli(
        capsys, "run", "paper-laion", "--dry-run", "--run-dir", str(run_dir),
        "--set", f'sources.real.reference="{tmp_path / "imagenet-train"}"',
    )  # fmt: skip
    assert rc == 0, err
    assert "plan of paper-laion" in out and "to run" in out
    assert "engine: ray" in out and "8 x cuda" in out and "ViT-B-32 32 epochs" in out
    assert "global batch 33600" in out
    for stage in (
        "similarity-model",
        "embed-pool",
        "scan",
        "select-combined",
        "train-combined",
        "evaluate-imagenet-sketch-random",
        "train-far-0.5",
    ):
        assert f"  {stage} " in out, stage
    assert "missing: sources.real.pool = /data/" in out
    assert "missing: sources.real.reference" not in out  # given, and it exists
    assert not run_dir.exists()  # a dry run writes nothing
    # A shard pattern is checked by its folder, not shard by shard.
    (tmp_path / "laion").mkdir()
    pattern = f'sources.real.pool="{tmp_path / "laion"}/{{00000..41407}}.tar"'
    rc, out, _ = cli(capsys, "run", "paper-laion", "--dry-run", "--set", pattern)
    assert rc == 0 and "missing: sources.real.pool" not in out
    assert "missing: sources.real.benchmarks.objectnet = /data/" in out
    # The real run refuses to start on missing paths, naming them, in one line.
    rc, out, err = cli(capsys, "run", "paper-laion", "--run-dir", str(run_dir))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("simgap: error: ") and "sources.real.pool = /data/" in err
    assert not run_dir.exists()


def test_run_with_a_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[splits.near]\nsizes = [0.25, "x"]\n')
    rc, _, err = cli(capsys, "run", str(bad), "--dry-run")
    assert rc == 2
    assert err.strip() == (
        f'simgap: error: {bad}: splits.near.sizes[1]: expected a number in (0, 1], got "x"'
    )


def test_demo_dry_run_shows_what_is_cached(tmp_path, capsys):
    rc, out, _ = cli(capsys, "demo", str(tmp_path / "d"), "--scale", "0.05", "--dry-run")
    assert rc == 0 and "0 cached" in out and "  run     train-coreset " in out


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-m", "simgap.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    ckpt = root / "similarity.pt"
    torch.manual_seed(0)
    loaded = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    torch.save({"state_dict": loaded.model.state_dict()}, ckpt)
    path = root / "tiny.toml"
    path.write_text(TINY.replace("{checkpoint}", str(ckpt)))
    return path


@pytest.fixture(scope="module")
def reference_run(tiny) -> Path:
    run = tiny.parent / "uninterrupted"
    proc = run_cli("run", str(tiny), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _kill_when(args: list[str], marker: Path, delay: float = 0.0) -> None:
    """Start `simgap run`, SIGKILL its whole process group ``delay`` s after ``marker`` exists (a
    stage record ``stages/<stage>.json``, written when the stage is done, or the runner's
    ``stages/<stage>.started``, written as it starts: the console prints one line per stage on
    stdout and files the stages' messages under ``<run>/logs``)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simgap.cli", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"{marker} never written:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its training subprocesses
        proc.wait()


STAGE_LINE = re.compile(r"^\[\s*\d+/\d+\] (\S+)\s+(cached|[\d.]+s)\b")


def _statuses(stdout: str) -> dict[str, str]:
    """The console's stage lines (``[ 3/39] scan   cached``) → {stage: "cached" | "ran"}."""
    return {
        m.group(1): "cached" if m.group(2) == "cached" else "ran"
        for m in map(STAGE_LINE.match, stdout.splitlines())
        if m
    }


def _results(run: Path) -> dict:
    evals = {
        p.stem: json.loads(p.read_text())["benchmarks"]
        for p in sorted((run / "eval").glob("*.json"))
    }
    splits = {
        p.parent.name: pq.read_table(p).column("key").to_pylist()
        for p in sorted((run / "splits").glob("*/keys.parquet"))
    }
    return {"eval": evals, "splits": splits}


# Three tiny runs end to end (minutes on 2 cores): the extended suite. The default suite covers
# the plan's keys above and a rerun + a resized split in tests/test_demo.py.
@pytest.mark.extended
def test_a_killed_run_resumes_to_the_same_results(tiny, reference_run):
    run = tiny.parent / "killed"
    args = ["run", str(tiny), "--run-dir", str(run)]
    _kill_when(args, run / "stages" / "select-combined.json")
    assert (run / "stages" / "scan.json").is_file() and not (run / "eval").exists()
    # Inside a training subprocess: the runner marks a stage started before it runs it.
    trains = sorted((run / "stages").glob("train-*.started"))
    assert not trains, trains
    _kill_when(args, run / "stages" / "train-combined.started", delay=3.0)
    assert not (run / "stages" / "train-combined.json").exists()
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = _statuses(proc.stdout)
    assert status["scan"] == status["select-combined"] == "cached", proc.stdout
    assert status["train-combined"] == "ran", proc.stdout
    expected = _results(reference_run)
    assert expected["eval"].keys() == {"combined", "near-0.5"}
    assert _results(run) == expected
    assert json.loads((run / "run.json").read_text())["config_text"] == tiny.read_text()


@pytest.mark.extended
def test_ray_engine_makes_the_same_splits(tiny, reference_run):
    run = tiny.parent / "ray"
    proc = run_cli("run", str(tiny), "--run-dir", str(run), "--engine", "ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["config"]["engine"]["name"] == "ray"
    # The same bytes as the local run, as tests/test_embed.py asserts for embed alone: every
    # embed forward runs with one intra-op thread on batches padded to the batch size, so a
    # store's bytes do not depend on the process (Ray worker or this one) that made them, and
    # every split made from equal stores is equal, the near ranking's ties included.
    assert _results(run)["splits"] == _results(reference_run)["splits"]
    for store in sorted((reference_run / "stores").iterdir()):
        arrays = sorted(p.relative_to(store) for p in store.rglob("*.npy"))
        assert arrays, store
        for rel in arrays:
            ours = (run / "stores" / store.name / rel).read_bytes()
            assert ours == (store / rel).read_bytes(), f"{store.name}/{rel}"
        # The keys tables name their sources by path, which is each run's own world folder.
        for table in sorted(store.glob("keys/*.parquet")):
            theirs = pq.read_table(table).drop_columns(["source"])
            ours = pq.read_table(run / "stores" / store.name / "keys" / table.name)
            assert ours.drop_columns(["source"]).equals(theirs), f"{store.name}/{table.name}"


@pytest.mark.extended
def test_rerun_hits_caches_and_a_resized_split_reruns_alone(tiny, reference_run):
    run = reference_run
    proc = run_cli("run", str(tiny), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = _statuses(proc.stdout)
    assert status and set(status.values()) == {"cached"}, proc.stdout  # everything cached
    resized = tiny.parent / "resized.toml"
    resized.write_text(tiny.read_text().replace("0.5", "0.4"))
    proc = run_cli("run", str(resized), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = _statuses(proc.stdout)
    ran = {stage for stage, how in status.items() if how == "ran"}
    per_split = {f"{s}-near-0.4" for s in ("select", "materialize", "train", "evaluate")}
    assert ran == per_split | {
        "gaps",
        "analysis-composition",
        "analysis-robustness",
        "analysis-statistics",
        "analysis-similarity",
    }
    assert status["train-combined"] == "cached", proc.stdout
    # The stage records say the same as the log, and the old split is gone from the outputs.
    record = json.loads((run / "stages" / "train-near-0.4.json").read_text())
    assert record["key"] and Path(record["result"]).is_file()
    assert (
        not (run / "splits" / "near-0.5").exists() and not (run / "eval" / "near-0.5.json").exists()
    )
    kept = pq.read_table(run / "splits" / "near-0.4" / "keys.parquet").num_rows
    full = pq.read_table(run / "splits" / "full" / "keys.parquet").num_rows
    assert kept == round(0.4 * full)
    assert "near-0.4" in pq.read_schema(run / "gaps" / "photo.parquet").names
