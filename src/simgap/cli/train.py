"""``simgap train``: train CLIP with open_clip_train here, or write (and launch) a torchrun or
SLURM script."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simgap.cli.common import log


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train CLIP with open_clip_train (local, torchrun, SLURM)")
    p.add_argument("data", help="tar shards: brace pattern or '::'-joined list")
    p.add_argument("--keys", help="key list (keys.txt / keys.parquet) applied on the fly to DATA")
    p.add_argument("--samples", type=int, help="samples per epoch (default: key count/sizes.json)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--name", default="clip")
    _recipe_args(p)
    p.add_argument("--device", default="cpu", help="local run: cpu or cuda")
    p.add_argument("--threads", type=int, help="local run: CPU threads (OMP_NUM_THREADS)")
    _launch_args(p)
    p.set_defaults(fn=cmd_train)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="simgap-tiny")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples-seen", type=int, help="sample budget instead of epochs over DATA")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all GPUs together)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    p.add_argument("--warmup-fraction", type=float, help="warm-up as a share of all steps")
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--precision", default="fp32", help="fp32 on CPU; amp or amp_bf16 on GPUs")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-frequency", type=int, default=0, help="keep epoch_<E>.pt every E")
    p.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torchrun", type=int, metavar="GPUS", help="write a one-node torchrun script")
    p.add_argument("--slurm-nodes", type=int, metavar="N", help="write an sbatch script")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--time", default="72:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--python", default="python", help="python on the cluster nodes")
    p.add_argument("--launch", action="store_true", help="run the script (bash / sbatch)")


def cmd_train(a: argparse.Namespace) -> None:
    from simgap import train as t

    recipe = t.Recipe(
        model=a.model,
        epochs=a.epochs,
        samples_seen=a.samples_seen,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup=a.warmup,
        warmup_fraction=a.warmup_fraction,
        wd=a.wd,
        precision=a.precision,
        workers=a.workers,
        seed=a.seed,
        save_frequency=a.save_frequency,
        grad_checkpointing=a.grad_checkpointing,
    )
    if a.torchrun is None and a.slurm_nodes is None:
        _train_here(a, recipe)
    else:
        _write_script(a, recipe)


def _train_here(a: argparse.Namespace, recipe) -> None:  # recipe: simgap.train.Recipe
    from simgap import train as t
    from simgap.io import read_json

    out = Path(a.out)
    ckpt = t.train(
        recipe, a.data, a.samples, out, a.name, log,
        keys=a.keys, device=a.device, threads=a.threads,
    )  # fmt: skip
    record = read_json(t.run_dir(out, a.name) / t.RECORD_FILE)
    print(
        f"train: {record['num_samples']} samples x {recipe.epochs} epochs, "
        f"global batch {recipe.batch_size} -> {ckpt}"
    )


def _write_script(a: argparse.Namespace, recipe) -> None:  # recipe: simgap.train.Recipe
    from simgap import train as t

    out = Path(a.out)
    samples, key_filter = t.prepare_run(recipe, a.data, a.samples, out, a.name, a.keys)
    if a.torchrun is not None:
        text = t.torchrun_command(
            recipe, a.data, samples, out, a.name, a.torchrun, key_filter=key_filter
        )
        script, scheduler = t.run_dir(out, a.name) / "torchrun.sh", "bash"
    else:
        text = t.slurm_script(
            recipe, a.data, samples, out, a.name,
            t.SlurmJob(
                nodes=a.slurm_nodes, gpus_per_node=a.gpus_per_node, cpus_per_task=a.cpus_per_task,
                time=a.time, partition=a.partition, account=a.account, python=a.python,
            ),
            key_filter=key_filter,
        )  # fmt: skip
        script, scheduler = t.run_dir(out, a.name) / "train.sbatch", "sbatch"
    t.write_launch_script(script, text)
    print(text.rstrip())
    print(f"written to {script}", file=sys.stderr)
    if a.launch:
        rc = t.launch_script(script, scheduler)
        if rc != 0:
            raise RuntimeError(f"{scheduler} {script} exited with status {rc}")
    done = f"ran it with {scheduler}" if a.launch else "not launched (--launch runs it)"
    # stderr: stdout holds the script alone, for a pipe.
    line = f"train: {samples} samples x {recipe.epochs} epochs, script {script}, {done}"
    print(line, file=sys.stderr)
