"""The stage graph: a config becomes stages, each keyed by the config part it reads and the
stages it reads from, so every key is known before anything runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgap.analysis import guarded, robustness_analysis, similarity_analysis
from simgap.config import Config, ConfigError
from simgap.experiment.specs import (
    Data,
    SplitSpec,
    benchmarks_of,
    check_benchmarks,
    data_of,
    pool_samples,
    pool_shards,
    split_specs,
    where,
)
from simgap.experiment.steps import (
    audit_step,
    composition_step,
    embed_source,
    evaluate_split,
    materialize_split,
    scan_benchmarks,
    select_split,
    split_gaps,
    train_split,
    write_gaps,
)
from simgap.parallel import Executor
from simgap.runner import Stage
from simgap.train import (
    Recipe,
    open_clip_argv,
    train,
)
from simgap.world import generate_world

Log = Callable[[str], None]
Results = dict[str, Any]


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    stages: list[Stage]
    benchmarks: list[str]
    splits: list[SplitSpec]
    trained: list[str]
    evaluated: list[str]


def trained_splits(cfg: Config, names: list[str]) -> list[str]:
    if cfg.train.splits == ("all",):
        return names
    for i, s in enumerate(cfg.train.splits):
        if s not in names:
            raise ConfigError(
                f'{where(cfg)}: train.splits[{i}]: unknown split "{s}"; splits of this config: '
                + ", ".join(names)
            )
    return list(dict.fromkeys(cfg.train.splits))


def recipe_key(recipe: Recipe) -> list[str]:
    """A recipe as what open_clip_train is told: a field added to Recipe with a default that
    changes nothing does not invalidate every cached training."""
    return open_clip_argv(recipe, "<data>", 1, Path("/<out>"), "<name>")


def _source_stages(
    cfg: Config, run: Path, data: Data, benchmarks: list[str], log: Log, executor: Executor
) -> list[Stage]:
    """The world (or nothing, for real sources), the similarity model, the embeddings, the scan."""
    stages: list[Stage] = []
    add = stages.append
    if cfg.sources.kind == "world":
        add(
            Stage(
                "world",
                cfg.section("sources")["world"],
                lambda r: generate_world(cfg.sources.world, run / "world", log),
            )
        )
    upstream = ("world",) if cfg.sources.kind == "world" else ()
    sim = cfg.similarity
    if sim.train_on_pool:
        add(
            Stage(
                "similarity-model",
                {"model": sim.model, "recipe": recipe_key(sim.recipe)},
                lambda r: {
                    "arch": sim.recipe.model,
                    "checkpoint": str(
                        train(
                            sim.recipe,
                            pool_shards(data),
                            pool_samples(data, r),
                            run / "models",
                            "similarity",
                            log,
                            threads=cfg.train.threads or None,
                        )
                    ),
                    "pretrained": None,
                },
                after=upstream,
                owns=("models/similarity",),
            )
        )
    else:
        spec = {
            "arch": sim.model,
            "checkpoint": sim.checkpoint or None,
            "pretrained": sim.pretrained or None,
        }
        add(Stage("similarity-model", spec, lambda r, spec=spec: spec, after=upstream))

    sources = {"reference": data.reference}
    if not data.pool_store:
        sources["pool"] = data.pool
    sources |= {f"bench-{b}": data.benchmarks[b] for b in benchmarks}
    for name, source in sources.items():
        add(
            Stage(
                f"embed-{name}",
                {
                    "source": portable(source, run),
                    "batch_size": sim.batch_size,
                    "device": sim.device,
                },
                lambda r, name=name, source=source: embed_source(
                    run, name, source, r, sim, executor, log
                ),
                after=("similarity-model",),
                owns=(f"stores/{name}",),
            )
        )
    embeds = tuple(f"embed-{n}" for n in sources)
    pool_input = {"pool_embeddings": data.pool_store}
    add(
        Stage(
            "scan",
            {"topk": cfg.scan.topk, "benchmarks": benchmarks, **pool_input},
            lambda r: scan_benchmarks(run, data, benchmarks, cfg.scan.topk, log),
            after=embeds,
            owns=("scans",),
        )
    )
    return stages


def _split_stages(
    cfg: Config, run: Path, data: Data, specs: list[SplitSpec], benchmarks: list[str], log: Log
) -> list[Stage]:
    """Per split its select and gap check, then the gap tables of every split."""
    stages: list[Stage] = []
    add = stages.append
    for spec in specs:
        inputs = dataclasses.asdict(spec)  # `reference`: whether the reference set is added
        after = ("scan",) + ((f"select-{spec.control_of}",) if spec.control_of else ())
        add(
            Stage(
                f"select-{spec.name}",
                inputs,
                lambda r, spec=spec: select_split(run, data, spec, spec.reference, r, log),
                after=after,
                owns=(f"splits/{spec.name}",),
            )
        )
    for spec in specs:
        add(
            Stage(
                f"gaps-{spec.name}",
                {},
                lambda r, spec=spec: split_gaps(run, data, spec, benchmarks, spec.reference),
                after=(f"select-{spec.name}",),
            )
        )
    names = [s.name for s in specs]
    add(
        Stage(
            "gaps",
            names,
            lambda r: write_gaps(run, data, benchmarks, names),
            after=tuple(f"gaps-{n}" for n in names),
        )
    )

    return stages


def _composition_stage(cfg: Config, run: Path, data: Data, specs: list[SplitSpec]) -> Stage:
    """What each split removed, against the world's ground truth (select.composition)."""
    names = [s.name for s in specs]
    return Stage(
        "analysis-composition",
        names,
        lambda r: composition_step(run, data, cfg, specs),
        after=tuple(f"select-{n}" for n in names),
    )


def _train_stages(
    cfg: Config,
    run: Path,
    data: Data,
    trained: list[str],
    evaluated: list[str],
    log: Log,
    executor: Executor,
    with_reference: set[str],
) -> list[Stage]:
    """Per trained split a chain: materialize (with the reference set for the splits in
    ``with_reference``), train, evaluate."""
    stages: list[Stage] = []
    add = stages.append
    recipe = recipe_key(cfg.train.recipe)
    for split in trained:
        ref = split in with_reference
        add(
            Stage(
                f"materialize-{split}",
                {"caption": cfg.reference.caption, "reference": ref, "seed": cfg.seed},
                lambda r, split=split, ref=ref: materialize_split(
                    run, data, cfg, split, executor, ref
                ),
                after=(f"select-{split}",),
                owns=(f"shards/{split}",),
                chain=split,
            )
        )
        add(
            Stage(
                f"train-{split}",
                {"recipe": recipe, "gpus": cfg.train.gpus, "device": cfg.train.device},
                lambda r, split=split: train_split(run, cfg, split, r[f"materialize-{split}"], log),
                after=(f"materialize-{split}",),
                owns=(f"train/{split}",),
                chain=split,
            )
        )
        add(
            Stage(
                f"evaluate-{split}",
                {"benchmarks": evaluated, "batch_size": cfg.evaluate.batch_size},
                lambda r, split=split: evaluate_split(
                    run, data, cfg, split, r[f"train-{split}"], evaluated
                ),
                after=(f"train-{split}",),
                chain=split,
            )
        )
    return stages


def _analysis_stages(
    cfg: Config,
    run: Path,
    data: Data,
    trained: list[str],
    evaluated: list[str],
    benchmarks: list[str],
    embeds: tuple[str, ...],
    log: Log,
) -> list[Stage]:
    """Effective robustness, accuracy vs NN similarity, the contamination audit."""
    stages: list[Stage] = []
    add = stages.append
    evals = tuple(f"evaluate-{s}" for s in trained)
    analysis = cfg.section("analysis")
    add(
        Stage(
            "analysis-robustness",
            {
                "id_benchmark": cfg.analysis.id_benchmark,
            },
            lambda r: guarded(
                "robustness", lambda: robustness_analysis(run, cfg, trained, evaluated), log
            ),
            after=evals,
        )
    )
    add(
        Stage(
            "analysis-similarity",
            {
                "bins": analysis["bins"],
            },
            lambda r: guarded(
                "accuracy by similarity",
                lambda: similarity_analysis(run, cfg, trained, evaluated),
                log,
            ),
            after=(*evals, "gaps"),
        )
    )
    if cfg.analysis.audit != "off":
        add(
            Stage(
                "audit",
                {
                    "method": cfg.analysis.audit,
                    "threshold": cfg.analysis.audit_threshold,
                },
                lambda r: audit_step(run, data, cfg, benchmarks, log),
                after=embeds,
                owns=("audit",),
            )
        )
    return stages


def make_plan(cfg: Config, run: Path, log: Log, executor: Executor) -> Plan:
    run = Path(run)
    data = data_of(cfg, run)
    benchmarks = benchmarks_of(cfg)
    evaluated = list(cfg.evaluate.benchmarks) or benchmarks
    check_benchmarks(cfg, "evaluate.benchmarks", tuple(evaluated), benchmarks)
    if cfg.analysis.id_benchmark and cfg.analysis.id_benchmark not in evaluated:
        raise ConfigError(
            f'{where(cfg)}: analysis.id_benchmark: "{cfg.analysis.id_benchmark}" is not an '
            f"evaluated benchmark ({', '.join(evaluated)})"
        )
    specs = split_specs(cfg, benchmarks)
    trained = trained_splits(cfg, [s.name for s in specs])
    sources = _source_stages(cfg, run, data, benchmarks, log, executor)
    embeds = tuple(s.name for s in sources if s.name.startswith("embed-"))
    stages = [
        *sources,
        *_split_stages(cfg, run, data, specs, benchmarks, log),
        _composition_stage(cfg, run, data, specs),
        *_train_stages(
            cfg,
            run,
            data,
            trained,
            evaluated,
            log,
            executor,
            {s.name for s in specs if s.reference},
        ),
        *_analysis_stages(cfg, run, data, trained, evaluated, benchmarks, embeds, log),
    ]
    return Plan(stages, benchmarks, specs, trained, evaluated)


def portable(source: str, run: Path) -> str:
    """Sources inside the run folder are keyed relative to it: a moved run stays cached."""
    try:
        return str(Path(source).relative_to(run))
    except ValueError:
        return source
