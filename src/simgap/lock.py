"""One writer per output folder: a lock file beside the folder, held with ``flock``.

Two ``simgap run`` on one run folder, or two ``embed``/``scan``/``materialize`` into one output,
would interleave their shards and done records. The second is refused at once, with an error that
names the holder (pid, host, command, start time).

The lock is an ``flock`` on ``<parent>/.<folder name>.lock``: the kernel drops it when the holder
dies however it dies (SIGKILL included), so a killed run never leaves it stuck; the file's content
only says who holds it. It lies beside the folder, not in it, so it is not an output (outputs are
compared byte for byte across runs) and survives a stage that replaces the folder. Within one
process the lock is re-entrant: a run's stages take the locks of their own outputs under the run's.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_HELD: dict[str, int] = {}  # lock file -> depth, in this process
_HELD_GUARD = threading.Lock()


class LockedError(RuntimeError):
    """The output folder is being written by another process."""


def lock_path(folder: Path | str) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder_text() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["simgap", *sys.argv[1:]]) if sys.argv else "simgap",
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file does not say which)"
    text = f"pid {pid} on {host} ({holder.get('command', '?')}, since {holder.get('since', '?')})"
    if host == socket.gethostname() and not _pid_alive(pid):
        # flock is still held, so a process that inherited it (a pool worker) is alive.
        text += "; that pid has exited, but a process it started still runs"
    return text


def _acquire(path: Path, folder: Path) -> int:
    """An fd holding an exclusive flock on ``path`` (the file at ``path`` now, not an unlinked
    one a releasing holder just removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"{folder}: in use by {_describe_holder(path)}; two writers would mix their "
                f"outputs: wait for it to finish or stop it (lock: {path})"
            ) from None
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"{path}: cannot lock ({e.strerror})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: try again


@contextlib.contextmanager
def output_lock(folder: Path | str) -> Iterator[Path]:
    """Hold the lock of ``folder`` (an output this process writes) for the ``with`` block."""
    folder = Path(folder)
    path = lock_path(folder)
    key = str(path)
    with _HELD_GUARD:
        if _HELD.get(key):
            _HELD[key] += 1
            fd = None
        else:
            fd = _acquire(path, folder)
            os.ftruncate(fd, 0)
            os.write(fd, _holder_text().encode())
            _HELD[key] = 1
    try:
        yield path
    finally:
        with _HELD_GUARD:
            _HELD[key] -= 1
            if fd is not None:
                del _HELD[key]
                # Unlink while still holding the lock: a waiter that opened the old file sees
                # its inode gone and retries on a new one (see _acquire).
                path.unlink(missing_ok=True)
                os.close(fd)


def locks_output(param: str, unless: str | None = None) -> Callable[[F], F]:
    """Decorate an entry point so that it holds the lock of its argument ``param`` (a folder)
    while it runs; not when its argument ``unless`` is true (a dry run writes nothing)."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if unless is not None and bound.arguments.get(unless):
                return fn(*args, **kwargs)
            with output_lock(bound.arguments[param]):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
