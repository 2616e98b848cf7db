"""A Slurm sbatch script for a multi-node training."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from simgap.train.recipe import ENTRY_MODULE, Recipe, distributed_argv, entry_argv


@dataclass(frozen=True)
class SlurmJob:
    """Where and how a Slurm training job runs: the sbatch directives and the launcher."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    time: str = "72:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "simgap-train"
    python: str = "python"
    master_port: int = 29500


def slurm_script(
    recipe: Recipe,
    train_data: str,
    num_samples: int,
    out_dir: Path,
    name: str,
    job: SlurmJob = SlurmJob(),
    *,
    key_filter: Path | None = None,
) -> str:
    """An sbatch script: one task per GPU, open_clip_train reads ranks from SLURM_* variables.

    Every task sees all of its node's GPUs (``--gpu-bind=none``): open_clip_train picks
    ``cuda:<local rank>``, so a binding that gives each task a subset (``--accel-bind=g``, which
    recent Slurm treats as ``--gpu-bind=closest``: 4 GPUs per socket on a dual-socket node)
    would leave local ranks 4-7 with an invalid device ordinal.
    Resubmitting the same script resumes the run (``--resume latest``).
    """
    world = job.nodes * job.gpus_per_node
    argv = distributed_argv(recipe, train_data, num_samples, out_dir, name, world, "cuda")
    directives = {
        "job-name": job.job_name,
        "nodes": job.nodes,
        "ntasks-per-node": job.gpus_per_node,
        "gpus-per-node": job.gpus_per_node,
        "cpus-per-task": job.cpus_per_task,
        "time": job.time,
        "partition": job.partition,
        "account": job.account,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={_sbatch_value(v)}" for k, v in directives.items() if v is not None]
    run = ["srun", "--cpu-bind=v", "--gpu-bind=none", job.python, "-u", "-m", ENTRY_MODULE]
    run += entry_argv(argv, key_filter)
    lines += [
        "set -euo pipefail",
        f"export MASTER_PORT={int(job.master_port)}",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_ADDR",
        shlex.join(run),
    ]
    return "\n".join(lines) + "\n"


def _sbatch_value(value: object) -> str:
    # sbatch parses #SBATCH lines itself (no shell), so a value is only accepted when
    # shell-quoting would leave it unchanged: no spaces, quotes or metacharacters.
    text = str(value)
    if not text or shlex.quote(text) != text:
        raise ValueError(f"unsafe #SBATCH value {text!r}")
    return text
