"""What stage keys are made of, besides config values: a recipe as open_clip_train is told it,
run-relative sources, the bootstrap's inputs, the identity of a given file. A key changes
exactly when what the stage reads does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simgap.experiment.config import Config
from simgap.experiment.specs import reference_points_path
from simgap.io import sha256_bytes
from simgap.train import Recipe, open_clip_argv


def recipe_key(recipe: Recipe) -> list[str]:
    """A recipe as what open_clip_train is told: a field added to Recipe with a default that
    changes nothing does not invalidate every cached training. A warm-up fraction is named as
    such: its steps depend on the data, which the key stands in for."""
    share = (
        [] if recipe.warmup_fraction is None else ["warmup_fraction", repr(recipe.warmup_fraction)]
    )
    return open_clip_argv(recipe, "<data>", 1, Path("/<out>"), "<name>") + share


def portable(source: str, run: Path) -> str:
    """Sources inside the run folder are keyed relative to it: a moved run stays cached."""
    try:
        return str(Path(source).relative_to(run))
    except ValueError:
        return source


def sampling_inputs(cfg: Config) -> dict[str, Any]:
    """What every interval is drawn with (analysis.Sampling): a change redoes the robustness and
    statistics analyses."""
    return {
        "id_benchmark": cfg.analysis.id_benchmark,
        "bootstrap": cfg.analysis.bootstrap,
        "seeds": cfg.train.seeds,
        "seed": cfg.seed,
    }


def points_identity(cfg: Config) -> list | None:
    """analysis.reference_points as path and content hash (None: no published points)."""
    return file_identity(reference_points_path(cfg)) if cfg.analysis.reference_points else None


def file_identity(path: Path) -> list:
    """A given file's path and content hash: an edited points.csv redoes the analysis."""
    return [str(path), sha256_bytes(path.read_bytes()) if path.is_file() else None]
