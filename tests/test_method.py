"""The paper's method where a review found simgap deviating (issue 14, section 5): the reference
set added per split family, both full baselines, near / far per target benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from simgap.data.tarwrite import write_tar
from simgap.experiment import config, make_plan
from simgap.experiment.config import ConfigError
from simgap.experiment.runner import Runner
from simgap.parallel import Executor, LocalEngine
from simgap.select.splitfile import write_split

GRID = """
[splits.near]
sizes = [0.5]
[splits.far]
sizes = [0.5]
[splits.random]
sizes = [0.5]
[splits.coreset]
fraction = 0.5
[train]
splits = "all"
"""


def _plan(text: str, run: Path):
    return make_plan(config.parse(text, "c.toml"), run, print, Executor(LocalEngine(1)))


def test_reference_is_added_per_family_with_the_papers_defaults(tmp_path):
    """The runner once added the reference set to every split (reference.add_to_splits). The
    paper adds ImageNet-train to the gap-matched splits only; near / far / random / coreset are
    subsets of the pool; and it has both baselines, the pool alone and the pool plus ImageNet."""
    plan = _plan(GRID, tmp_path)
    added = {s.name: s.reference for s in plan.splits}
    assert added["full"] is False and added["full-reference"] is True
    assert added["combined"] is added["combined-random"] is added["photo-random"] is True
    for name in ("near-0.5", "far-0.5", "random-0.5", "coreset", "coreset-random"):
        assert added[name] is False, name
    stages = {s.name: s for s in plan.stages}
    for name, reference in added.items():
        assert stages[f"select-{name}"].inputs["reference"] is reference
        assert stages[f"materialize-{name}"].inputs["reference"] is reference
    assert stages["materialize-full"].inputs != stages["materialize-full-reference"].inputs

    # Adding the reference to the near family reruns the near splits' stages only.
    before = Runner(tmp_path / "x", plan.stages, print).keys
    after = Runner(
        tmp_path / "x",
        _plan(GRID + '[reference]\nadd_to = ["gapmatch", "near"]\n', tmp_path).stages,
        print,
    ).keys
    changed = {n for n in before if before[n] != after[n]}
    per_split = {f"{s}-near-0.5" for s in ("select", "materialize", "train", "evaluate")}
    assert changed == per_split | {
        "gaps",
        "analysis-composition",
        "analysis-robustness",
        "analysis-statistics",
        "analysis-similarity",
    }


def test_the_old_add_to_splits_key_is_refused_with_how_to_migrate():
    with pytest.raises(
        ConfigError,
        match=r"c.toml: reference.add_to_splits: replaced by "
        r"reference.add_to.*\"gapmatch\".*full-reference",
    ):
        config.parse("[reference]\nadd_to_splits = true\n", "c.toml")
    with pytest.raises(ConfigError, match=r"reference.add_to\[0\]: expected one of"):
        config.parse('[reference]\nadd_to = ["full"]\n', "c.toml")


def _real_sources(root: Path) -> str:
    """A real-data layout: a reference image folder, two pool shards."""
    for c, name in enumerate(("cat", "dog")):
        (root / "ref" / name).mkdir(parents=True)
        for i in range(3):
            (root / "ref" / name / f"r{c}{i}.jpg").write_bytes(bytes([c, i]) * 40)
    for s in range(2):
        samples = [(f"p{s}{i}", {"jpg": bytes([s, i]) * 30, "txt": b"x"}) for i in range(4)]
        write_tar(root / "pool" / f"{s:05d}.tar", samples)
    (root / "bench").mkdir()
    return f"""
[sources]
kind = "real"
[sources.real]
reference = "{root / "ref"}"
pool = "{root / "pool"}"
pool_embeddings = "{root / "pool-store"}"
[sources.real.benchmarks]
b = "{root / "bench"}"
[similarity]
train_on_pool = false
pretrained = "x"
"""


def test_materialize_adds_the_reference_to_exactly_the_splits_whose_family_says_so(tmp_path):
    plan = _plan(_real_sources(tmp_path) + GRID, tmp_path / "run")
    keys = [f"p{s}{i}" for s in range(2) for i in range(4)]
    counts = {}
    for stage in plan.stages:
        if stage.name.startswith("materialize-"):
            split = stage.name.removeprefix("materialize-")
            write_split(tmp_path / "run" / "splits" / split, keys[:3], {"name": split})
            summary = stage.fn({})
            counts[split] = (summary["kept"], summary["reference"])
    assert counts["full-reference"] == counts["b"] == counts["combined-random"] == (3, 6)
    for split in ("full", "near-0.5", "far-0.5", "random-0.5", "coreset", "coreset-random"):
        assert counts[split] == (3, 0), split


def test_near_and_far_per_target_benchmark_and_over_the_union(tmp_path):
    """The paper prunes near / far against one benchmark at a time (Sketch, Val); the split name
    carries its target. The union over benchmarks (near-0.5) stays available."""
    text = GRID.replace(
        "[splits.near]\nsizes = [0.5]\n",
        '[splits.near]\nsizes = [0.5, 0.25]\ntargets = ["sketch", "photo"]\n',
    ).replace(
        "[splits.far]\nsizes = [0.5]\n",
        '[splits.far]\nsizes = [0.5]\ntargets = ["sketch"]\nunion = false\n',
    )
    specs = {s.name: s for s in _plan(text, tmp_path).splits}
    assert specs["near-sketch-0.5"].benchmarks == ("sketch",)
    assert specs["near-photo-0.25"].benchmarks == ("photo",)
    assert specs["near-sketch-0.25"].params == {"fraction": 0.25}
    assert specs["near-0.5"].benchmarks == specs["coreset"].benchmarks  # all six: the union
    assert len(specs["near-0.5"].benchmarks) == 6
    assert specs["far-sketch-0.5"].policy == "far" and "far-0.5" not in specs
    for bad, match in (
        (
            '[splits.near]\nsizes = [0.5]\ntargets = ["sktch"]\n',
            r'splits.near.targets\[0\]: unknown benchmark "sktch"',
        ),
        (
            '[splits.random]\nsizes = [0.5]\ntargets = ["sketch"]\n',
            r"splits.random.targets: random",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            _plan(bad, tmp_path)


def test_shipped_configs_name_the_papers_targets():
    for name, targets in (
        ("paper-world", ("sketch", "photo")),
        ("paper-laion", ("imagenet-sketch", "imagenet-val")),
    ):
        cfg = config.load(name)
        assert cfg.splits.near.targets == cfg.splits.far.targets == targets
        assert cfg.reference.add_to == ("gapmatch",) and cfg.splits.full_reference
