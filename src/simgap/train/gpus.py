"""GPUs for trainings: each training's set, disjoint from its neighbours', and its environment."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence


def train_env(threads: int | None, cuda_devices: Sequence[str] = ()) -> dict[str, str]:
    """What the training process's environment adds: its CPU threads and its GPU set."""
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if cuda_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda_devices)
    return env


def check_train_device(device: str, gpus: int, cuda_devices: Sequence[str]) -> None:
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
