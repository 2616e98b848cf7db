"""Launching open_clip_train: on this node (one process or torchrun), or as a written script."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from simgap.io import sha256_file, write_json
from simgap.train.gpus import check_train_device, train_env
from simgap.train.prepare import check_resumable, check_shards, prepare_run
from simgap.train.recipe import (
    DONE_FILE,
    ENTRY_MODULE,
    LOG_FILE,
    Recipe,
    TrainError,
    distributed_argv,
    entry_argv,
    final_checkpoint,
    open_clip_argv,
    run_dir,
)
from simgap.types import Log

log = logging.getLogger(__name__)

# torchrun of this very interpreter: a bare `torchrun` is not on PATH when .venv/bin/simgap runs
# without the venv activated.
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def train(
    recipe: Recipe,
    train_data: str,
    num_samples: int | None,
    out_dir: Path,
    name: str,
    log: Log | None = None,
    *,
    keys: Path | str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    gpus: int = 1,
    torchrun: bool | None = None,
    cuda_devices: Sequence[str] = (),
) -> Path:
    """Train (or resume, or skip if done) one run on this node; return the final checkpoint.

    ``keys``: a key list (``.txt`` / ``.parquet``) applied on the fly to ``train_data``, the
    source shards. ``num_samples`` None counts the samples: the keys of the list, or the
    ``sizes.json`` beside materialized shards. ``threads`` caps the CPU threads of each training
    process (its OMP_NUM_THREADS); None keeps torch's default of one per core. On a small
    shared machine 1 can be several times faster.

    ``gpus``: ranks, one per GPU (gloo processes on the CPU); ``torchrun`` None starts them with
    torchrun when ``gpus > 1`` (True: also for one rank). ``recipe.batch_size`` stays the global
    batch. ``cuda_devices``: the only GPUs the training may use (CUDA_VISIBLE_DEVICES entries,
    a set from :func:`gpu_sets`); () leaves the visible GPUs as they are.
    """
    distributed = gpus > 1 if torchrun is None else torchrun
    if gpus < 1 or (gpus > 1 and not distributed):
        raise ValueError(f"gpus = {gpus}: more than one rank needs torchrun")
    if cuda_devices:
        # This process's GPU numbering no longer applies in the child: it sees only its set.
        device = device.partition(":")[0]
    check_train_device(device, gpus, cuda_devices)
    final = final_checkpoint(out_dir, name, recipe)
    rdir = run_dir(out_dir, name)
    num_samples, key_filter = prepare_run(recipe, train_data, num_samples, out_dir, name, keys)
    if (rdir / DONE_FILE).is_file() and final.is_file():
        return final
    # open_clip_train asserts shards >= workers x ranks only after building the model.
    check_shards(train_data, recipe.workers * gpus)
    check_resumable(rdir)
    if distributed:
        argv = distributed_argv(recipe, train_data, num_samples, out_dir, name, gpus, device)
        launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={gpus}", "-m", ENTRY_MODULE]
        cmd = [*launcher, "--", *entry_argv(argv, key_filter)]
    else:
        argv = open_clip_argv(recipe, train_data, num_samples, out_dir, name, device)
        cmd = [sys.executable, "-m", ENTRY_MODULE, *entry_argv(argv, key_filter)]
    env = train_env(threads, cuda_devices)
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
    *,
    key_filter: Path | None = None,
    device: str = "cuda",
    torchrun: str | None = None,
) -> str:
    """A one-node torchrun command line; recipe.batch_size stays the global batch.

    ``torchrun`` None: ``python -m torch.distributed.run`` of this interpreter (works without
    the venv activated); else that torchrun executable."""
    argv = distributed_argv(recipe, train_data, num_samples, out_dir, name, nproc_per_node, device)
    start = list(TORCHRUN) if torchrun is None else [torchrun]
    launcher = [*start, "--standalone", f"--nproc_per_node={int(nproc_per_node)}"]
    # "--": torchrun's argparse otherwise reads the script's options as abbreviations of its
    # own ("--logs" is ambiguous with "--logs-specs"; a unique prefix would be taken silently).
    return shlex.join([*launcher, "-m", ENTRY_MODULE, "--", *entry_argv(argv, key_filter)])


def _run_streaming(
    cmd: list[str], log_path: Path, emit: Log, extra_env: dict[str, str]
) -> tuple[int, str]:
    """Run cmd, copying its merged output to log_path and emit line by line."""
    env = {**os.environ, **extra_env}
    # The child must import this very simgap, installed or not.
    src = str(Path(__file__).resolve().parents[2])  # src/simgap/train/launch.py -> src
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


def write_launch_script(path: Path, text: str) -> Path:
    """Write a launch script (torchrun command or sbatch script), executable."""
    from simgap.io import write_bytes

    if not text.startswith("#!"):
        text = "#!/bin/bash\nset -euo pipefail\n" + text + "\n"
    write_bytes(path, text.encode())
    os.chmod(path, 0o755)
    return Path(path)


def launch_script(path: Path, scheduler: str = "bash") -> int:
    """Run a written launch script: ``bash`` (torchrun on this node) or ``sbatch`` (SLURM)."""
    if scheduler not in ("bash", "sbatch"):
        raise ValueError(f"unknown launcher {scheduler!r}")
    return subprocess.run([scheduler, str(path)]).returncode
