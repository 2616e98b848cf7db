"""Ray faults on a local cluster: a worker process SIGKILLed mid-task.

The killer is a thread of this test process that watches for Ray workers of *this* cluster (the
descendants of this process) whose title is ``ray::_call``, i.e. that are running a stage's task
right now, and SIGKILLs them. Ray retries a task whose worker died; the stage's output must then
equal the undisturbed in-process run byte for byte. A task whose worker dies on every try must
end the stage with an error naming its shard, not a hang.

The cluster is ``ray.init(num_cpus=2)`` with one-CPU tasks, as in the rest of the suite.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from simgap.parallel import Executor, ExecutorError, LocalEngine, RayEngine

from .faultlib import assert_same_tree, move_aside, record, write_pool, write_unit_store

TASK_TITLE = b"ray::_call"  # what Ray names a worker process while it runs RayEngine's task


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _busy_workers() -> list[int]:
    """Pids of this cluster's workers running a task now (other sessions' Ray is left alone)."""
    parent, title = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title[int(entry)] = f.read().split(b"\0")[0]
        except OSError:
            continue
        parent[int(entry)] = int(stat.rpartition(b")")[2].split()[1])
    me = os.getpid()

    def mine(pid: int) -> bool:
        for _ in range(16):
            pid = parent.get(pid, 0)
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    return [p for p, t in title.items() if t.startswith(TASK_TITLE) and mine(p)]


class Killer(threading.Thread):
    """SIGKILLs busy workers: ``kills`` of them (``None``: every one, until stopped), each once
    it has run ``after`` seconds."""

    def __init__(self, kills: int | None, after: float = 0.0):
        super().__init__(daemon=True)
        self.kills, self.after = kills, after
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        first_seen: dict[int, float] = {}
        while not self.stop.is_set() and (self.kills is None or len(self.killed) < self.kills):
            now = time.monotonic()
            for pid in _busy_workers():
                if now - first_seen.setdefault(pid, now) >= self.after and pid not in self.killed:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.killed.append(pid)
                    break
            time.sleep(0.002)

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=10)


def _survive(stage: str, run, out: Path, kills: int, after: float = 0.0) -> None:
    """``run(out, executor)`` undisturbed in this process, then on Ray with ``kills`` workers
    killed mid-task, in the same place: the outputs must be the same bytes."""
    run(out, Executor(LocalEngine(1)))
    reference = move_aside(out)
    with Killer(kills, after) as killer:
        run(out, Executor(RayEngine()))
    assert len(killer.killed) >= 1, "no worker was caught mid-task: the test proved nothing"
    assert_same_tree(reference, out)
    record("ray-kill", stage, "retried, same bytes", count=len(killer.killed))


@pytest.fixture(scope="module")
def scan_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayscan")
    # Shards big enough that a task lasts a few hundred ms: the killer finds it running.
    write_unit_store(root / "base", 120_000, 32, seed=1, shard_rows=30_000)
    write_unit_store(root / "bench", 300, 32, seed=2)
    return root


def _scan(root: Path):
    from simgap.scan.run import scan_benchmarks

    def run(out: Path, executor: Executor) -> None:
        scan_benchmarks(root / "base", [root / "bench"], out, topk=5, executor=executor)

    return run


def test_scan_survives_a_killed_ray_worker(ray_cluster, scan_stores):
    _survive("scan", _scan(scan_stores), scan_stores / "out", kills=1)


@pytest.mark.extended
def test_scan_survives_several_killed_ray_workers(ray_cluster, scan_stores):
    _survive("scan", _scan(scan_stores), scan_stores / "out-x", kills=3, after=0.05)


@pytest.mark.extended
def test_embed_survives_killed_ray_workers(ray_cluster, tmp_path, checkpoint):
    from simgap.embed import embed
    from simgap.models import ModelSpec

    write_pool(tmp_path / "pool", shards=4, per_shard=6)
    spec = ModelSpec("simgap-tiny", checkpoint=str(checkpoint))

    def run(out: Path, executor: Executor) -> None:
        embed(str(tmp_path / "pool"), out, spec, executor, batch_size=4, decode_workers=0)

    # after=0.3: past the worker's model load, into the shard's forward passes.
    _survive("embed", run, tmp_path / "store", kills=2, after=0.3)


def _big_pool(folder: Path, shards: int, per_shard: int) -> list[str]:
    from simgap.data.tarwrite import write_tar

    rng = np.random.default_rng(5)
    keys = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"m{s:02d}{i:04d}"
            samples.append((key, {"jpg": rng.bytes(200_000), "txt": key.encode()}))
            keys.append(key)
        write_tar(folder / f"{s:05d}.tar", samples)
    return keys


@pytest.mark.extended
def test_materialize_survives_killed_ray_workers(ray_cluster, tmp_path):
    from simgap.materialize import materialize
    from simgap.select.splitfile import write_split

    keys = _big_pool(tmp_path / "pool", shards=4, per_shard=40)
    write_split(tmp_path / "split", keys[::2], {"name": "half"})

    def run(out: Path, executor: Executor) -> None:
        materialize(tmp_path / "split", str(tmp_path / "pool"), out, executor=executor)

    _survive("materialize", run, tmp_path / "out", kills=2)


def test_a_task_whose_worker_always_dies_is_named_not_hung(ray_cluster, tmp_path):
    """Every try of the one shard's task is killed: Ray's retries, then the executor's, run out
    and the stage ends with an error naming the shard."""
    from simgap.materialize import materialize
    from simgap.select.splitfile import write_split

    keys = _big_pool(tmp_path / "pool", shards=1, per_shard=3)
    write_split(tmp_path / "split", keys, {"name": "all"})
    start = time.monotonic()
    with Killer(None) as killer, pytest.raises(ExecutorError) as err:
        materialize(
            tmp_path / "split",
            str(tmp_path / "pool"),
            tmp_path / "out",
            executor=Executor(RayEngine()),
        )
    message = str(err.value)
    assert "00000.tar" in message and "\n" not in message, message
    assert isinstance(err.value, RuntimeError)  # the CLI prints it as one line, exit 2
    assert len(killer.killed) >= 2 and time.monotonic() - start < 300
    record(
        "ray-kill", "materialize", "always killed: error naming the shard", count=len(killer.killed)
    )
