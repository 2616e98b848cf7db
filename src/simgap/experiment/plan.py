"""The stage graph: a config becomes stages, each keyed by the config part it reads and the
stages it reads from, so every key is known before anything runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgap.analysis import guarded
from simgap.experiment.config import Config, ConfigError
from simgap.experiment.engines import Executors, executors_of, kernel_config
from simgap.experiment.keys import points_identity, portable, recipe_key, sampling_inputs
from simgap.experiment.runner import Stage
from simgap.experiment.specs import (
    Data,
    SplitSpec,
    benchmarks_of,
    check_benchmarks,
    data_of,
    reference_line,
    split_specs,
    trained_splits,
    where,
)
from simgap.experiment.steps import (
    SharedTrainings,
    audit_step,
    check_splits,
    composition_step,
    embed_source,
    evaluate_split,
    fit_batch,
    materialize_reference,
    materialize_split,
    model_name,
    robustness_step,
    scan_grid,
    seed_recipe,
    select_split,
    separation_step,
    similarity_step,
    statistics_step,
    train_similarity_model,
    train_split,
)
from simgap.layout import RunLayout, bench_store_name
from simgap.models import device_key
from simgap.parallel import Executor
from simgap.train import Recipe
from simgap.types import Log
from simgap.world import generate_world

REL = RunLayout(Path())  # run-relative paths: the folders a stage owns
Results = dict[str, Any]


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    stages: list[Stage]
    benchmarks: list[str]
    splits: list[SplitSpec]
    trained: list[str]
    evaluated: list[str]
    reference_line: list[str] = dataclasses.field(default_factory=list)


def _source_stages(
    cfg: Config, run: Path, data: Data, benchmarks: list[str], log: Log, executors: Executors
) -> list[Stage]:
    """The world (or nothing, for real sources), the similarity model, the embeddings, the scan."""
    stages: list[Stage] = []
    if cfg.sources.kind == "world":
        stages.append(
            Stage(
                "world",
                cfg.section("sources")["world"],
                lambda r: generate_world(cfg.sources.world, RunLayout(run).world, log),
            )
        )
    upstream = ("world",) if cfg.sources.kind == "world" else ()
    stages.append(_similarity_stage(cfg, run, data, upstream, log))
    sources = embedded_sources(data, benchmarks)
    stages += [
        _embed_stage(cfg, run, name, source, executors.embed, log)
        for name, source in sources.items()
    ]
    embeds = tuple(f"embed-{n}" for n in sources)
    stages.append(_scan_stage(cfg, run, data, benchmarks, embeds, executors.scan, log))
    return stages


def _similarity_stage(
    cfg: Config, run: Path, data: Data, upstream: tuple[str, ...], log: Log
) -> Stage:
    """The similarity model: trained on the pool (keyed by its recipe), or the given one."""
    sim = cfg.similarity
    if not sim.train_on_pool:
        spec = {
            "arch": sim.model,
            "checkpoint": sim.checkpoint or None,
            "pretrained": sim.pretrained or None,
        }
        return Stage("similarity-model", spec, lambda r, spec=spec: spec, after=upstream)
    return Stage(
        "similarity-model",
        {
            "model": sim.model,
            "recipe": recipe_key(sim.recipe),
            "device": device_key(cfg.train.device),
        },
        lambda r: train_similarity_model(run, data, cfg, r, log),
        after=upstream,
        owns=(str(REL.similarity_model),),
    )


def embedded_sources(data: Data, benchmarks: list[str]) -> dict[str, str]:
    """Store name -> source of every set the run embeds: the reference set, the pool (unless its
    embeddings are given) and the benchmarks."""
    sources = {"reference": data.reference}
    if not data.pool_store:
        sources["pool"] = data.pool
    return sources | {bench_store_name(b): data.benchmarks[b] for b in benchmarks}


def _embed_stage(
    cfg: Config, run: Path, name: str, source: str, executor: Executor, log: Log
) -> Stage:
    sim = cfg.similarity
    return Stage(
        f"embed-{name}",
        {
            "source": portable(source, run),
            "batch_size": sim.batch_size,
            "device": device_key(sim.device),
        },
        lambda r: embed_source(run, name, source, r, sim, executor, log),
        after=("similarity-model",),
        owns=(str(REL.store(name)),),
    )


def _scan_stage(
    cfg: Config,
    run: Path,
    data: Data,
    benchmarks: list[str],
    embeds: tuple[str, ...],
    executor: Executor,
    log: Log,
) -> Stage:
    kernel = kernel_config(cfg)
    # Keyed without device, precision, tiles or engine: the scan is exact, they change no byte.
    return Stage(
        "scan",
        {"topk": cfg.scan.topk, "benchmarks": benchmarks, "pool_embeddings": data.pool_store},
        lambda r: scan_grid(run, data, benchmarks, cfg.scan.topk, kernel, executor, log),
        after=embeds,
        owns=(str(REL.scans),),
    )


def _split_stages(
    cfg: Config,
    run: Path,
    data: Data,
    specs: list[SplitSpec],
    benchmarks: list[str],
    log: Log,
    executors: Executors | None = None,
) -> list[Stage]:
    """Per split its select (from the scan, no pool pass); then one gaps stage: every split's
    gap check in one pass over the pool, and the gap tables."""
    executors = executors or executors_of(cfg)
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
                owns=(str(REL.split(spec.name)),),
            )
        )
    names = [s.name for s in specs]
    kernel = kernel_config(cfg)
    add(
        Stage(
            "gaps",
            {"splits": names, "reference": [s.name for s in specs if s.reference]},
            lambda r: check_splits(run, data, specs, benchmarks, kernel, executors.scan, log),
            after=("scan", *(f"select-{n}" for n in names)),
            owns=(str(REL.check_scan), str(REL.gaps_by_split)),
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
    """Per trained split its materialize stage, then per seed a chain: train, evaluate (seeds
    train side by side once the shards exist). Then the reference-line models: the reference
    set alone, one model per budget and seed."""
    stages: list[Stage] = []
    add = stages.append
    shared = SharedTrainings(run)
    for split in trained:
        ref = split in with_reference
        materialized = {"caption": cfg.reference.caption, "reference": ref, "seed": cfg.seed}
        add(
            Stage(
                f"materialize-{split}",
                materialized,
                lambda r, split=split, ref=ref: materialize_split(
                    run, data, cfg, split, executor, ref
                ),
                after=(f"select-{split}",),
                owns=(str(REL.shards(split)),),
                chain=split,
            )
        )
        for seed in range(cfg.train.seeds):
            name = model_name(split, seed)
            recipe = seed_recipe(cfg.train.recipe, seed)
            add(
                Stage(
                    f"train-{name}",
                    _train_inputs(cfg, recipe),
                    lambda r, split=split, name=name, recipe=recipe, m=materialized: shared.once(
                        {
                            "keys": r[f"select-{split}"]["keys_sha256"],
                            "materialize": m,
                            "recipe": recipe_key(recipe),
                            "device": [cfg.train.gpus, device_key(cfg.train.device)],
                        },
                        name,
                        lambda: train_split(run, cfg, name, recipe, r[f"materialize-{split}"], log),
                        log,
                    ),
                    after=(f"materialize-{split}",),
                    owns=(str(REL.train / name),),
                    chain=name,
                )
            )
            add(_evaluate_stage(cfg, run, data, name, evaluated, chain=name))
    if reference_line(cfg):
        stages = [*_reference_materialize(cfg, run, data, executor), *stages]
        stages += _reference_models(cfg, run, data, evaluated, log)
    return stages


def _train_inputs(cfg: Config, recipe: Recipe) -> dict[str, Any]:
    """A training's key: its recipe as open_clip_train is told it, and the devices it runs on."""
    return {
        "recipe": recipe_key(recipe),
        "gpus": cfg.train.gpus,
        "device": device_key(cfg.train.device),
    }


def _reference_materialize(cfg: Config, run: Path, data: Data, executor: Executor) -> list[Stage]:
    upstream = ("world",) if cfg.sources.kind == "world" else ()
    return [
        Stage(
            "materialize-reference-line",
            {"caption": cfg.reference.caption, "reference": portable(data.reference, run)},
            lambda r: materialize_reference(run, data, cfg, executor),
            after=upstream,
            owns=(str(REL.reference_line_shards), str(REL.reference_line)),
        )
    ]


def _reference_models(
    cfg: Config, run: Path, data: Data, evaluated: list[str], log: Log
) -> list[Stage]:
    """Each reference-line model is its own chain (train, evaluate), beside the splits'."""
    stages: list[Stage] = []
    out = RunLayout(run).reference_line_eval
    for name, recipe in reference_line(cfg):
        stages += [
            Stage(
                f"train-{name}",
                _train_inputs(cfg, recipe),
                lambda r, name=name, recipe=recipe: train_split(
                    run,
                    cfg,
                    name,
                    fit_batch(recipe, r["materialize-reference-line"]["samples"], cfg.train.gpus),
                    r["materialize-reference-line"],
                    log,
                ),
                after=("materialize-reference-line",),
                owns=(str(REL.train / name),),
                chain=name,
            ),
            _evaluate_stage(cfg, run, data, name, evaluated, chain=name, out=out),
        ]
    return stages


def _evaluate_stage(
    cfg: Config,
    run: Path,
    data: Data,
    name: str,
    evaluated: list[str],
    chain: str,
    out: Path | None = None,
) -> Stage:
    """Zero-shot evaluation of one trained model (a split's seed or a reference-line model)."""
    extra = () if out is None else (out,)
    return Stage(
        f"evaluate-{name}",
        {
            "benchmarks": evaluated,
            "batch_size": cfg.evaluate.batch_size,
            "device": device_key(cfg.evaluate.device),
        },
        lambda r: evaluate_split(run, data, cfg, name, r[f"train-{name}"], evaluated, *extra),
        after=(f"train-{name}",),
        chain=chain,
    )


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
    """Effective robustness, intervals, accuracy vs NN similarity, class separation."""
    evals = tuple(f"evaluate-{model_name(s, k)}" for s in trained for k in range(cfg.train.seeds))
    line = [name for name, _ in reference_line(cfg)]
    sampling = sampling_inputs(cfg)
    id_bench = cfg.analysis.id_benchmark or evaluated[0]

    def guard(what: str, fn: Callable[[], dict]) -> Callable[[Results], dict]:
        return lambda r: guarded(what, fn, log)

    stages = [
        Stage(
            "analysis-robustness",
            {**sampling, "reference_line": line, "reference_points": points_identity(cfg)},
            guard("robustness", lambda: robustness_step(run, cfg, trained, evaluated, line)),
            after=(*evals, *(f"evaluate-{n}" for n in line)),
        ),
        Stage(
            "analysis-statistics",
            sampling,
            guard("statistics", lambda: statistics_step(run, cfg, trained, evaluated)),
            after=(*evals, "analysis-robustness", *(f"select-{s}" for s in trained)),
        ),
        Stage(
            "analysis-similarity",
            {"bins": cfg.section("analysis")["bins"]},
            guard("accuracy by similarity", lambda: similarity_step(run, cfg, trained, evaluated)),
            after=(*evals, "gaps"),
        ),
        Stage(
            "analysis-separation",
            {"benchmark": id_bench, "k": cfg.scan.topk, "seed": cfg.seed},
            guard("class separation", lambda: separation_step(run, data, cfg, id_bench)),
            after=("embed-reference", f"embed-{bench_store_name(id_bench)}"),
        ),
    ]
    return stages


def _audit_stages(
    cfg: Config, run: Path, data: Data, benchmarks: list[str], embeds: tuple[str, ...], log: Log
) -> list[Stage]:
    """The contamination audit, as a chain of its own: planned after the trainings, it runs in
    the block beside the last ones (it reads only the sources) instead of after them."""
    if cfg.analysis.audit == "off":
        return []
    return [
        Stage(
            "audit",
            {"method": cfg.analysis.audit, "threshold": cfg.analysis.audit_threshold},
            lambda r: audit_step(run, data, cfg, benchmarks, log),
            after=embeds,
            owns=(str(REL.audit),),
            chain="audit",
        )
    ]


def make_plan(
    cfg: Config, run: Path, log: Log, executor: Executor | Executors | None = None
) -> Plan:
    """``executor``: one for every stage, or one per kind of work; None: the config's
    (``engines.executors_of``)."""
    run = Path(run)
    if executor is None:
        executors = executors_of(cfg)
    elif isinstance(executor, Executors):
        executors = executor
    else:
        executors = Executors.every(executor)
    try:
        kernel_config(cfg).resolved(measure=False)
    except ValueError as err:
        raise ConfigError(f"{where(cfg)}: scan: {err}") from None
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
    sources = _source_stages(cfg, run, data, benchmarks, log, executors)
    embeds = tuple(s.name for s in sources if s.name.startswith("embed-"))
    stages = [
        *sources,
        *_split_stages(cfg, run, data, specs, benchmarks, log, executors),
        _composition_stage(cfg, run, data, specs),
        *_train_stages(
            cfg,
            run,
            data,
            trained,
            evaluated,
            log,
            executors.io,
            {s.name for s in specs if s.reference},
        ),
        *_audit_stages(cfg, run, data, benchmarks, embeds, log),
        *_analysis_stages(cfg, run, data, trained, evaluated, benchmarks, embeds, log),
    ]
    line = [name for name, _ in reference_line(cfg)]
    return Plan(stages, benchmarks, specs, trained, evaluated, line)
