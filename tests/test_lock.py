"""Concurrent use: one writer per output folder (simgap.lock), with real processes; readers of a
finished store run side by side."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simgap.lock import LockedError, lock_path, output_lock
from simgap.store import write_store

SIMGAP = [sys.executable, "-m", "simgap.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODEL = {"arch": "test", "pretrained": None, "checkpoint_sha256": "a" * 64}

# Holds the lock of argv[1] until killed; says so on stdout once it does.
HOLDER = """
import sys, time
from simgap.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _refused(res: subprocess.CompletedProcess, folder: Path, pid: int) -> None:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("simgap: error: ")]
    assert f"{folder}: in use by pid {pid} on {socket.gethostname()}" in line, line


def test_second_writer_in_this_process_tree_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        with pytest.raises(LockedError, match=f"in use by pid {holder.pid} on "):
            with output_lock(out):
                pass
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
    finally:
        _kill(holder)
    # SIGKILL leaves the file behind, but not the lock: the kernel dropped the flock.
    assert lock_path(out).exists()
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists(), "a released lock leaves no file"


def test_lock_is_reentrant_in_one_process_and_beside_the_folder(tmp_path):
    out = tmp_path / "store"
    with output_lock(out) as path, output_lock(out):
        assert path == tmp_path / ".store.lock" and path.exists()
        assert not out.exists(), "taking the lock creates nothing inside the output"
    assert not path.exists()


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(0)
    base = write_store(
        tmp_path / "base", rng.standard_normal((30, 8)), [f"b{i}" for i in range(30)], MODEL
    )
    bench = write_store(
        tmp_path / "bench", rng.standard_normal((4, 8)), [f"t{i}" for i in range(4)], MODEL
    )
    return base.path, bench.path


def test_scan_embed_materialize_into_a_held_output_are_refused_at_once(tmp_path, stores):
    base, bench = stores
    (tmp_path / "keys.txt").write_text("b1\n")
    out = tmp_path / "out"
    commands = {
        "scan": ["scan", base, "--benchmarks", bench, "-o", out],
        "embed": ["embed", tmp_path / "no-such-pool", "-o", out, "--model", "simgap-tiny"],
        "materialize": ["materialize", tmp_path / "keys.txt", tmp_path / "none", "-o", out],
    }
    holder = _hold(out)
    try:
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                [*SIMGAP, *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for args in commands.values()
        ]
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            # Refused before any work (and before the missing source is even looked at).
            _refused(
                subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), out, holder.pid
            )
        assert time.monotonic() - start < 90
        assert not out.exists(), "a refused writer wrote"
    finally:
        _kill(holder)
    from simgap.cli import main

    assert main([str(a) for a in commands["scan"]]) == 0  # the killed holder left nothing stuck
    assert (out / "scan.json").exists() and not lock_path(out).exists()


def test_two_simgap_runs_on_one_run_folder(tmp_path):
    """A real `simgap run` holds its folder: a second is refused naming it; killed, it frees it."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [*SIMGAP, "run", "demo", "--run-dir", str(run_dir), "--set", "sources.world.scale=0.05"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "run.json").exists():  # the run is under way, holding its lock
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        res = subprocess.run(
            [*SIMGAP, "run", "demo", "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        _refused(res, run_dir, first.pid)
    finally:
        _kill(first)
    with output_lock(run_dir):  # not stuck after SIGKILL
        pass


READER = """
import hashlib, sys
from simgap.store import open_store
for _ in range(int(sys.argv[2])):
    s = open_store(sys.argv[1])
    s.verify()
    h = hashlib.sha256(s.embeddings().tobytes() + "\\n".join(s.keys()).encode()).hexdigest()
print(h)
"""


def test_two_processes_read_one_finished_store_at_once(tmp_path):
    rng = np.random.default_rng(1)
    store = write_store(
        tmp_path / "s",
        rng.standard_normal((2000, 16)),
        [f"k{i}" for i in range(2000)],
        MODEL,
        shard_rows=300,
    )
    import hashlib

    expected = hashlib.sha256(
        store.embeddings().tobytes() + "\n".join(store.keys()).encode()
    ).hexdigest()
    before = {p: p.read_bytes() for p in sorted(store.path.rglob("*")) if p.is_file()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(store.path), "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(2)
    ]
    with output_lock(store.path):  # a writer's lock elsewhere does not stop readers
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr
        assert stdout.strip() == expected
    after = {p: p.read_bytes() for p in sorted(store.path.rglob("*")) if p.is_file()}
    assert after == before, "reading changed the store"
