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
    out_dir/name/keys.h128.npy            the key list as sorted 128-bit hashes (key-list runs)

Training data is either materialized shards (every sample is trained on) or source shards plus
a key list (``keys.txt`` / ``keys.parquet`` of a split): the key list is applied on the fly, in
the data pipeline right after the tar reader, so only the listed samples are shuffled, decoded
and trained on, and nothing is resharded.

A run killed at any point is resumed by calling :func:`train` again with the same arguments:
open_clip_train's ``--resume latest --save-most-recent`` restarts from ``epoch_latest.pt``.
With ``gpus > 1`` (or ``torchrun=True``) :func:`train` starts the ranks itself, as
``python -m torch.distributed.run`` of this interpreter, through the same claim, resume check
and done record. Trainings side by side get disjoint GPU sets (:func:`gpu_sets`,
:class:`GpuSlots`), each training's process sees only its own (``CUDA_VISIBLE_DEVICES``).

Note: open_clip_train turns on cudnn.benchmark and TF32 whenever CUDA is available, so GPU
training is not bitwise reproducible; only the sample order is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simgap.data.keylist import read_key_list
from simgap.io import sha256_file, write_json, write_npy
from simgap.types import Log

log = logging.getLogger(__name__)

ENTRY_MODULE = "simgap._train_entry"
LATEST_CHECKPOINT = "epoch_latest.pt"
RECORD_FILE = "simgap-train.json"
LOG_FILE = "simgap-train.log"
DONE_FILE = "simgap-done.json"
KEY_HASHES_FILE = "keys.h128.npy"
KEY_HASH = np.dtype([("hi", "<u8"), ("lo", "<u8")])  # compared field by field: 128-bit order
KEYS_OPTION = "--simgap-keys"  # read by simgap._train_entry, never passed to open_clip_train
# torchrun of this very interpreter: a bare `torchrun` is not on PATH when .venv/bin/simgap runs
# without the venv activated.
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


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
    # None: `epochs` passes over the data. Else a budget of samples seen, cut into `epochs`
    # checkpointed parts of samples_seen // epochs samples drawn with replacement from shards.
    samples_seen: int | None = None
    # Recompute activations in the backward pass: what lets ViT-B/32 hold a per-GPU batch of
    # 4,200 (33,600 over 8 GPUs) in memory (estimate in configs/paper-laion.toml).
    grad_checkpointing: bool = False


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
    resampled: list[str] = []
    if recipe.samples_seen is not None:
        if recipe.samples_seen < recipe.epochs:
            raise ValueError(f"samples_seen {recipe.samples_seen} < epochs {recipe.epochs}")
        num_samples = recipe.samples_seen // recipe.epochs
        resampled = ["--dataset-resampled"]
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
    _check_train_device(device, gpus, cuda_devices)
    final = final_checkpoint(out_dir, name, recipe)
    rdir = run_dir(out_dir, name)
    num_samples, key_filter = prepare_run(recipe, train_data, num_samples, out_dir, name, keys)
    if (rdir / DONE_FILE).is_file() and final.is_file():
        return final
    # open_clip_train asserts shards >= workers x ranks only after building the model.
    _check_shards(train_data, recipe.workers * gpus)
    check_resumable(rdir)
    if distributed:
        argv = _distributed_argv(recipe, train_data, num_samples, out_dir, name, gpus, device)
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


def train_env(threads: int | None, cuda_devices: Sequence[str] = ()) -> dict[str, str]:
    """What the training process's environment adds: its CPU threads and its GPU set."""
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if cuda_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda_devices)
    return env


def _check_train_device(device: str, gpus: int, cuda_devices: Sequence[str]) -> None:
    """open_clip_train falls back to the CPU with only a warning: refuse here instead."""
    from simgap.models import DeviceError, check_device

    check_device(device)
    if not device.startswith("cuda"):
        return
    import torch

    visible = len(cuda_devices) if cuda_devices else torch.cuda.device_count()
    if gpus > visible:
        raise DeviceError(f"{gpus} ranks need {gpus} GPUs; {visible} visible to this training")


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may give to trainings, as CUDA_VISIBLE_DEVICES entries: that
    variable's (indices or UUIDs) when set, else 0..device_count-1."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return [v.strip() for v in value.split(",") if v.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_sets(
    device: str, gpus: int, parallel: int, visible: Sequence[str]
) -> list[tuple[str, ...]]:
    """Disjoint GPU sets for trainings side by side: one set per training that may run at once.

    On the CPU, ``parallel`` empty sets. On ``cuda``, at most ``parallel`` sets of ``gpus``
    entries of ``visible`` each: fewer when the GPUs run out, so two trainings (or two torchruns
    holding every GPU) never share a GPU. ``cuda:N`` is that one GPU: one set. A training that
    needs more GPUs than are visible is refused.
    """
    if gpus < 1 or parallel < 1:
        raise ValueError(f"gpus ({gpus}) and parallel ({parallel}) must be at least 1")
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return [()] * parallel
    if index:
        if gpus > 1:
            raise ValueError(f"device {device} is one GPU but each training takes {gpus}; use cuda")
        if not index.isdigit() or int(index) >= len(visible):
            raise ValueError(f"device {device}: {len(visible)} GPU(s) visible")
        return [(visible[int(index)],)]
    if gpus > len(visible):
        raise ValueError(f"a training takes {gpus} GPUs but {len(visible)} are visible")
    sets = min(parallel, len(visible) // gpus)
    return [tuple(visible[i * gpus : (i + 1) * gpus]) for i in range(sets)]


class GpuSlots:
    """Lends :func:`gpu_sets`' sets to trainings run in threads: a set is held by one training
    at a time; a training that finds none free waits for one (its chain's other stages go on).

    ``sets`` may be a function that gives them, called at the first lease: a plan can hold its
    slots without looking at GPUs (a dry run on a machine without them)."""

    def __init__(self, sets: Sequence[tuple[str, ...]] | Callable[[], Sequence[tuple[str, ...]]]):
        self._make = sets if callable(sets) else (lambda: sets)
        self._free: queue.SimpleQueue[tuple[str, ...]] | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_trainings(cls, device: str, gpus: int, parallel: int) -> GpuSlots:
        """The slots of a config's trainings (``train.device``, ``gpus``, ``parallel``) over
        this process's visible GPUs, found at the first lease."""
        return cls(lambda: gpu_sets(device, gpus, parallel, visible_gpus()))

    def _queue(self) -> queue.SimpleQueue[tuple[str, ...]]:
        with self._lock:
            if self._free is None:
                sets = list(self._make())
                if not sets:
                    raise ValueError("no GPU sets to lend")
                free: queue.SimpleQueue[tuple[str, ...]] = queue.SimpleQueue()
                for s in sets:
                    free.put(s)
                self._free = free
            return self._free

    @contextlib.contextmanager
    def lease(self) -> Iterator[tuple[str, ...]]:
        free = self._queue()
        held = free.get()
        try:
            yield held
        finally:
            free.put(held)


def prepare_run(
    recipe: Recipe,
    train_data: str,
    num_samples: int | None,
    out_dir: Path,
    name: str,
    keys: Path | str | None = None,
) -> tuple[int, Path | None]:
    """Claim the run folder for this run and write its key filter (before any launch).

    Returns the sample count and the key filter file (None without a key list). A folder that
    holds another run (other recipe, data or key list) is refused.
    """
    _check_name(name)
    rdir = run_dir(out_dir, name)
    key_list = read_key_list(keys) if keys is not None else None
    if num_samples is None:
        num_samples = len(key_list) if key_list is not None else count_samples(train_data)
    if num_samples < 1:
        raise ValueError(f"nothing to train on: {num_samples} samples")
    record = _record(recipe, train_data, num_samples)
    if keys is not None:
        # By content, not path: the same list given by another path is the same run.
        record["keys"] = {"sha256": sha256_file(keys), "count": len(key_list)}
    _claim_run_dir(rdir, record)
    if key_list is None:
        return num_samples, None
    path = rdir / KEY_HASHES_FILE
    if not path.is_file():  # written atomically, and the record pins the key list
        write_npy(path, key_hashes(key_list))
    return num_samples, path


def entry_argv(open_clip: list[str], key_filter: Path | None = None) -> list[str]:
    """Arguments of ``python -m simgap._train_entry``: simgap's own options, then open_clip's."""
    own = [KEYS_OPTION, str(Path(key_filter).absolute())] if key_filter is not None else []
    return [*own, *open_clip]


def key_hash(key: str) -> tuple[int, int]:
    """128-bit hash of a sample key as (hi, lo) 64-bit halves (what the key filter compares)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def key_hashes(keys: list[str]) -> np.ndarray:
    """Sorted 128-bit hashes of a key list (dtype ``KEY_HASH``): 16 bytes a key,
    memory-mapped and shared by every dataloader worker. A pool key outside the list passes by
    chance with probability len(keys) / 2**128: with 64 bits, 2e8 pool keys against 1e8 listed
    ones would let one wrong sample in about once in a thousand runs."""
    hashes = np.unique(np.fromiter(map(key_hash, keys), KEY_HASH, len(keys)))
    if hashes.size != len(keys):
        raise ValueError("two keys of the key list share a 128-bit hash; rename one")
    return hashes


def count_samples(train_data: str) -> int:
    """Samples in materialized shards, from the ``sizes.json`` (shard file -> count) beside them."""
    import webdataset

    urls = webdataset.shardlists.expand_urls(train_data)
    total = 0
    for folder, names in _by_folder(urls).items():
        sizes_file = folder / "sizes.json"
        if not sizes_file.is_file():
            raise FileNotFoundError(
                f"{sizes_file}: not found; pass the sample count (--samples) or a key list"
            )
        sizes = json.loads(sizes_file.read_text())
        missing = [n for n in names if n not in sizes]
        if missing:
            raise ValueError(f"{sizes_file}: no count for shard {missing[0]}")
        total += sum(int(sizes[n]) for n in names)
    return total


def check_resumable(rdir: Path) -> None:
    """Refuse to resume from a checkpoint that torch cannot load with ``weights_only=True``
    (one that carries pickled code), before open_clip_train would load it."""
    import pickle

    import torch

    latest = rdir / "checkpoints" / LATEST_CHECKPOINT
    if not latest.is_file():
        return
    try:
        # mmap: only the pickle is read here, not the tensors.
        torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{latest}: refusing to resume from this checkpoint: it does not load with "
            f"torch.load(weights_only=True) ({first}). Remove it to restart the run."
        ) from None


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
    argv = _distributed_argv(recipe, train_data, num_samples, out_dir, name, nproc_per_node, device)
    start = list(TORCHRUN) if torchrun is None else [torchrun]
    launcher = [*start, "--standalone", f"--nproc_per_node={int(nproc_per_node)}"]
    # "--": torchrun's argparse otherwise reads the script's options as abbreviations of its
    # own ("--logs" is ambiguous with "--logs-specs"; a unique prefix would be taken silently).
    return shlex.join([*launcher, "-m", ENTRY_MODULE, "--", *entry_argv(argv, key_filter)])


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
    argv = _distributed_argv(recipe, train_data, num_samples, out_dir, name, world, "cuda")
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


def _distributed_argv(
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


def _by_folder(urls: list[str]) -> dict[Path, list[str]]:
    folders: dict[Path, list[str]] = {}
    for url in urls:
        folders.setdefault(Path(url).parent, []).append(Path(url).name)
    return folders


def _run_streaming(
    cmd: list[str], log_path: Path, emit: Log, extra_env: dict[str, str]
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
