"""A training recipe and the open_clip_train command line it becomes; the run folder's
names."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

ENTRY_MODULE = "simgap._train_entry"
LATEST_CHECKPOINT = "epoch_latest.pt"
RECORD_FILE = "simgap-train.json"
LOG_FILE = "simgap-train.log"
DONE_FILE = "simgap-done.json"
KEYS_OPTION = "--simgap-keys"  # read by simgap._train_entry, never passed to open_clip_train


class TrainError(RuntimeError):
    """open_clip_train failed or did not produce the final checkpoint."""


@dataclass(frozen=True)
class Recipe:
    model: str = "simgap-tiny"
    epochs: int = 5
    batch_size: int = 64  # global batch; divided over ranks by torchrun_command / slurm_script
    lr: float = 5e-4
    warmup: int = 10  # steps
    # A share of the training's steps instead (replaces `warmup`): every model of a run, from a
    # 29-step reference-line model to a 3,000-step split, then warms up over the same share.
    warmup_fraction: float | None = None
    wd: float = 0.2
    # AdamW betas/eps, always passed: open_clip_train picks its ViT defaults (0.9, 0.98, 1e-6)
    # only when "vit" is in the model name, so "simgap-tiny" would silently get ResNet ones.
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    precision: str = "fp32"  # "amp" / "amp_bf16" on GPUs; fp32 on CPU
    workers: int = 1  # dataloader workers per rank; needs at least that many shards per rank
    seed: int = 0
    save_frequency: int = 0  # 0: keep only the final epoch_<E>.pt (and epoch_latest.pt)
    # None: `epochs` passes over the data. Else a budget of samples seen, cut into `epochs`
    # checkpointed parts of samples_seen // epochs samples drawn with replacement from shards.
    samples_seen: int | None = None
    # Recompute activations in the backward pass: what lets ViT-B/32 hold a per-GPU batch of
    # 4,200 (33,600 over 8 GPUs) in memory (estimate in configs/paper-laion.toml).
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Here rather than where the steps are computed: a config names the key it came from.
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def run_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / name


def final_checkpoint(out_dir: Path, name: str, recipe: Recipe) -> Path:
    return run_dir(out_dir, name) / "checkpoints" / f"epoch_{recipe.epochs}.pt"


def check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"run name must be a single folder name, got {name!r}")


def warmup_steps(recipe: Recipe, num_samples: int) -> int:
    """The warm-up steps open_clip_train gets: ``recipe.warmup``, or ``warmup_fraction`` of the
    scheduler's steps (open_clip_train: ceil(samples an epoch / global batch) x epochs)."""
    if recipe.warmup_fraction is None:
        return recipe.warmup
    steps = math.ceil(num_samples / recipe.batch_size) * recipe.epochs
    return max(1, round(recipe.warmup_fraction * steps))


def open_clip_argv(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    device: str = "cpu",
) -> list[str]:
    """The open_clip_train command line for one recipe (per-rank batch = recipe.batch_size)."""
    check_name(name)
    resampled: list[str] = []
    if recipe.samples_seen is not None:
        if recipe.samples_seen < recipe.epochs:
            raise ValueError(f"samples_seen {recipe.samples_seen} < epochs {recipe.epochs}")
        num_samples = recipe.samples_seen // recipe.epochs
        resampled = ["--dataset-resampled"]
    warmup = warmup_steps(recipe, num_samples)
    if recipe.grad_checkpointing:
        resampled.append("--grad-checkpointing")
    return [
        "--model", recipe.model,
        "--train-data", train_data,
        "--train-num-samples", str(num_samples),
        *resampled,
        "--dataset-type", "webdataset",
        "--epochs", str(recipe.epochs),
        "--batch-size", str(recipe.batch_size),
        "--lr", repr(recipe.lr),
        "--warmup", str(warmup),
        "--wd", repr(recipe.wd),
        "--beta1", repr(recipe.beta1),
        "--beta2", repr(recipe.beta2),
        "--eps", repr(recipe.eps),
        "--precision", recipe.precision,
        "--workers", str(recipe.workers),
        "--seed", str(recipe.seed),
        "--logs", str(Path(out_dir).absolute()),
        "--name", name,
        # Resume from epoch_latest.pt, which open_clip_train replaces atomically (tmp.pt, then
        # os.replace). Without --save-most-recent, "latest" takes the last *.pt in natural
        # order, which is the half-written tmp.pt a kill during a save leaves behind.
        "--resume", "latest",
        "--save-most-recent",
        "--save-frequency", str(recipe.save_frequency),
        # open_clip_train defaults to "cuda" and only warns when it falls back to CPU.
        "--device", device,
        "--report-to", "none",  # no wandb, no tensorboard
        "--zeroshot-frequency", "0",  # simgap evaluates with simgap.evaluate
    ]  # fmt: skip


def distributed_argv(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    world: int,
    device: str,
) -> list[str]:
    if world < 1 or recipe.batch_size % world:
        raise ValueError(
            f"global batch {recipe.batch_size} is not divisible by {world} ranks: "
            "the per-GPU batch must be an integer"
        )
    per_rank = dataclasses.replace(recipe, batch_size=recipe.batch_size // world)
    argv = open_clip_argv(per_rank, train_data, num_samples, out_dir, name, device=device)
    # The memory-efficient, gradient-correct contrastive loss across ranks (open_clip README).
    argv += ["--local-loss", "--gather-with-grad"]
    if device == "cpu":  # open_clip_train would pick gloo too; explicit here, NCCL for CUDA
        argv += ["--dist-backend", "gloo"]
    return argv


def entry_argv(open_clip: list[str], key_filter: Path | None = None) -> list[str]:
    """Arguments of ``python -m simgap._train_entry``: simgap's own options, then open_clip's."""
    own = [KEYS_OPTION, str(Path(key_filter).absolute())] if key_filter is not None else []
    return [*own, *open_clip]
