"""What an experiment is made of: where its data lives (`Data`) and how each split is made
(`SplitSpec`), derived from the config alone before anything runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simgap.data.tars import expand_shards
from simgap.experiment.config import Config, ConfigError
from simgap.io import read_json
from simgap.layout import RunLayout
from simgap.select.policies import split_seed
from simgap.store import Store, open_store
from simgap.train import Recipe
from simgap.world import BENCHMARKS

Results = dict[str, Any]


# ----------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Data:
    """Where the experiment's inputs are, world or real, once the world exists."""

    reference: str
    pool: str  # shards
    pool_store: str  # an existing pool store ("" = embed the pool)
    benchmarks: dict[str, str]
    templates: str  # "" = open_clip's OpenAI ImageNet templates


def data_of(cfg: Config, run: Path) -> Data:
    if cfg.sources.kind == "world":
        world = RunLayout(run).world
        return Data(
            reference=str(world / "reference"),
            pool=str(world / "pool"),
            pool_store="",
            benchmarks={b: str(world / "benchmarks" / b) for b in BENCHMARKS},
            templates=str(world / "templates.txt"),
        )
    real = cfg.sources.real
    return Data(
        real.reference, real.pool, real.pool_embeddings, dict(real.benchmarks), real.templates
    )


def reference_points_path(cfg: Config) -> Path:
    """analysis.reference_points; a relative path is relative to the config file's folder."""
    path = Path(cfg.analysis.reference_points)
    if not path.is_absolute() and cfg.path and Path(cfg.path).is_file():
        return Path(cfg.path).parent / path
    return path


def missing_paths(cfg: Config) -> list[str]:
    """The real sources' paths that do not exist, as ``key = path`` (the world has none)."""
    if cfg.sources.kind != "real":
        return []
    real = cfg.sources.real
    paths = {
        "sources.real.reference": real.reference,
        "sources.real.pool": real.pool,
        "sources.real.pool_embeddings": real.pool_embeddings,
        "sources.real.templates": real.templates,
        "similarity.checkpoint": cfg.similarity.checkpoint,
    }
    paths |= {f"sources.real.benchmarks.{b}": p for b, p in real.benchmarks.items()}
    return [f"{key} = {path}" for key, path in paths.items() if path and not _exists(path)]


def _exists(path: str) -> bool:
    """A file or folder, or for a shard pattern (``{00000..41407}`` or ``::`` list) the folders
    its shards live in: listing 41,408 LAION shards one by one is for the stage that reads them."""
    if "{" in path or "::" in path:
        return all(Path(p.split("{")[0] + "_").parent.is_dir() for p in path.split("::"))
    return Path(path).exists()


def benchmarks_of(cfg: Config) -> list[str]:
    if cfg.sources.kind == "world":
        return list(BENCHMARKS)
    return list(cfg.sources.real.benchmarks)


def templates_of(data: Data) -> list[str]:
    if data.templates:
        return [t for t in Path(data.templates).read_text().splitlines() if t.strip()]
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    # open_clip's templates are callables; simgap's are "{c}" strings.
    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def pool_shards(data: Data) -> str:
    return "::".join(expand_shards(data.pool))


def pool_samples(data: Data, results: Results) -> int:
    if "world" in results:
        return int(results["world"]["counts"]["pool"])
    sizes = Path(data.pool) / "sizes.json"
    if not sizes.is_file():
        raise FileNotFoundError(f"{sizes}: needed to train on the pool (shard -> sample count)")
    return sum(read_json(sizes).values())


def run_store(run: Path, name: str, data: Data) -> Store:
    if name == "pool" and data.pool_store:
        # The config says the similarity model made these embeddings; a bare clip-retrieval
        # folder does not record a model, so it takes the one the reference store records.
        return open_store(
            data.pool_store, model=open_store(RunLayout(run).store("reference")).model
        )
    return open_store(RunLayout(run).store(name))


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSpec:
    """How one split is made: a policy of :mod:`simgap.select.build`, the benchmarks it is scored
    against, and its parameters as split.json records them (``fraction``; ``clusters``, ``eps``,
    ``rule``); whether the reference set is added to it (its family's setting, a control's that of
    the split it controls). A control's size is its split's, known once that split is made."""

    name: str
    policy: str  # full | gapmatch | near | far | random | coreset | semdedup | image-based
    benchmarks: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    control_of: str | None = None
    seed: int | None = None  # the seeded policies only (random, semdedup, image-based)
    reference: bool = False  # the reference set is added to the split's training data


def _seed(cfg: Config, name: str) -> int:
    return split_seed(cfg.seed, name)


def _fraction_name(policy: str, f: float, target: str = "") -> str:
    return f"{policy}-{target}-{f:g}" if target else f"{policy}-{f:g}"


def _sized_specs(cfg: Config, policy: str, benchmarks: list[str]) -> list[SplitSpec]:
    """near / far / random at each size: per target benchmark (``near-sketch-0.25``) and over the
    union of benchmarks (``near-0.25``)."""
    sized = getattr(cfg.splits, policy)
    if policy == "random" and sized.targets:
        raise ConfigError(
            f"{where(cfg)}: splits.random.targets: random splits are scored against no benchmark"
        )
    check_benchmarks(cfg, f"splits.{policy}.targets", sized.targets, benchmarks)
    scored = sized.benchmarks or tuple(benchmarks)
    check_benchmarks(cfg, f"splits.{policy}.benchmarks", scored, benchmarks)
    specs = []
    for f in dict.fromkeys(sized.sizes):
        if policy == "random":
            name = _fraction_name(policy, f)
            specs.append(SplitSpec(name, policy, (), {"fraction": f}, seed=_seed(cfg, name)))
            continue
        for target in dict.fromkeys(sized.targets):
            specs.append(
                SplitSpec(_fraction_name(policy, f, target), policy, (target,), {"fraction": f})
            )
        if sized.union:
            specs.append(SplitSpec(_fraction_name(policy, f), policy, scored, {"fraction": f}))
    return specs


def split_specs(cfg: Config, benchmarks: list[str]) -> list[SplitSpec]:
    sp = cfg.splits
    specs: list[SplitSpec] = []
    if sp.full:
        specs.append(SplitSpec("full", "full"))
    if sp.full_reference:
        specs.append(SplitSpec("full-reference", "full", reference=True))
    controlled: list[str] = []
    if sp.gapmatch.per_benchmark:
        specs += [SplitSpec(b, "gapmatch", (b,)) for b in benchmarks]
        controlled += benchmarks
    if sp.gapmatch.combined:
        specs.append(SplitSpec("combined", "gapmatch", tuple(benchmarks)))
        controlled.append("combined")
    if not sp.gapmatch.controls:
        controlled = []
    for policy in ("near", "far", "random"):
        specs += _sized_specs(cfg, policy, benchmarks)
    if sp.coreset.fraction > 0:
        specs.append(
            SplitSpec("coreset", "coreset", tuple(benchmarks), {"fraction": sp.coreset.fraction})
        )
        if sp.coreset.control:
            controlled.append("coreset")
    if sp.semdedup.n_clusters:
        sd = sp.semdedup
        params = {"clusters": sd.n_clusters, "eps": sd.eps, "rule": sd.rule}
        specs.append(SplitSpec("semdedup", "semdedup", (), params, seed=cfg.seed))
        if sd.control:
            controlled.append("semdedup")
    if sp.image_based.n_clusters:
        params = {"clusters": sp.image_based.n_clusters}
        specs.append(SplitSpec("image-based", "image-based", (), params, seed=cfg.seed))
        if sp.image_based.control:
            controlled.append("image-based")
    specs = [
        s if s.policy == "full" else dataclasses.replace(s, reference=_adds(cfg, s.policy))
        for s in specs
    ]
    policy_of = {s.name: s.policy for s in specs}
    for name in controlled:
        control = f"{name}-random"
        specs.append(
            SplitSpec(
                control,
                "random",
                (),
                control_of=name,
                seed=_seed(cfg, control),
                reference=_adds(cfg, policy_of[name]),
            )
        )
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where(cfg)}: splits: two splits are named {dupes}")
    return specs


def trained_splits(cfg: Config, names: list[str]) -> list[str]:
    """The splits that are trained (train.splits: "all", or names of this config's splits)."""
    if cfg.train.splits == ("all",):
        return names
    for i, s in enumerate(cfg.train.splits):
        if s not in names:
            raise ConfigError(
                f'{where(cfg)}: train.splits[{i}]: unknown split "{s}"; splits of this config: '
                + ", ".join(names)
            )
    return list(dict.fromkeys(cfg.train.splits))


def reference_line(cfg: Config) -> list[tuple[str, Recipe]]:
    """The reference-line models (name, recipe): one per budget (epochs) and seed, trained on
    the reference set alone (none when analysis.reference_epochs is empty, as on a real run,
    whose line is given: analysis.reference_points). The line's budget is epochs over the
    reference set, so a samples-seen budget of the trained splits does not apply to it."""
    a = cfg.analysis
    recipe = dataclasses.replace(cfg.train.recipe, samples_seen=None)
    return [
        (
            f"reference-e{epochs}-s{seed}",
            dataclasses.replace(recipe, epochs=epochs, seed=recipe.seed + seed),
        )
        for epochs in dict.fromkeys(a.reference_epochs)
        for seed in range(a.reference_seeds)
    ]


def _adds(cfg: Config, policy: str) -> bool:
    """Whether the splits of a family get the reference set (``reference.add_to``)."""
    return policy in cfg.reference.add_to


def where(cfg: Config) -> str:
    return Path(cfg.path).name or "config"


def check_benchmarks(cfg: Config, key: str, names: tuple[str, ...], known: list[str]) -> None:
    for i, b in enumerate(names):
        if b not in known:
            raise ConfigError(
                f'{where(cfg)}: {key}[{i}]: unknown benchmark "{b}"; benchmarks: {", ".join(known)}'
            )
