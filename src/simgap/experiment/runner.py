"""Cached stages: each stage's result is stored in ``stages/<name>.json`` under a key of its
inputs (its config values plus the keys of the stages it reads). A rerun skips stages whose key is
unchanged, so a killed run resumes and a changed knob redoes only what depends on it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgap.io import fingerprint, read_json, write_bytes, write_json
from simgap.layout import RunLayout
from simgap.types import Log

Results = dict[str, Any]


def stage_key(*parts: Any) -> str:
    return fingerprint(parts)[:16]


# ----------------------------------------------------------------------------- stages and runner


@dataclass(frozen=True)
class Stage:
    """One cached step. ``fn`` gets the results of the stages run so far."""

    name: str
    inputs: Any  # the config values it reads (JSON data)
    fn: Callable[[Results], Any]
    after: tuple[str, ...] = ()
    owns: tuple[str, ...] = ()  # run-relative folders it writes: cleared when its key changes
    # Stages of one chain run in order (a seed's train -> evaluate); chains run side by side,
    # each stage as soon as the stages in ``after`` are done.
    chain: str | None = None


# A stage record: its key, its result (any JSON) and its wall time.
STAGE_RECORD = {"key": str, "result": object, "seconds": float}


class Runner:
    """Computes every stage's key, runs the stages whose cached key differs, records timings."""

    def __init__(self, run_dir: Path, stages: list[Stage], log: Log):
        self.dir = Path(run_dir)
        self.stages = stages
        self.log = log
        self.timings: dict[str, float] = {}
        self.results: Results = {}
        self.keys: dict[str, str] = {}
        for s in stages:
            missing = [a for a in s.after if a not in self.keys]
            if missing:
                raise ValueError(f"stage {s.name} comes before {missing}, which it reads")
            self.keys[s.name] = stage_key(s.inputs, [self.keys[a] for a in s.after])

    def _record(self, name: str) -> Path:
        return RunLayout(self.dir).stage_record(name)

    def cached(self, name: str) -> dict | None:
        path = self._record(name)
        if path.is_file():
            try:
                record = read_json(path, STAGE_RECORD)
            except ValueError as e:  # damaged: the stage runs again, its inputs are still there
                self.log(f"[damaged] {e}")
                return None
            if record["key"] == self.keys[name]:
                return record
        return None

    def plan(self) -> list[dict[str, Any]]:
        return [
            {"stage": s.name, "key": self.keys[s.name], "cached": self.cached(s.name) is not None}
            for s in self.stages
        ]

    def run(self, s: Stage) -> Any:
        record = self.cached(s.name)
        if record is not None:
            self.log(f"[cached] {s.name}")
            self.timings[s.name] = record["seconds"]
            self.results[s.name] = record["result"]
            return record["result"]
        self._claim(s)
        self.log(f"[run] {s.name}")
        start = time.perf_counter()
        result = s.fn(self.results)
        seconds = round(time.perf_counter() - start, 3)
        write_json(
            self._record(s.name), {"key": self.keys[s.name], "result": result, "seconds": seconds}
        )
        self.timings[s.name] = seconds
        self.results[s.name] = result
        self.log(f"[done] {s.name} in {seconds:.1f}s")
        return result

    def _claim(self, s: Stage) -> None:
        """A stage resumes its own partial output, but never builds on output made for another key
        (a resized split must not reuse the old split's shards or checkpoints)."""
        marker = RunLayout(self.dir).stage_marker(s.name)
        started = (
            marker.read_bytes().decode("utf-8", "replace").strip() if marker.is_file() else None
        )
        if started != self.keys[s.name]:
            for folder in s.owns:
                if (self.dir / folder).exists():
                    self.log(f"[clear] {folder}: made for other inputs")
                    shutil.rmtree(self.dir / folder)
            write_bytes(marker, (self.keys[s.name] + "\n").encode())


def execute(runner: Runner, parallel: int) -> None:
    """Stages in plan order; each run of consecutive chain stages goes to a thread pool (each
    training is its own process: several single-threaded trainings side by side use a small
    machine's cores better than one multi-threaded training of a tiny model)."""
    stages = runner.stages
    i = 0
    while i < len(stages):
        if stages[i].chain is None:
            runner.run(stages[i])
            i += 1
            continue
        j = i
        while j < len(stages) and stages[j].chain is not None:
            j += 1
        _run_block(runner, stages[i:j], parallel)
        i = j


def _run_block(runner: Runner, stages: list[Stage], parallel: int) -> None:
    """Up to ``parallel`` stages at a time. A chain's stages run in order, and a stage starts as
    soon as the stages it reads (``after``) are done, so one split's seeds train side by side
    once its shards exist: no slot waits for a long chain to end. Among the stages ready to
    start, plan order first. After a failure nothing new starts; the first failure is raised
    once the running stages end."""
    block = {s.name for s in stages}
    waits_for: dict[str, list[str]] = {}  # the previous stage of its chain, and what it reads
    last: dict[str | None, str] = {}
    for s in stages:
        earlier = [last[s.chain]] if s.chain in last else []
        waits_for[s.name] = earlier + [a for a in s.after if a in block]
        last[s.chain] = s.name
    slots = max(1, parallel)
    pending = list(stages)
    done: set[str] = set()
    running: dict[Future, Stage] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(slots) as pool:
        while pending or running:
            while error is None and len(running) < slots:
                # pending keeps plan order: the first ready stage is the earliest planned.
                # Every stage waits only for earlier ones, so while none runs the first
                # pending stage is ready.
                s = next((s for s in pending if done.issuperset(waits_for[s.name])), None)
                if s is None:
                    break
                pending.remove(s)
                running[pool.submit(runner.run, s)] = s
            if not running:
                break  # after a failure: what is pending never starts
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                s = running.pop(f)
                if f.exception() is not None:
                    error = error or f.exception()
                else:
                    done.add(s.name)
    if error is not None:
        raise error
