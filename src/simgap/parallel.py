"""One executor interface, three engines: ``local`` (processes on this machine), ``thread``
(threads in this process, for IO-bound stages) and ``ray`` (a cluster).

A stage hands the executor a picklable callable over one task (one shard) and the list of tasks;
the executor returns one record per task, in task order. Stages never know which engine ran them
(the img2dataset "distributor" split). Failures are retried a bounded number of times, then the
executor raises naming every failed task: nothing is dropped silently.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

from simgap.types import Log

Outcome = tuple[int, bool, Any]  # task index, succeeded, record or (message, traceback)


class ExecutorError(RuntimeError):
    """Some tasks kept failing after their retries; ``tracebacks`` holds their details."""

    def __init__(self, message: str, tracebacks: list[str]):
        super().__init__(message)
        self.tracebacks = tracebacks


class Engine(Protocol):
    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Outcome]:
        """Yield one outcome per task, in completion order."""
        ...


def _call(fn: Callable[[Any], Any], task: Any) -> tuple[bool, Any]:
    # Exceptions become records so one bad shard does not take the whole pool down.
    try:
        return True, fn(task)
    except Exception as e:  # noqa: BLE001 - reported, with its traceback, by the executor
        return False, (f"{type(e).__name__}: {e}", traceback.format_exc(limit=8))


# The GPU a local pool worker uses: set once per worker process by the pool's initializer.
GPU_ENV = "SIMGAP_WORKER_GPU"


def _assign_gpu(counter: Any, gpus: int) -> None:
    # Pool initializer: workers (and their replacements) take GPUs round robin, so a pool of
    # 8 workers on an 8-GPU node puts one worker on each GPU instead of all on cuda:0.
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ[GPU_ENV] = str(index % gpus)


@dataclass(frozen=True)
class LocalEngine:
    """In-process for one worker; a ``spawn`` process pool otherwise (safe with torch threads).

    ``gpus`` > 0: the pool's workers are spread over that many GPUs (``task_device`` maps a task's
    ``cuda`` to its worker's GPU)."""

    workers: int = 1
    gpus: int = 0

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Outcome]:
        if self.workers <= 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                yield (i, *_call(fn, t))
            return
        ctx = multiprocessing.get_context("spawn")
        spread: dict[str, Any] = {}
        if self.gpus > 0:
            spread = {"initializer": _assign_gpu, "initargs": (ctx.Value("i", 0), self.gpus)}
        with ProcessPoolExecutor(
            self.workers, mp_context=ctx, max_tasks_per_child=16, **spread
        ) as pool:
            futures = {pool.submit(_call, fn, t): i for i, t in enumerate(tasks)}
            for future in as_completed(futures):
                yield (futures[future], *future.result())


@dataclass(frozen=True)
class ThreadEngine:
    """Threads in this process, for IO-bound stages (reads, copies and fsync release the GIL):
    one task's disk wait overlaps another's work, without a process pool's start-up (~1 s for
    ``spawn``). Tasks share the process, so ``fn`` must not keep per-task global state."""

    workers: int = 2

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Outcome]:
        if self.workers <= 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                yield (i, *_call(fn, t))
            return
        with ThreadPoolExecutor(min(self.workers, len(tasks))) as pool:
            futures = {pool.submit(_call, fn, t): i for i, t in enumerate(tasks)}
            for future in as_completed(futures):
                yield (futures[future], *future.result())


@dataclass(frozen=True)
class RayEngine:
    """Runs tasks as Ray tasks; joins ``address`` or starts a local cluster.

    ``num_cpus`` per task is explicit because on small machines tasks that take every CPU starve
    Ray's own work and deadlock. With ``num_gpus`` > 0 Ray places each task on a GPU and sets
    CUDA_VISIBLE_DEVICES to it. ``max_calls=0`` keeps a worker process across tasks: Ray's default
    for GPU tasks (one call per worker) would re-import torch, re-initialise CUDA and reload the
    model for every shard.
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def options(self) -> dict[str, Any]:
        """The resources and worker reuse every task of this engine asks Ray for."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_calls": 0}

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Outcome]:
        try:
            import ray
        except ImportError:
            raise ExecutorError("engine 'ray' needs Ray: pip install 'ray'", []) from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(**self.options())(_call)
        fn_ref = ray.put(fn)
        pending = {remote.remote(fn_ref, t): i for i, t in enumerate(tasks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    yield (i, *ray.get(ref))
                except ray.exceptions.RayError as e:
                    # Ray already retried a task whose worker died (its max_retries); what is
                    # left is a failure of this task, retried and then named by the executor.
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    yield (i, False, (f"{type(e).__name__}: {first}", str(e)))


def make_engine(
    name: str,
    workers: int = 1,
    address: str | None = None,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    gpus: int = 0,
) -> Engine:
    """``num_gpus``/``num_cpus``: what each Ray task asks for; ``gpus``: the GPUs a local pool's
    workers are spread over."""
    if name == "local":
        return LocalEngine(workers, gpus)
    if name == "thread":
        return ThreadEngine(workers)
    if name == "ray":
        return RayEngine(address, num_cpus=num_cpus, num_gpus=num_gpus)
    raise ValueError(f"unknown engine {name!r}: choose 'local', 'thread' or 'ray'")


@dataclass(frozen=True)
class EngineSpec:
    """How a stage's tasks run: the config's ``[engine]`` (and ``[scan]``'s overrides) or the
    CLI's ``--engine/--workers/--address/--gpus-per-task/--cpus-per-gpu-task``."""

    name: str = "local"
    workers: int = 1
    address: str | None = None
    gpus_per_task: float = 1.0  # on a CUDA device; a CPU device's tasks never ask for GPUs
    cpus_per_gpu_task: float = 4.0  # a GPU task's CPUs (embed decodes on all but one); CPU: 1


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def build_engine(spec: EngineSpec, device: str, gpu_count: int | None = None) -> Engine:
    """The one engine builder (CLI and ``simgap run``): Ray tasks of a CUDA device ask for
    ``gpus_per_task`` GPUs (without, Ray hides every GPU from them), a CPU device's for none; a
    local pool on CUDA spreads its workers over the machine's GPUs (``gpu_count``: how many;
    None: ask torch)."""
    cuda = is_cuda(device)
    if spec.name == "ray":
        return RayEngine(
            spec.address or None,
            num_cpus=spec.cpus_per_gpu_task if cuda else 1.0,
            num_gpus=spec.gpus_per_task if cuda else 0.0,
        )
    if spec.name == "local" and cuda and spec.workers > 1 and ":" not in device:
        if gpu_count is None:
            import torch

            gpu_count = torch.cuda.device_count()
        return LocalEngine(spec.workers, gpu_count)
    return make_engine(spec.name, spec.workers, spec.address)


def task_device(device: str) -> str:
    """The device a task runs on, inside the task: under Ray with GPUs assigned only the task's
    GPUs are visible, so ``cuda:N`` names the first of them, ``cuda``; a local pool worker
    spread over GPUs (``LocalEngine.gpus``) maps ``cuda`` to its own GPU. Elsewhere unchanged."""
    if not is_cuda(device):
        return device
    if _ray_gpus():
        return "cuda"
    index = os.environ.get(GPU_ENV)
    if index is not None and device == "cuda":
        return f"cuda:{index}"
    return device


def _ray_gpus() -> list[Any]:
    """The GPUs Ray assigned to the current task; empty outside a Ray worker."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to learn we are not in a Ray task
    if ray is None or not ray.is_initialized():
        return []
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:
            return []
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - no Ray task context: not a Ray task
        return []


def task_cpus(engine: Engine) -> float | None:
    """CPUs each of the engine's tasks holds (None: the engine does not say)."""
    return engine.num_cpus if isinstance(engine, RayEngine) else None


@dataclass
class Executor:
    engine: Engine
    retries: int = 1

    def map(
        self,
        fn: Callable[[Any], Any],
        tasks: Sequence[Any],
        on_done: Callable[[int, int, Any], None] | None = None,
    ) -> list[Any]:
        """Run ``fn`` over ``tasks``; ``on_done(finished, total, record)`` follows progress."""
        results: list[Any] = [None] * len(tasks)
        pending = list(range(len(tasks)))
        errors: dict[int, tuple[str, str]] = {}
        finished = 0
        for _ in range(self.retries + 1):
            if not pending:
                break
            failed = []
            for j, ok, value in self.engine.run(fn, [tasks[i] for i in pending]):
                i = pending[j]
                if ok:
                    results[i] = value
                    errors.pop(i, None)
                    finished += 1
                    if on_done:
                        on_done(finished, len(tasks), value)
                else:
                    errors[i] = value
                    failed.append(i)
            pending = sorted(failed)
        if errors:
            # One line per failed task: the CLI prints it as is; tracebacks go to the attribute.
            summary = "; ".join(f"task {tasks[i]!r}: {m}" for i, (m, _) in sorted(errors.items()))
            raise ExecutorError(
                f"{len(errors)} task(s) failed after {self.retries} retries: {summary}",
                [tb for _, tb in errors.values()],
            )
        return results


class Progress:
    """Rate and ETA of a long stage, the project's one progress reporter. Two ways in:

    - as an executor's ``on_done(finished, total, record)``: a line per finished task, counting
      the records' ``rows``;
    - ``count(done, total)`` from inside one long loop (``total`` None if unknown): a line at
      most every ``every_s`` seconds, and at the end.
    """

    def __init__(
        self,
        label: str,
        log: Log | None,
        unit: str = "rows",
        every_s: float = 5.0,
    ):
        self.label, self.log, self.unit, self.every_s = label, log, unit, every_s
        self.start, self.rows = time.perf_counter(), 0
        self.last = -every_s

    def count(self, done: int, total: int | None = None) -> None:
        if self.log is None:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed - self.last < self.every_s and (total is None or done < total):
            return
        self.last = elapsed
        rate = done / max(elapsed, 1e-9)
        line = f"{self.label}: {done}" + (f"/{total}" if total is not None else "")
        line += f" {self.unit}, {rate:.0f} {self.unit}/s"
        if total is not None:
            line += f", ETA {(total - done) / rate if rate else float('inf'):.0f}s"
        self.log(line)

    def __call__(self, finished: int, total: int, record: Any) -> None:
        self.rows += int(record.get("rows", 0)) if isinstance(record, dict) else 0
        if self.log is None:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / finished * (total - finished)
        self.log(
            f"{self.label}: {finished}/{total} shards, {self.rows} rows, "
            f"{self.rows / max(elapsed, 1e-9):.0f} rows/s, ETA {eta:.0f}s"
        )
