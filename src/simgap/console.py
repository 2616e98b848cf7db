"""What ``simgap run`` shows: one line per stage, a live progress display (on a terminal) and,
from the CLI, the final table. Everything a stage logs goes to ``<run>/logs/<stage>.log``; its
tail is shown when the stage fails; ``verbose`` also streams it.

The runner and the stages log plain strings through a ``Log`` callable, and this module is that
callable: it reads the runner's stage events (``[run] X``, ``[done] X in 1.2s``, ``[cached] X``)
and files every other message under the stage running in the calling thread (a run's chains run
one per thread), so stage code needs no console of its own. It imports nothing of the project
but the run folder's names (:mod:`simgap.layout`, a leaf).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from simgap.layout import RunLayout

EVENT = re.compile(r"^\[(run|done|cached)\] (\S+)(?: in ([\d.]+)s)?$")
# parallel.Progress lines ("embed-pool: 3/8 shards, ...") and open_clip_train's batch lines.
COUNT = re.compile(r"^(?P<label>[^\[\]:]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>[a-z]+)")
EPOCH = re.compile(r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<done>\d+)/(?P<total>\d+)")
PLAIN_PROGRESS_EVERY_S = 120.0  # without a terminal: at most one progress line in 2 minutes
ETA_AFTER = 3  # stages run before an ETA is shown: one stage says little about the rest
TAIL_LINES = 20


def clock(seconds: float) -> str:
    """``75`` → ``1:15``; ``3725`` → ``1:02:05``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a text file ([] if it does not exist)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in deque(f, maxlen=lines)]


class RunConsole:
    """The ``Log`` of one run. ``stages`` is the plan's stage names in order, ``cached`` how many
    of them are cached (both for the counts and the ETA). ``live``: redraw a progress display
    (default: when ``out`` is a terminal); otherwise plain lines only."""

    def __init__(
        self,
        run_dir: Path,
        stages: Sequence[str],
        *,
        cached: int = 0,
        verbose: bool = False,
        out: IO[str] | None = None,
        live: bool | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.logs = RunLayout(self.run_dir).logs
        self.total = len(stages)
        self.to_run = self.total - cached
        self.width = max((len(s) for s in stages), default=0)
        self.verbose = verbose
        self.out = out if out is not None else sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.finished = 0  # stages done or cached
        self.ran = 0  # stages run (not cached) and done
        self.started = time.monotonic()
        self.first_run: float | None = None  # when the first stage that runs began
        self.last_plain_progress = self.started  # the first plain line after a quiet while
        self._lock = threading.RLock()
        self._thread = threading.local()
        self._files: dict[str, IO[str]] = {}
        self._bars: dict[str, Any] = {}  # stage -> rich task id
        self._active: list[str] = []
        self._progress: Any = None
        self._overall: Any = None

    # -------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> RunConsole:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            console = Console(file=self.out, force_terminal=True)
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._overall = self._progress.add_task("stages", total=self.total, note="")
            self._refresh_overall()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, _tb: Any) -> None:
        if error is not None:
            self.fail(error)
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
            for f in self._files.values():
                f.close()
            self._files.clear()

    def fail(self, error: BaseException) -> None:
        """Name the log of every stage that was running, with its tail when the error message
        does not already carry it (a training's error holds its last lines)."""
        with self._lock:
            for stage in list(self._active):
                path = self.logs / f"{stage}.log"
                if stage in self._files:
                    self._files[stage].flush()
                if isinstance(error, KeyboardInterrupt):
                    self._print(f"stage {stage} interrupted; its log: {path}")
                    continue
                self._print(f"stage {stage} failed; its log: {path}")
                if "\n" in str(error):
                    continue
                for line in tail(path):
                    self._print(f"  | {line}")

    # -------------------------------------------------------------------------- the Log

    def __call__(self, message: str) -> None:
        event = EVENT.match(message)
        with self._lock:
            if event:
                self._event(event.group(1), event.group(2), event.group(3))
                return
            stage = self._stage_of_thread()
            if stage is None:
                self._print(message)  # the runner's own notes ([clear], [retire])
                return
            self._write(stage, message)
            if self.verbose:
                self._print(f"[{time.strftime('%H:%M:%S')}] {message}")
            self._count(stage, message)

    def _event(self, kind: str, stage: str, seconds: str | None) -> None:
        if kind == "run":
            self._thread.stage = stage
            self._active.append(stage)
            if self.first_run is None:
                self.first_run = time.monotonic()
            self._write(stage, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage} started")
            if self._progress is not None:
                self._bars[stage] = self._progress.add_task(f"  {stage}", total=None, note="")
            return
        self.finished += 1
        if kind == "cached":
            status = "cached"
        else:
            self.ran += 1
            status = f"{float(seconds or 0):.1f}s"
            self._write(stage, f"--- stage {stage} done in {status}")
            self._close(stage)
            if getattr(self._thread, "stage", None) == stage:
                self._thread.stage = None
        line = f"[{self.finished:>{len(str(self.total))}}/{self.total}] {stage:<{self.width}}"
        line += f"  {status:>8}"
        if self._progress is None and kind == "done":
            line += f"  (elapsed {clock(time.monotonic() - self.started)}{self._eta_text()})"
        self._print(line)
        self._refresh_overall()

    # -------------------------------------------------------------------------- helpers

    def _stage_of_thread(self) -> str | None:
        stage = getattr(self._thread, "stage", None)
        if stage is None and len(self._active) == 1:
            return self._active[0]  # a helper thread of the one running stage
        return stage

    def _write(self, stage: str, message: str) -> None:
        f = self._files.get(stage)
        if f is None:
            # Created on a stage's first message: by then the runner has claimed the run folder.
            self.logs.mkdir(parents=True, exist_ok=True)
            f = self._files[stage] = open(self.logs / f"{stage}.log", "a", encoding="utf-8")
        f.write(message + "\n")
        f.flush()

    def _close(self, stage: str) -> None:
        f = self._files.pop(stage, None)
        if f is not None:
            f.close()
        if stage in self._active:
            self._active.remove(stage)
        bar = self._bars.pop(stage, None)
        if bar is not None and self._progress is not None:
            self._progress.remove_task(bar)

    def _count(self, stage: str, message: str) -> None:
        """A long stage's progress: its bar on a terminal, a throttled plain line otherwise."""
        found = COUNT.match(message)
        epoch = EPOCH.search(message)
        if found:
            done, total, what = int(found["done"]), int(found["total"]), found["unit"]
        elif epoch:
            done, total = int(epoch["done"]), int(epoch["total"])
            what = f"samples of epoch {int(epoch['epoch']) + 1}"
        else:
            return
        if self._progress is not None:
            bar = self._bars.get(stage)
            if bar is not None:
                self._progress.update(bar, completed=done, total=total, note=what)
            return
        now = time.monotonic()
        if now - self.last_plain_progress >= PLAIN_PROGRESS_EVERY_S:
            self.last_plain_progress = now
            self._print(f"    {stage}: {done}/{total} {what}")

    def _eta_text(self) -> str:
        """Stages left to run times the mean time of the stages run so far (cached ones are
        free). Rough: trainings take far longer than gap checks."""
        left = self.to_run - self.ran
        if self.first_run is None or self.ran < ETA_AFTER or left <= 0:
            return ""
        per_stage = (time.monotonic() - self.first_run) / self.ran
        return f", ETA ~{clock(per_stage * left)}"

    def _refresh_overall(self) -> None:
        if self._progress is None:
            return
        note = self._eta_text().removeprefix(", ")
        self._progress.update(
            self._overall,
            completed=self.finished,
            description=f"stage {min(self.finished + 1, self.total)} of {self.total}",
            note=note,
        )

    def _print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.out, flush=True)
