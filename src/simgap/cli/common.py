"""What several commands share: the progress log, skip counts in summary lines, and the model
and engine flags. Library imports stay inside functions so that ``simgap --help`` starts fast."""

from __future__ import annotations

import argparse
import sys
import time


def log(msg: str) -> None:
    """Progress for the user, on stderr with the time: stdout holds the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def skipped_text(counts: dict[str, int]) -> str:
    """``{"corrupt_image": 2, "empty_file": 1}`` → ``3 skipped (2 corrupt_image, 1 empty_file)``."""
    total = sum(counts.values())
    if not total:
        return "0 skipped"
    parts = sorted(((n, why) for why, n in counts.items() if n), key=lambda p: (-p[0], p[1]))
    return f"{total} skipped (" + ", ".join(f"{n} {why}" for n, why in parts) + ")"


def summed(dicts: list[dict[str, int]]) -> dict[str, int]:
    """Skip counts of several shards or benchmarks, added up by reason."""
    total: dict[str, int] = {}
    for d in dicts:
        for why, n in d.items():
            total[why] = total.get(why, 0) + int(n)
    return total


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="simgap-tiny", help="open_clip architecture or local-dir:")
    p.add_argument("--checkpoint", help="local checkpoint file")
    p.add_argument("--pretrained", help="open_clip pretrained tag (needs the hub or its cache)")


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1)


def device_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags of a command whose tasks may run on GPUs, then its device."""
    engine_args(p)
    p.add_argument(
        "--gpus-per-task", type=float, default=1.0, help="Ray, CUDA device: GPUs per task"
    )
    p.add_argument(
        "--cpus-per-gpu-task",
        type=float,
        default=4.0,
        help="Ray, CUDA device: CPUs per GPU task (embed: all but one decode images)",
    )
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (Ray: one GPU per task)")


def engine_spec(a: argparse.Namespace):  # -> simgap.parallel.EngineSpec (imported lazily)
    """The engine that ``device_engine_args``' flags name."""
    from simgap.parallel import EngineSpec

    return EngineSpec(a.engine, a.workers, a.address, a.gpus_per_task, a.cpus_per_gpu_task)
