"""The experiment as a declarative config (TOML, or YAML), parsed into small frozen dataclasses.

Every key is checked against the dataclass it fills: an unknown key, a wrong type or a bad value
is a ``ConfigError`` naming the file and the key path, e.g.
``demo.toml: splits.near.sizes[1]: expected a number in (0, 1], got "x"``.
A name without a path (``demo``) means a config shipped in ``simgap/configs/``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from simgap.train import Recipe
from simgap.world import WorldConfig

SHIPPED = ("demo", "paper-world", "paper-laion")


class ConfigError(ValueError):
    """A config that does not describe a valid experiment; the message names file and key."""


# ----------------------------------------------------------------------------- value checks


def _fraction(x: float) -> bool:
    return 0 < x <= 1


def _positive(x: float) -> bool:
    return x > 0


def _at_least_one(x: int) -> bool:
    return x >= 1


def _non_negative(x: float) -> bool:
    return x >= 0


def _similarity(x: float) -> bool:
    return -1 <= x <= 1


def _check(test: Any, what: str) -> dict[str, Any]:
    """Field metadata: ``what`` names the allowed values in the error message."""
    return {"check": test, "what": what}


FRACTION = _check(_fraction, "a number in (0, 1]")
POSITIVE = _check(_positive, "a number > 0")
COUNT = _check(_at_least_one, "an integer >= 1")
NON_NEGATIVE = _check(_non_negative, "a number >= 0")
SIMILARITY = _check(_similarity, "a number in [-1, 1]")


def _one_of(*choices: str) -> dict[str, Any]:
    return _check(lambda x: x in choices, "one of " + ", ".join(json.dumps(c) for c in choices))


# ----------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class RealSources:
    """Data on disk: the paper's setting (ImageNet-train, LAION, the six benchmarks)."""

    reference: str = ""  # image folder (<class>/<image>), the reference set
    pool: str = ""  # the pool's webdataset shards: folder, brace pattern or '::' list
    pool_embeddings: str = ""  # an existing pool store (or clip-retrieval layout): no pool embed
    # name -> benchmark folder (classnames.txt + <class>/<image>) or CLIP_benchmark wds root
    benchmarks: dict[str, str] = field(default_factory=dict)
    templates: str = ""  # one template per line with "{c}"; "" = the world's / OpenAI's


@dataclass(frozen=True)
class Sources:
    kind: str = field(default="world", metadata=_one_of("world", "real"))
    world: WorldConfig = WorldConfig()
    real: RealSources = RealSources()


@dataclass(frozen=True)
class Similarity:
    """The similarity model: trained on the pool (the world) or given (arch + weights)."""

    model: str = "simgap-tiny"
    checkpoint: str = ""
    pretrained: str = ""
    train_on_pool: bool = True
    recipe: Recipe = Recipe(epochs=5, lr=1e-3)
    batch_size: int = field(default=256, metadata=COUNT)  # embedding batch
    device: str = "cpu"


# Split families (select policies) the reference set can be added to. A control follows the split
# it controls; `full` is the pool alone and `full-reference` the pool plus the reference set.
FAMILIES = ("gapmatch", "near", "far", "random", "coreset", "semdedup", "image-based")


@dataclass(frozen=True)
class Reference:
    caption: str = "a photo of a {c}"  # the caption the reference set gets when added to a split
    # The families whose splits get the reference set added. The paper adds ImageNet-train to
    # the gap-matched splits (replicating the gap); its near / far / random / coreset splits are
    # subsets of LAION alone.
    add_to: tuple[str, ...] = field(default=("gapmatch",), metadata=_one_of(*FAMILIES))
    add_to_splits: bool | None = None  # replaced by add_to (refused with how to migrate)


@dataclass(frozen=True)
class Scan:
    """The scan of the pool (and of the reference set) against every benchmark: where it runs
    and how it is tiled. Results do not depend on precision or tiles (the scan is exact)."""

    topk: int = field(default=10, metadata=COUNT)
    device: str = "cpu"  # cpu, cuda, cuda:1
    precision: str = "auto"  # the screen GEMM's precision, as KernelConfig takes it
    tile_rows: int = field(default=0, metadata=NON_NEGATIVE)  # 0: the kernel's default
    tile_tests: int = field(default=0, metadata=NON_NEGATIVE)
    engine: str = field(default="", metadata=_one_of("", "local", "ray"))  # "": [engine].name
    workers: int = field(default=0, metadata=NON_NEGATIVE)  # 0: [engine].workers
    gpus_per_task: float = field(default=0.0, metadata=NON_NEGATIVE)  # 0: [engine]'s


@dataclass(frozen=True)
class Gapmatch:
    per_benchmark: bool = True  # one gap-matched split per benchmark
    combined: bool = True  # one split pruned against every benchmark at once
    controls: bool = True  # a size-matched random control of each


@dataclass(frozen=True)
class Sized:
    """near / far / random splits: pool fractions kept. near / far: one split per size scored
    against each benchmark of ``targets`` (``near-sketch-0.25``: the paper prunes against one
    benchmark at a time) and, with ``union``, one scored against the union of ``benchmarks``
    (``near-0.25``)."""

    sizes: tuple[float, ...] = field(default=(), metadata=FRACTION)
    targets: tuple[str, ...] = ()  # one split per benchmark named here (near / far only)
    union: bool = True  # also the split scored against the union of benchmarks
    benchmarks: tuple[str, ...] = ()  # of the union split; () = all benchmarks


@dataclass(frozen=True)
class Coreset:
    fraction: float = field(
        default=0.0, metadata=_check(lambda x: 0 <= x <= 1, "a number in [0, 1]")
    )
    control: bool = True  # fraction 0: no coreset


@dataclass(frozen=True)
class Semdedup:
    n_clusters: int = field(default=0, metadata=NON_NEGATIVE)  # 0: no dedup split
    # Dropped above similarity 1 - eps; the paper's 0.124 is similarity 0.876.
    eps: float = field(default=0.124, metadata=_check(lambda x: 0 < x < 2, "a number in (0, 2)"))
    # Keep rule (METHOD.md §4): "kept" keeps one point per duplicate group (the paper's text),
    # "any" drops every point too similar to any earlier one (SemDeDup's public code).
    rule: str = field(default="kept", metadata=_one_of("kept", "any"))
    control: bool = True  # a size-matched random control


@dataclass(frozen=True)
class ImageBased:
    n_clusters: int = field(default=0, metadata=NON_NEGATIVE)  # 0: no image-based split
    control: bool = True


@dataclass(frozen=True)
class Splits:
    full: bool = True  # the whole pool (the pool alone)
    full_reference: bool = True  # `full-reference`: the whole pool plus the reference set
    gapmatch: Gapmatch = Gapmatch()
    near: Sized = Sized()
    far: Sized = Sized()
    random: Sized = Sized()
    coreset: Coreset = Coreset()
    semdedup: Semdedup = Semdedup()
    image_based: ImageBased = ImageBased()


@dataclass(frozen=True)
class Train:
    splits: tuple[str, ...] = ("all",)  # split names, or "all"
    recipe: Recipe = Recipe(epochs=5, lr=1e-3)
    parallel: int = field(default=2, metadata=COUNT)  # trainings side by side
    threads: int = field(default=1, metadata=NON_NEGATIVE)  # per training; 0 = torch's default
    device: str = "cpu"
    gpus: int = field(default=1, metadata=COUNT)  # > 1: torchrun on one node
    # Every trained split is trained with this many seeds (recipe.seed + k for seed k). Seed 0
    # is the split's plain stage (train-<split>); seed k > 0 is train-<split>@s<k>, so raising
    # seeds reuses the seeds already trained.
    seeds: int = field(default=1, metadata=COUNT)


@dataclass(frozen=True)
class Evaluate:
    benchmarks: tuple[str, ...] = ()  # () = all
    batch_size: int = field(default=256, metadata=COUNT)
    device: str = "cpu"


@dataclass(frozen=True)
class Analysis:
    id_benchmark: str = ""  # in-distribution benchmark of the robustness line ("" = first)
    # The effective-robustness line (Taori et al. 2020) is the paper's ImageNet-trained models.
    # On the world that role belongs to models trained on the reference set alone: one per
    # budget in reference_epochs and seed below reference_seeds (none: no line). A real run
    # gives published points instead: reference_points, a CSV (docs/reference-points.md).
    reference_epochs: tuple[int, ...] = field(default=(), metadata=COUNT)
    reference_seeds: int = field(default=1, metadata=COUNT)
    reference_points: str = ""
    # Bootstrap replicates of every interval (seeds and test points resampled; simgap.stats).
    bootstrap: int = field(default=2000, metadata=COUNT)
    bins: int = field(default=10, metadata=COUNT)  # accuracy vs NN similarity
    # Contamination audit: "off", "embedding" (pairs above audit_threshold; the paper's method,
    # the only one that scales to LAION) or "pixels" (candidates verified on the images).
    audit: str = field(default="off", metadata=_one_of("off", "embedding", "pixels"))
    audit_threshold: float = field(default=0.95, metadata=SIMILARITY)


@dataclass(frozen=True)
class EngineConfig:
    name: str = field(default="local", metadata=_one_of("local", "ray"))
    workers: int = field(default=1, metadata=COUNT)
    address: str = ""  # Ray cluster address ("" = start a local cluster)
    # Ray tasks on a CUDA device (embed, scan): GPUs and CPUs each asks for. An embed task decodes
    # images on all its CPUs but one. Tasks on the CPU ask for 1 CPU and no GPU.
    gpus_per_task: float = field(default=1.0, metadata=POSITIVE)
    cpus_per_gpu_task: float = field(default=4.0, metadata=POSITIVE)


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    seed: int = 0
    sources: Sources = Sources()
    similarity: Similarity = Similarity()
    reference: Reference = Reference()
    scan: Scan = Scan()
    splits: Splits = Splits()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    analysis: Analysis = Analysis()
    engine: EngineConfig = EngineConfig()
    # Not config keys: where the config came from, recorded in run.json.
    path: str = field(default="", metadata={"internal": True})
    text: str = field(default="", metadata={"internal": True})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    def section(self, name: str) -> Any:
        """A section as plain JSON data (what stage cache keys are made of)."""
        return json.loads(json.dumps(dataclasses.asdict(getattr(self, name)), default=str))


# ----------------------------------------------------------------------------- parsing


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of keys, got {_show(value)}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where, meta)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [value]  # "all" for ("all",)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        if args[-1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]", meta) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)}, got {_show(value)}")
        return tuple(
            _convert(a, v, f"{where}[{i}]", {})
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {_show(value)}")
        return {
            _convert(key_tp, k, where, {}): _convert(value_tp, v, f"{where}.{k}", {})
            for k, v in value.items()
        }
    return _scalar(tp, value, where, meta)


def _scalar(tp: Any, value: Any, where: str, meta: dict[str, Any]) -> Any:
    expected = meta.get("what") or _type_name(tp)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{where}: expected {expected}, got {_show(value)}")
    value = float(value) if tp is float else value
    check = meta.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"{where}: expected {expected}, got {_show(value)}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key; known keys here: {', '.join(fields)}"
        )
    values = {
        name: _convert(hints[name], data[name], _join(where, name), dict(fields[name].metadata))
        for name in fields
        if name in data
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a dataclass's own checks (WorldConfig, Recipe)
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("simgap") / "configs" / f"{name}.toml"))


def resolve(name_or_path: str | Path) -> Path:
    """A file path, or the name of a shipped config (``demo``, ``paper-world``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" not in text and not path.suffix:
        shipped = shipped_path(text)
        if shipped.is_file():
            return shipped
        raise FileNotFoundError(
            f"{text}: no such config file, and not a shipped config ({', '.join(SHIPPED)})"
        )
    raise FileNotFoundError(f"{path}: no such config file")


def parse(text: str, source: str) -> Config:
    """Parse config text; ``source`` (a file name) prefixes every error and picks the format."""
    try:
        if source.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as err:  # noqa: BLE001 - both parsers' errors become one clear line
        raise ConfigError(f"{source}: not valid {_format(source)}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of keys at the top level")
    try:
        cfg = _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    cfg = dataclasses.replace(cfg, path=source, text=text)
    check(cfg)
    return cfg


def _format(source: str) -> str:
    return "YAML" if source.endswith((".yaml", ".yml")) else "TOML"


def load(name_or_path: str | Path) -> Config:
    path = resolve(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse(text, str(path))


def check(cfg: Config) -> None:
    """Checks across keys, before anything runs."""
    where = Path(cfg.path).name or "config"
    if cfg.sources.kind == "real":
        real = cfg.sources.real
        if not real.reference:
            raise ConfigError(f'{where}: sources.real.reference: required when kind = "real"')
        if not real.pool and not real.pool_embeddings:
            raise ConfigError(f"{where}: sources.real: give pool (shards) or pool_embeddings")
        if not real.benchmarks:
            raise ConfigError(f"{where}: sources.real.benchmarks: name at least one benchmark")
    sim = cfg.similarity
    if not sim.train_on_pool and not (sim.checkpoint or sim.pretrained or ":" in sim.model):
        raise ConfigError(
            f"{where}: similarity: give checkpoint (or pretrained) when train_on_pool = false"
        )
    if sim.train_on_pool and (sim.checkpoint or sim.pretrained):
        raise ConfigError(
            f"{where}: similarity: checkpoint/pretrained and train_on_pool = true "
            "exclude each other"
        )
    if cfg.reference.add_to_splits is not None:
        raise ConfigError(
            f"{where}: reference.add_to_splits: replaced by reference.add_to, the split families "
            f'the reference set is added to: the paper\'s add_to = ["gapmatch"], every family '
            f"add_to = {json.dumps(list(FAMILIES))}, none add_to = []; the full pool with it is "
            "the split full-reference (splits.full_reference)"
        )
    if "{c}" not in cfg.reference.caption:
        raise ConfigError(f'{where}: reference.caption: must contain "{{c}}"')
    if cfg.train.gpus > 1 and cfg.train.recipe.batch_size % cfg.train.gpus:
        raise ConfigError(
            f"{where}: train.recipe.batch_size: {cfg.train.recipe.batch_size} is not divisible "
            f"by train.gpus = {cfg.train.gpus}"
        )


def to_json(cfg: Config) -> dict[str, Any]:
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    data.pop("text")
    return data


def override(cfg: Config, settings: dict[str, Any]) -> Config:
    """The config with dotted keys replaced (``{"sources.world.scale": 0.05}``), checked like the
    file; the replaced values are recorded in ``overrides`` of run.json, not in config_text."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    path, text, before = data.pop("path"), data.pop("text"), data.pop("overrides")
    for dotted, value in settings.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {dotted}: {part} is not a table of keys")
            node = node[part]
        if last not in node:
            raise ConfigError(f"--set {dotted}: unknown key")
        node[last] = value
    try:
        new = _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'} (with --set): {err}") from None
    new = dataclasses.replace(new, path=path, text=text, overrides={**before, **settings})
    check(new)
    return new


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as TOML (a bare word: a string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
