"""OpenCLIP training adapter: a typed recipe becomes open_clip_train's argv, nothing more.

Training itself is open_clip_train (``open_clip_train.main.main``), run in a subprocess through
``python -m simgap._train_entry`` (which registers simgap's model configs and seeds the sample
shuffle). Layout of a run, as open_clip_train writes it under ``--logs out_dir --name name``::

    out_dir/name/out.log                  open_clip_train's own log (appended across resumes)
    out_dir/name/params.txt               every parsed argument (rewritten on each start)
    out_dir/name/checkpoints/epoch_latest.pt  rewritten atomically after every epoch (resume)
    out_dir/name/checkpoints/epoch_<E>.pt     the final checkpoint (and every save_frequency)
    out_dir/name/simgap-train.json        what was trained: recipe, data, sample count
    out_dir/name/simgap-train.log         the subprocess's stdout+stderr (appended)
    out_dir/name/simgap-done.json         written last, after a successful run

A run killed at any point is resumed by calling :func:`train` again with the same arguments:
open_clip_train's ``--resume latest --save-most-recent`` restarts from ``epoch_latest.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from simgap.io import sha256_file, write_json

log = logging.getLogger(__name__)

ENTRY_MODULE = "simgap._train_entry"
LATEST_CHECKPOINT = "epoch_latest.pt"
RECORD_FILE = "simgap-train.json"
LOG_FILE = "simgap-train.log"
DONE_FILE = "simgap-done.json"


class TrainError(RuntimeError):
    """open_clip_train failed or did not produce the final checkpoint."""


@dataclass(frozen=True)
class Recipe:
    model: str = "simgap-tiny"
    epochs: int = 5
    batch_size: int = 64  # global batch; divided over ranks by torchrun_command / slurm_script
    lr: float = 5e-4
    warmup: int = 10  # steps
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


def run_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / name


def final_checkpoint(out_dir: Path, name: str, recipe: Recipe) -> Path:
    return run_dir(out_dir, name) / "checkpoints" / f"epoch_{recipe.epochs}.pt"


def open_clip_argv(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    device: str = "cpu",
) -> list[str]:
    """The open_clip_train command line for one recipe (per-rank batch = recipe.batch_size)."""
    _check_name(name)
    return [
        "--model", recipe.model,
        "--train-data", train_data,
        "--train-num-samples", str(num_samples),
        "--dataset-type", "webdataset",
        "--epochs", str(recipe.epochs),
        "--batch-size", str(recipe.batch_size),
        "--lr", repr(recipe.lr),
        "--warmup", str(recipe.warmup),
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


def train(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    log: Callable[[str], None] | None = None,
    *,
    device: str = "cpu",
    threads: int | None = None,
) -> Path:
    """Train (or resume, or skip if done) one run locally; return the final checkpoint path.

    ``threads`` caps the CPU threads of the training process (its OMP_NUM_THREADS); None keeps
    torch's default of one per core. On a small shared machine 1 can be several times faster.
    """
    final = final_checkpoint(out_dir, name, recipe)
    rdir = run_dir(out_dir, name)
    _claim_run_dir(rdir, _record(recipe, train_data, num_samples))
    if (rdir / DONE_FILE).is_file() and final.is_file():
        return final
    _check_shards(train_data, recipe.workers)
    argv = open_clip_argv(recipe, train_data, num_samples, out_dir, name, device)
    cmd = [sys.executable, "-m", ENTRY_MODULE, *argv]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    rc, tail = _run_streaming(cmd, rdir / LOG_FILE, log or _log_line, env)
    if rc != 0:
        raise TrainError(f"open_clip_train exited with status {rc}; last lines:\n{tail}")
    if not final.is_file():
        raise TrainError(f"open_clip_train finished but {final} is missing; last lines:\n{tail}")
    done = {"final_checkpoint": final.name, "sha256": sha256_file(final), "argv": argv}
    write_json(rdir / DONE_FILE, done)
    return final


def torchrun_command(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    nproc_per_node: int,
) -> str:
    """A one-node torchrun command line; recipe.batch_size stays the global batch."""
    argv = _distributed_argv(recipe, train_data, num_samples, out_dir, name, nproc_per_node)
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    return shlex.join([*launcher, "-m", ENTRY_MODULE, *argv])


def slurm_script(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    cpus_per_task: int = 8,
    time: str = "72:00:00",
    partition: str | None = None,
    account: str | None = None,
    job_name: str = "simgap-train",
    python: str = "python",
    master_port: int = 29500,
) -> str:
    """An sbatch script: one task per GPU, open_clip_train reads ranks from SLURM_* variables.

    Resubmitting the same script resumes the run (``--resume latest``).
    """
    world = nodes * gpus_per_node
    argv = _distributed_argv(recipe, train_data, num_samples, out_dir, name, world)
    directives = {
        "job-name": job_name,
        "nodes": nodes,
        "ntasks-per-node": gpus_per_node,
        "gpus-per-node": gpus_per_node,
        "cpus-per-task": cpus_per_task,
        "time": time,
        "partition": partition,
        "account": account,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={_sbatch_value(v)}" for k, v in directives.items() if v is not None]
    run = ["srun", "--cpu-bind=v", "--accel-bind=gn", python, "-u", "-m", ENTRY_MODULE, *argv]
    lines += [
        "set -euo pipefail",
        f"export MASTER_PORT={int(master_port)}",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_ADDR",
        shlex.join(run),
    ]
    return "\n".join(lines) + "\n"


def _distributed_argv(
    recipe: Recipe, train_data: str, num_samples: int, out_dir: Path, name: str, world: int
) -> list[str]:
    if world < 1 or recipe.batch_size % world:
        raise ValueError(
            f"global batch {recipe.batch_size} is not divisible by {world} ranks: "
            "the per-GPU batch must be an integer"
        )
    per_rank = dataclasses.replace(recipe, batch_size=recipe.batch_size // world)
    argv = open_clip_argv(per_rank, train_data, num_samples, out_dir, name, device="cuda")
    # The memory-efficient, gradient-correct contrastive loss across ranks (open_clip README).
    return [*argv, "--local-loss", "--gather-with-grad"]


def _sbatch_value(value: object) -> str:
    # sbatch parses #SBATCH lines itself (no shell), so a value is only accepted when
    # shell-quoting would leave it unchanged: no spaces, quotes or metacharacters.
    text = str(value)
    if not text or shlex.quote(text) != text:
        raise ValueError(f"unsafe #SBATCH value {text!r}")
    return text


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"run name must be a single folder name, got {name!r}")


def _record(recipe: Recipe, train_data: str, num_samples: int) -> dict:
    return {
        "recipe": dataclasses.asdict(recipe),
        "train_data": train_data,
        "num_samples": num_samples,
    }


def _claim_run_dir(rdir: Path, record: dict) -> None:
    """Refuse to resume a run directory that holds a different run (or an unknown one)."""
    path = rdir / RECORD_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != record:
            raise ValueError(
                f"{rdir} holds a run of a different recipe or data:\n  there: {existing}\n"
                f"  asked: {record}\nuse another name or remove that folder"
            )
        return
    if (rdir / "checkpoints").exists():
        raise ValueError(f"{rdir} holds checkpoints not made by simgap.train; use another name")
    rdir.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def _check_shards(train_data: str, workers: int) -> None:
    import webdataset

    urls = webdataset.shardlists.expand_urls(train_data)
    local = [u for u in urls if not re.match(r"^[a-z][a-z0-9+.-]*:", u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} training shards missing, e.g. {missing[:3]}")
    # open_clip_train asserts this later, after building the model.
    if len(urls) < max(1, workers):
        raise ValueError(f"{len(urls)} shards cannot feed {workers} dataloader workers")


def _run_streaming(
    cmd: list[str], log_path: Path, emit: Callable[[str], None], extra_env: dict[str, str]
) -> tuple[int, str]:
    """Run cmd, copying its merged output to log_path and emit line by line."""
    env = {**os.environ, **extra_env}
    # The child must import this very simgap, installed or not.
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "a", encoding="utf-8") as sink:
        sink.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
        )
        try:
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                tail.append(line.rstrip("\n"))
                emit(line.rstrip("\n"))
            rc = proc.wait()
        finally:
            # If this process is interrupted, do not leave an orphan training run behind.
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, "\n".join(tail)


def _log_line(line: str) -> None:
    log.info("%s", line)
