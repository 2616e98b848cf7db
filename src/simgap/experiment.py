"""The paper's experiment as cached stages: world → similarity model → embed → scan → select →
gaps → materialize → train → evaluate → analysis → report.

A config (:mod:`simgap.config`) becomes a *plan*: a list of stages, each with the part of the
config it reads and the stages it reads from. A stage's key hashes both, so every key is known
before anything runs (``--dry-run`` shows the plan and what is cached). A stage's result is cached
in ``stages/<name>.json`` under its key; a rerun skips stages whose key is unchanged, so a killed
run resumes and a changed knob redoes only what depends on it: every split has its own select,
gap check, materialize, train and evaluate stages.
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap import __version__
from simgap.analysis import audit_analysis, guarded, robustness_analysis, similarity_analysis
from simgap.config import Config, ConfigError, to_json
from simgap.data.tars import expand_shards
from simgap.evaluate import evaluate_benchmark
from simgap.io import read_json, write_json, write_npy, write_parquet
from simgap.lock import locks_output
from simgap.models import ModelSpec, load_model
from simgap.parallel import Executor, LocalEngine, ThreadEngine, make_engine
from simgap.runner import Runner, Stage, execute
from simgap.scan import load_scan, scan_store
from simgap.select.build import (
    SelectConfig,
    guarantee,
    nearest,
    record_guarantee,
    select,
    split_nn,
    split_rows,
)
from simgap.splits import materialize
from simgap.store import Store, check_compatible, open_store
from simgap.train import (
    Recipe,
    TrainError,
    final_checkpoint,
    open_clip_argv,
    torchrun_command,
    train,
)
from simgap.world import BENCHMARKS, generate_world

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


def _templates(data: Data) -> list[str]:
    if data.templates:
        return [t for t in Path(data.templates).read_text().splitlines() if t.strip()]
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    # open_clip's templates are callables; simgap's are "{c}" strings.
    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def _pool_shards(data: Data) -> str:
    return "::".join(expand_shards(data.pool))


def _pool_samples(data: Data, results: Results) -> int:
    if "world" in results:
        return int(results["world"]["counts"]["pool"])
    sizes = Path(data.pool) / "sizes.json"
    if not sizes.is_file():
        raise FileNotFoundError(f"{sizes}: needed to train on the pool (shard -> sample count)")
    return sum(read_json(sizes).values())


def _store(run: Path, name: str, data: Data) -> Store:
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
    # From the split's own name, not its position: adding a split changes no other split.
    return (cfg.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


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
        _check_benchmarks(cfg, f"splits.{policy}.benchmarks", scored, benchmarks)
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
        raise ConfigError(f"{_where(cfg)}: splits: two splits are named {dupes}")
    return specs


def _where(cfg: Config) -> str:
    return Path(cfg.path).name or "config"


def _check_benchmarks(cfg: Config, key: str, names: tuple[str, ...], known: list[str]) -> None:
    for i, b in enumerate(names):
        if b not in known:
            raise ConfigError(
                f'{_where(cfg)}: {key}[{i}]: unknown benchmark "{b}"; '
                f"benchmarks: {', '.join(known)}"
            )


def select_config(
    run: Path, data: Data, spec: SplitSpec, reference_added: bool, results: Results
) -> SelectConfig:
    """The split as ``simgap select`` makes it, from the run's stores and scans."""
    benches = spec.benchmarks
    gapmatch = spec.policy == "gapmatch"
    size = results[f"select-{spec.control_of}"]["size"] if spec.control_of else None
    p = spec.params
    return SelectConfig(
        policy=spec.policy,
        pool=Path(data.pool_store) if data.pool_store else run / "stores" / "pool",
        out=run / "splits" / spec.name,
        benchmarks=tuple(run / "stores" / f"bench-{b}" for b in benches),
        scans=tuple(run / "scans" / f"pool-{b}" for b in benches),
        reference=(
            run / "stores" / "reference" if spec.policy in ("gapmatch", "image-based") else None
        ),
        reference_scans=tuple(run / "scans" / f"reference-{b}" for b in benches if gapmatch),
        size=p.get("fraction", size),
        seed=spec.seed or 0,
        add_reference=reference_added,
        check=False,  # the gaps stage checks the guarantee, on the rescan it makes anyway
        control_of=spec.control_of,
        **{k: p[k] for k in ("clusters", "eps", "rule") if k in p},
    )


def select_split(
    run: Path, data: Data, spec: SplitSpec, reference_added: bool, results: Results, log: Log
) -> dict[str, Any]:
    """Make one split with ``simgap select``'s code: ``splits/<name>/`` (keys, split.json)."""
    cfg = select_config(run, data, spec, reference_added, results)
    meta = select(cfg, log, pool=_store(run, "pool", data))
    return {"size": meta["size"], "keys_sha256": meta["keys_sha256"]}


# ----------------------------------------------------------------------------- scan and gaps


def scan_benchmarks(run: Path, data: Data, benchmarks: list[str], topk: int, log: Log) -> dict:
    """Per benchmark: thresholds (NN similarity to the reference set), then the pool scanned
    against them (per-row max and margin, per-test pool NN)."""
    reference, pool = _store(run, "reference", data), _store(run, "pool", data)
    removed = {}
    for bench in benchmarks:
        tests_store = _store(run, f"bench-{bench}", data)
        tests = tests_store.embeddings()
        check_compatible(reference, pool, tests_store)
        ref = scan_store(reference, tests, topk=topk, out_dir=run / "scans" / f"reference-{bench}")
        thresholds = ref.topk_sim[:, 0].copy()
        res = scan_store(
            pool, tests, thresholds=thresholds, topk=topk, out_dir=run / "scans" / f"pool-{bench}"
        )
        removed[bench] = int((res.row_margin > 0).sum())
        log(f"scan {bench}: {len(tests)} tests, {removed[bench]} pool rows above threshold")
    return {"removed": removed}


def split_gaps(
    run: Path, data: Data, spec: SplitSpec, benchmarks: list[str], reference_added: bool
) -> dict[str, Any]:
    """Rescan the split against every benchmark: its NN similarity per test point (the gap
    figure), and for a gap-matched split the guarantee, checked rather than assumed (with
    ``simgap select``'s check, on the same rescan)."""
    pool = _store(run, "pool", data)
    folder = run / "splits" / spec.name
    rows = split_rows(pool, folder)
    tests, nn = {}, {}
    for bench in benchmarks:
        tests[bench] = _store(run, f"bench-{bench}", data).embeddings()
        nn[bench] = split_nn(pool, rows, tests[bench])
        write_npy(run / "gaps" / "by-split" / spec.name / f"{bench}.npy", nn[bench])
    if spec.policy != "gapmatch":
        return {}
    checked = spec.benchmarks
    reference_nn = None
    if reference_added:
        reference = _store(run, "reference", data)
        reference_nn = [nearest(reference, tests[b]) for b in checked]
    check = guarantee(
        [nn[b] for b in checked], [_nn(run, "reference", b) for b in checked], reference_nn
    )
    return record_guarantee(folder, check)["guarantee"]


def write_gaps(run: Path, data: Data, benchmarks: list[str], splits: list[str]) -> dict:
    """``gaps/<benchmark>.parquet``: per test point its NN similarity to the reference set, the
    pool and every split (the pool part; with the reference added, the split's NN similarity is
    the max of this and the reference column)."""
    for bench in benchmarks:
        table = _store(run, f"bench-{bench}", data).keys_table()
        columns = {
            "test_key": table.column("key"),
            "label": table.column("label"),
            "reference": pa.array(_nn(run, "reference", bench), pa.float32()),
            "pool": pa.array(_nn(run, "pool", bench), pa.float32()),
        }
        for name in splits:
            columns[name] = pa.array(
                np.load(run / "gaps" / "by-split" / name / f"{bench}.npy"), pa.float32()
            )
        write_parquet(run / "gaps" / f"{bench}.parquet", pa.table(columns))
    return {"benchmarks": benchmarks, "splits": splits}


def _nn(run: Path, scanned: str, bench: str) -> np.ndarray:
    return load_scan(run / "scans" / f"{scanned}-{bench}", rows=False).topk_sim[:, 0]


# ----------------------------------------------------------------------------- train, evaluate


def materialize_split(run: Path, data: Data, cfg: Config, split: str, executor: Executor) -> dict:
    # IO-bound: a local run copies on threads (no process start-up, fsyncs overlap copies).
    if isinstance(executor.engine, LocalEngine):
        executor = Executor(ThreadEngine(max(4, executor.engine.workers)), executor.retries)
    return materialize(
        run / "splits" / split,
        _pool_shards(data),
        run / "shards" / split,
        reference=Path(data.reference) if cfg.reference.add_to_splits else None,
        caption_template=cfg.reference.caption,
        executor=executor,
    )


def train_split(run: Path, cfg: Config, split: str, shards: dict, log: Log) -> str:
    recipe = cfg.train.recipe
    if cfg.train.gpus > 1:
        return _torchrun(run, cfg, split, shards, log)
    ckpt = train(
        recipe,
        shards["shards"],
        shards["samples"],
        run / "train",
        split,
        lambda m: log(f"[{split}] {m}"),
        device=cfg.train.device,
        threads=cfg.train.threads or None,
    )
    return str(ckpt)


def _torchrun(run: Path, cfg: Config, split: str, shards: dict, log: Log) -> str:
    """One node, ``train.gpus`` ranks; the global batch is kept (simgap.train.torchrun_command)."""
    recipe = cfg.train.recipe
    cmd = torchrun_command(
        recipe, shards["shards"], shards["samples"], run / "train", split, cfg.train.gpus
    )
    log(f"[{split}] $ {cmd}")
    rc = subprocess.run(shlex.split(cmd), check=False).returncode
    final = final_checkpoint(run / "train", split, recipe)
    if rc != 0 or not final.is_file():
        raise TrainError(
            f"torchrun for split {split} exited with {rc}; see {run / 'train' / split}"
        )
    return str(final)


def evaluate_split(
    run: Path, data: Data, cfg: Config, split: str, ckpt: str, benchmarks: list[str]
) -> dict:
    loaded = load_model(
        ModelSpec(arch=cfg.train.recipe.model, checkpoint=ckpt), device=cfg.evaluate.device
    )
    templates = _templates(data)
    out: dict[str, Any] = {"split": split, "checkpoint": ckpt, "benchmarks": {}}
    for bench in benchmarks:
        res = evaluate_benchmark(
            loaded, Path(data.benchmarks[bench]), templates, cfg.evaluate.batch_size
        )
        preds = res.pop("predictions")
        write_parquet(
            run / "eval" / "predictions" / f"{split}-{bench}.parquet",
            pa.table(
                {
                    "key": [p[0] for p in preds],
                    "label": [int(p[1]) for p in preds],
                    "pred": [int(p[2]) for p in preds],
                }
            ),
        )
        out["benchmarks"][bench] = res
    write_json(run / "eval" / f"{split}.json", out)
    return {b: r["top1"] for b, r in out["benchmarks"].items()}


# ----------------------------------------------------------------------------- analysis


def _audit(run: Path, data: Data, cfg: Config, benchmarks: list[str], log: Log) -> dict:
    tests = {b: _store(run, f"bench-{b}", data) for b in benchmarks}
    truth_path = run / "world" / "ground_truth" / "near_duplicates.parquet"
    truth = pq.read_table(truth_path) if cfg.sources.kind == "world" else None
    return audit_analysis(tests, _store(run, "pool", data), cfg, truth, run / "audit", log)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    stages: list[Stage]
    benchmarks: list[str]
    splits: list[SplitSpec]
    trained: list[str]
    evaluated: list[str]


def _trained(cfg: Config, names: list[str]) -> list[str]:
    if cfg.train.splits == ("all",):
        return names
    for i, s in enumerate(cfg.train.splits):
        if s not in names:
            raise ConfigError(
                f'{_where(cfg)}: train.splits[{i}]: unknown split "{s}"; splits of this config: '
                + ", ".join(names)
            )
    return list(dict.fromkeys(cfg.train.splits))


def _recipe_key(recipe: Recipe) -> list[str]:
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
                {"model": sim.model, "recipe": _recipe_key(sim.recipe)},
                lambda r: {
                    "arch": sim.recipe.model,
                    "checkpoint": str(
                        train(
                            sim.recipe,
                            _pool_shards(data),
                            _pool_samples(data, r),
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
                    "source": _portable(source, run),
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
    added = cfg.reference.add_to_splits
    for spec in specs:
        inputs = {**dataclasses.asdict(spec), "reference_added": added}
        after = ("scan",) + ((f"select-{spec.control_of}",) if spec.control_of else ())
        add(
            Stage(
                f"select-{spec.name}",
                inputs,
                lambda r, spec=spec: select_split(run, data, spec, added, r, log),
                after=after,
                owns=(f"splits/{spec.name}",),
            )
        )
    for spec in specs:
        add(
            Stage(
                f"gaps-{spec.name}",
                {},
                lambda r, spec=spec: split_gaps(run, data, spec, benchmarks, added),
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


def _train_stages(
    cfg: Config,
    run: Path,
    data: Data,
    trained: list[str],
    evaluated: list[str],
    log: Log,
    executor: Executor,
) -> list[Stage]:
    """Per trained split a chain: materialize, train, evaluate."""
    stages: list[Stage] = []
    add = stages.append
    recipe = _recipe_key(cfg.train.recipe)
    for split in trained:
        add(
            Stage(
                f"materialize-{split}",
                {"caption": cfg.reference.caption, "reference": cfg.reference.add_to_splits},
                lambda r, split=split: materialize_split(run, data, cfg, split, executor),
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
                lambda r: _audit(run, data, cfg, benchmarks, log),
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
    _check_benchmarks(cfg, "evaluate.benchmarks", tuple(evaluated), benchmarks)
    if cfg.analysis.id_benchmark and cfg.analysis.id_benchmark not in evaluated:
        raise ConfigError(
            f'{_where(cfg)}: analysis.id_benchmark: "{cfg.analysis.id_benchmark}" is not an '
            f"evaluated benchmark ({', '.join(evaluated)})"
        )
    specs = split_specs(cfg, benchmarks)
    trained = _trained(cfg, [s.name for s in specs])
    sources = _source_stages(cfg, run, data, benchmarks, log, executor)
    embeds = tuple(s.name for s in sources if s.name.startswith("embed-"))
    stages = [
        *sources,
        *_split_stages(cfg, run, data, specs, benchmarks, log),
        *_train_stages(cfg, run, data, trained, evaluated, log, executor),
        *_analysis_stages(cfg, run, data, trained, evaluated, benchmarks, embeds, log),
    ]
    return Plan(stages, benchmarks, specs, trained, evaluated)


def _portable(source: str, run: Path) -> str:
    """Sources inside the run folder are keyed relative to it: a moved run stays cached."""
    try:
        return str(Path(source).relative_to(run))
    except ValueError:
        return source


def embed_source(
    run: Path, name: str, source: str, r: Results, sim: Any, executor: Executor, log: Log
) -> int:
    from simgap.embed import embed

    m = r["similarity-model"]
    spec = ModelSpec(arch=m["arch"], checkpoint=m["checkpoint"], pretrained=m["pretrained"])
    store = embed(
        source, run / "stores" / name, spec, executor, sim.device, sim.batch_size, progress=log
    )
    return store.manifest["rows"]


# ----------------------------------------------------------------------------- running


def _prepare_dir(run: Path) -> None:
    if run.is_dir() and any(run.iterdir()) and not (run / "stages").is_dir():
        # Resuming writes into the folder: never mix a run into someone else's files.
        raise ValueError(f"{run}: folder is not empty and is not a simgap run; choose another")
    run.mkdir(parents=True, exist_ok=True)
    (run / "stages").mkdir(exist_ok=True)


def _retire_stale(run: Path, plan: Plan, log: Log) -> None:
    """Splits a previous config made but this one does not: remove their outputs so the report
    shows only this config's splits (their checkpoints stay, as train/<split>)."""
    planned = {s.name for s in plan.splits}
    for folder in sorted((run / "splits").glob("*/")):
        name = folder.name
        if name in planned:
            continue
        log(f"[retire] split {name}: not in this config")
        shutil.rmtree(folder)
        shutil.rmtree(run / "gaps" / "by-split" / name, ignore_errors=True)
        (run / "eval" / f"{name}.json").unlink(missing_ok=True)
        for p in (run / "eval" / "predictions").glob(f"{name}-*.parquet"):
            if p.name[len(name) + 1 : -len(".parquet")] in plan.benchmarks:
                p.unlink()
        for stage in ("select", "gaps", "materialize", "train", "evaluate"):
            (run / "stages" / f"{stage}-{name}.json").unlink(missing_ok=True)


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
        f"recipe {cfg.train.recipe.model} {cfg.train.recipe.epochs} epochs, "
        f"global batch {cfg.train.recipe.batch_size}",
    ]
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
    executor = Executor(
        make_engine(cfg.engine.name, cfg.engine.workers, cfg.engine.address or None)
    )
    plan = make_plan(cfg, run, log, executor)
    if dry_run:
        # Reads stage records only: a dry run writes nothing, not even the run folder.
        runner = Runner(run, plan.stages, log)
        return {"plan": runner.plan(), "text": format_plan(runner, cfg, plan)}
    missing = missing_paths(cfg)
    if missing:
        raise FileNotFoundError(f"{_where(cfg)}: missing inputs: " + "; ".join(missing))
    _prepare_dir(run)
    _retire_stale(run, plan, log)
    runner = Runner(run, plan.stages, log)
    started = time.time()
    provenance = {
        "config": {**to_json(cfg), "benchmarks": plan.benchmarks},
        "config_text": cfg.text,
        "config_path": cfg.path,
        "versions": _versions(),
        "started": _utc(started),
    }
    write_json(run / "run.json", provenance)  # a killed run still says what it was
    execute(runner, cfg.train.parallel)
    write_json(
        run / "run.json",
        {
            **provenance,
            "world": runner.results.get("world"),
            "splits": [s.name for s in plan.splits],
            "trained": plan.trained,
            "timings": runner.timings,
            "finished": _utc(time.time()),
            "wall_seconds": round(time.time() - started, 1),
            "analysis": {
                k: runner.results.get(k)
                for k in ("analysis-robustness", "analysis-similarity", "audit")
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


__all__ = ["Plan", "Runner", "Stage", "format_plan", "make_plan", "run_config", "split_specs"]
