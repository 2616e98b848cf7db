"""One executor interface, two engines: ``local`` (this machine) and ``ray`` (a cluster).

A stage hands the executor a picklable callable over one task (one shard) and the list of tasks;
the executor returns one record per task, in task order. Stages never know which engine ran them
(the img2dataset "distributor" split). Failures are retried a bounded number of times, then the
executor raises naming every failed task: nothing is dropped silently.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


class ExecutorError(RuntimeError):
    """Some tasks kept failing after their retries."""


class Engine(Protocol):
    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[tuple[bool, Any]]: ...


def _call(fn: Callable[[Any], Any], task: Any) -> tuple[bool, Any]:
    # Exceptions become records so one bad shard does not take the whole pool down.
    try:
        return True, fn(task)
    except Exception as e:  # noqa: BLE001 - reported with its traceback by the executor
        return False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"


@dataclass(frozen=True)
class LocalEngine:
    """In-process for one worker; a ``spawn`` process pool otherwise (safe with torch threads)."""

    workers: int = 1

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[tuple[bool, Any]]:
        if self.workers <= 1 or len(tasks) <= 1:
            return [_call(fn, t) for t in tasks]
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx, max_tasks_per_child=16) as pool:
            return list(pool.map(_call, [fn] * len(tasks), tasks))


@dataclass(frozen=True)
class RayEngine:
    """Runs tasks as Ray tasks; joins ``address`` or starts a local cluster.

    ``num_cpus`` per task is explicit because on small machines tasks that take every CPU starve
    Ray's own work and deadlock.
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[tuple[bool, Any]]:
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "engine 'ray' needs Ray: pip install 'ray[default]'"
            ) from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_call)
        return ray.get([remote.remote(fn, t) for t in tasks])


def make_engine(name: str, workers: int = 1, address: str | None = None) -> Engine:
    if name == "local":
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(address)
    raise ValueError(f"unknown engine {name!r}: choose 'local' or 'ray'")


@dataclass
class Executor:
    engine: Engine
    retries: int = 1

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        results: list[Any] = [None] * len(tasks)
        pending = list(range(len(tasks)))
        errors: dict[int, str] = {}
        for _ in range(self.retries + 1):
            if not pending:
                break
            outcomes = self.engine.run(fn, [tasks[i] for i in pending])
            failed = []
            for i, (ok, value) in zip(pending, outcomes, strict=True):
                if ok:
                    results[i] = value
                    errors.pop(i, None)
                else:
                    errors[i] = value
                    failed.append(i)
            pending = failed
        if errors:
            detail = "\n".join(f"- {tasks[i]!r}: {msg}" for i, msg in sorted(errors.items()))
            raise ExecutorError(f"{len(errors)} task(s) failed after retries:\n{detail}")
        return results
