"""train.seeds and the reference line in the plan: raising the seed count keeps every trained
seed's stage key (so a rerun reuses them), seed 0 is the single-seed run's stage, and the
reference-line models come before the analyses that read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from simgap.experiment import config, make_plan
from simgap.experiment.runner import Runner
from simgap.experiment.steps import fit_batch, train_split
from simgap.parallel import Executor, LocalEngine
from simgap.train import Recipe, TrainError

BASE = config.override(
    config.load("demo"),
    {"train.splits": ["full", "combined", "combined-random"]},
)


def _keys(cfg: config.Config, run: Path) -> dict[str, str]:
    plan = make_plan(cfg, run, lambda m: None, Executor(LocalEngine(1)))
    return Runner(run, plan.stages, lambda m: None).keys


def test_raising_seeds_reuses_the_seeds_already_trained(tmp_path):
    one = _keys(config.override(BASE, {"train.seeds": 1}), tmp_path)
    three = _keys(config.override(BASE, {"train.seeds": 3}), tmp_path)
    # Seed 0 is the stage a single-seed run has, under the same key.
    for split in ("full", "combined", "combined-random"):
        for stage in ("materialize", "train", "evaluate"):
            assert three[f"{stage}-{split}"] == one[f"{stage}-{split}"]
        assert f"train-{split}@s1" not in one
        seeds = {three[f"train-{split}"], three[f"train-{split}@s1"], three[f"train-{split}@s2"]}
        assert len(seeds) == 3  # each seed its own training
    five = _keys(config.override(BASE, {"train.seeds": 5}), tmp_path)
    assert {k: v for k, v in five.items() if k.startswith("train-") and k in three} == {
        k: v for k, v in three.items() if k.startswith("train-")
    }
    # The analyses read every seed: they rerun when a seed is added.
    assert five["analysis-statistics"] != three["analysis-statistics"]


def test_reference_line_models_are_planned_before_the_robustness_analysis(tmp_path):
    cfg = config.override(
        BASE, {"analysis.reference_epochs": [1, 2, 4], "analysis.reference_seeds": 2}
    )
    plan = make_plan(cfg, tmp_path, lambda m: None, Executor(LocalEngine(1)))
    names = [s.name for s in plan.stages]
    line = [n for n in names if n.startswith("train-reference-")]
    assert line == [f"train-reference-e{e}-s{k}" for e in (1, 2, 4) for k in (0, 1)]
    robustness = next(s for s in plan.stages if s.name == "analysis-robustness")
    assert {f"evaluate-reference-e{e}-s{k}" for e in (1, 2, 4) for k in (0, 1)} <= set(
        robustness.after
    )
    assert names.index("materialize-reference-line") < min(names.index(n) for n in line)
    keys = Runner(tmp_path, plan.stages, lambda m: None).keys
    assert len({keys[n] for n in line}) == 6
    without = config.override(BASE, {"analysis.reference_epochs": []})
    none = make_plan(without, tmp_path, lambda m: None, Executor(LocalEngine(1)))
    assert not [s for s in none.stages if "reference-" in s.name]


def test_a_split_smaller_than_one_batch_is_refused_not_hung(tmp_path):
    recipe = Recipe(batch_size=64)
    with pytest.raises(TrainError, match="30 training samples, fewer than one global batch"):
        train_split(tmp_path, BASE, "tiny", recipe, {"samples": 30, "shards": "x"}, print)
    # The reference line cuts its batch to a small reference set, divisible over the ranks.
    assert fit_batch(recipe, 30, 1).batch_size == 30
    assert fit_batch(recipe, 30, 4).batch_size == 28
    assert fit_batch(recipe, 640, 1) is recipe


def test_a_reference_model_dropped_from_the_config_is_retired(tmp_path):
    """Its evaluation would otherwise still count as one of the line's models."""
    from simgap.experiment.run import _retire_reference_line

    cfg = config.override(BASE, {"analysis.reference_epochs": [1, 2]})
    plan = make_plan(cfg, tmp_path, lambda m: None, Executor(LocalEngine(1)))
    folder = tmp_path / "eval" / "reference-line"
    (folder / "predictions").mkdir(parents=True)
    for name in ("reference-e1-s0", "reference-e2-s0", "reference-e16-s0"):
        (folder / f"{name}.json").write_text("{}")
        for b in plan.benchmarks:
            (folder / "predictions" / f"{name}-{b}.parquet").write_text("")
    logs: list[str] = []
    _retire_reference_line(tmp_path, plan, logs.append)
    assert sorted(p.stem for p in folder.glob("*.json")) == ["reference-e1-s0", "reference-e2-s0"]
    left = {p.stem for p in (folder / "predictions").iterdir()}
    assert left == {f"reference-e{e}-s0-{b}" for e in (1, 2) for b in plan.benchmarks}
    assert logs == ["[retire] reference-line model reference-e16-s0: not in this config"]


def test_reference_line_budget_is_epochs_even_with_a_samples_seen_budget():
    # The trained splits may share a samples-seen budget; the line's models vary their budget
    # by epochs over the reference set, so they must not inherit it (each would train the
    # splits' whole budget and the line would have one budget, not five).
    from simgap.experiment.specs import reference_line

    cfg = config.override(
        BASE, {"analysis.reference_epochs": [1, 4], "train.recipe.samples_seen": 50_000}
    )
    line = dict(reference_line(cfg))
    assert [r.epochs for r in line.values()] == [1, 4]
    assert all(r.samples_seen is None for r in line.values())
    assert cfg.train.recipe.samples_seen == 50_000
