"""What an experiment is made of: where its data lives (`Data`) and how each split is made
(`SplitSpec`), derived from the config alone before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simgap.config import Config, ConfigError
from simgap.data.tars import expand_shards
from simgap.io import read_json
from simgap.select.policies import split_seed
from simgap.store import Store, open_store
from simgap.world import BENCHMARKS

Log = Callable[[str], None]
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
        world = run / "world"
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
        return open_store(data.pool_store, model=open_store(run / "stores" / "reference").model)
    return open_store(run / "stores" / name)


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSpec:
    """How one split is made: a policy of :mod:`simgap.select.build`, the benchmarks it is scored
    against, and its parameters as split.json records them (``fraction``; ``clusters``, ``eps``,
    ``rule``). A control's size is its split's, known once that split is made."""

    name: str
    policy: str  # full | gapmatch | near | far | random | coreset | semdedup | image-based
    benchmarks: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    control_of: str | None = None
    seed: int | None = None  # the seeded policies only (random, semdedup, image-based)


def _seed(cfg: Config, name: str) -> int:
    return split_seed(cfg.seed, name)


def _fraction_name(policy: str, f: float) -> str:
    return f"{policy}-{f:g}"


def split_specs(cfg: Config, benchmarks: list[str]) -> list[SplitSpec]:
    sp = cfg.splits
    specs: list[SplitSpec] = []
    if sp.full:
        specs.append(SplitSpec("full", "full"))
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
        sized = getattr(sp, policy)
        scored = sized.benchmarks or tuple(benchmarks)
        check_benchmarks(cfg, f"splits.{policy}.benchmarks", scored, benchmarks)
        for f in dict.fromkeys(sized.sizes):
            name = _fraction_name(policy, f)
            if policy == "random":
                specs.append(SplitSpec(name, policy, (), {"fraction": f}, seed=_seed(cfg, name)))
            else:
                specs.append(SplitSpec(name, policy, scored, {"fraction": f}))
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
    for name in controlled:
        control = f"{name}-random"
        specs.append(SplitSpec(control, "random", (), control_of=name, seed=_seed(cfg, control)))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where(cfg)}: splits: two splits are named {dupes}")
    return specs


def where(cfg: Config) -> str:
    return Path(cfg.path).name or "config"


def check_benchmarks(cfg: Config, key: str, names: tuple[str, ...], known: list[str]) -> None:
    for i, b in enumerate(names):
        if b not in known:
            raise ConfigError(
                f'{where(cfg)}: {key}[{i}]: unknown benchmark "{b}"; benchmarks: {", ".join(known)}'
            )
