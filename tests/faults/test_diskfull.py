"""Disk full, and a rerun over an older output killed half way: the previous state stays intact
(or is plainly marked unfinished), the error says what happened and where, and freeing space and
rerunning gives the same bytes as a run that never failed.

Disk full is a real small tmpfs (``mount -t tmpfs -o size=...``, root) filled with a ballast
file; where mounting is not allowed, the same failure comes from ``RLIMIT_FSIZE`` in a child
process (the write fails with EFBIG instead of ENOSPC).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from simgap.data.tarwrite import write_tar
from simgap.store import StoreError, open_store

from .faultlib import (
    assert_ok,
    assert_same_tree,
    assert_whole_files,
    noise_png,
    one_line_error,
    record,
    run_and_kill,
    run_cli,
    tree_files,
    write_pool,
    write_unit_store,
)
from .test_catalogue import cli

FULL_WORDS = ("No space left on device", "disk full", "File too large")


def _can_mount(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    subprocess.run(["umount", str(path)], check=False, capture_output=True, timeout=30)
    return True


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


def fill(disk: Path, leave_kib: int) -> Path:
    """A ballast file that leaves about ``leave_kib`` free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave_kib * 1024))
    return ballast


@pytest.fixture(scope="module")
def mountable(tmp_path_factory) -> bool:
    return _can_mount(tmp_path_factory.mktemp("probe") / "mnt")


def _full_error(res, *fragments: str) -> str:
    line = one_line_error(res, *fragments)
    assert any(w in line for w in FULL_WORDS), line
    return line


def test_embed_on_a_full_disk_fails_clearly_and_resumes(capsys, workdir, checkpoint, mountable):
    if not mountable:
        pytest.skip("tmpfs cannot be mounted here; test_scan_write_limit covers the fallback")
    root = workdir / "diskfull-embed"
    source = root / "pool"
    write_pool(source, shards=6, per_shard=3, seed=21)
    args = ["embed", source, "--checkpoint", checkpoint, "--batch-size", "4"]
    reference = root / "reference"
    assert cli(capsys, *args, "-o", reference).returncode == 0

    with small_disk(root / "disk", 512) as disk:
        keep = disk / "older-store"
        shutil.copytree(reference, keep)  # a finished store already on that disk
        before = tree_files(keep)
        ballast = fill(disk, leave_kib=24)
        res = cli(capsys, *args, "-o", disk / "store")
        record("disk-full", "embed", "error" if res.returncode == 2 else "other")
        _full_error(res)
        assert tree_files(keep) == before, "a failed write touched another store"
        assert_whole_files(disk / "store")
        with pytest.raises(StoreError):
            open_store(disk / "store")  # unfinished, and says so
        ballast.unlink()
        assert cli(capsys, *args, "-o", disk / "store").returncode == 0
        assert_same_tree(reference, disk / "store")
        record("disk-full", "embed", "survived")


def test_scan_on_a_full_disk_keeps_the_previous_result(capsys, workdir, mountable):
    if not mountable:
        pytest.skip("tmpfs cannot be mounted here; test_scan_write_limit covers the fallback")
    root = workdir / "diskfull-scan"
    base = write_unit_store(root / "base", 6000, 32, seed=31, shard_rows=1000).path
    bench = write_unit_store(root / "bench", 40, 32, seed=32).path
    with small_disk(root / "disk", 1024) as disk:
        out = disk / "scan"
        assert cli(capsys, "scan", base, "--benchmarks", bench, "-o", out).returncode == 0
        before = tree_files(out)
        ballast = fill(disk, leave_kib=8)
        res = cli(capsys, "scan", base, "--benchmarks", bench, "--topk", "50", "-o", out)
        record("disk-full", "scan", "error" if res.returncode == 2 else "other")
        _previous_or_unfinished(out, before)
        one_line_error(res)
        ballast.unlink()
        assert (
            cli(capsys, "scan", base, "--benchmarks", bench, "--topk", "50", "-o", out).returncode
            == 0
        )
        record("disk-full", "scan", "survived")
        assert any(w in res.stderr for w in FULL_WORDS), res.stderr


def _previous_or_unfinished(out: Path, before: dict[str, bytes]) -> None:
    """After a failed or killed rerun, a scan folder either still holds the previous result
    whole, or no longer claims to be finished (no scan.json)."""
    from simgap.scan import load_scan

    now = tree_files(out)
    if "scan.json" not in now:
        return
    mixed = sorted(k for k in now if before.get(k) != now[k])
    assert not mixed, f"scan.json of the old result now sits beside new files: {mixed}"
    load_scan(out)


def _limit_writes(limit: int):
    def preexec() -> None:
        # Ignore SIGXFSZ so that the write fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_scan_write_limit(workdir):
    """The fallback mechanism, on any machine: files larger than 64 kB cannot be written."""
    root = workdir / "fsize-scan"
    base = write_unit_store(root / "base", 40_000, 16, seed=41, shard_rows=20_000).path
    bench = write_unit_store(root / "bench", 30, 16, seed=42).path
    out = root / "scan"
    res = run_cli("scan", base, "--benchmarks", bench, "-o", out, preexec_fn=_limit_writes(65536))
    record("file-limit", "scan", "error" if res.returncode == 2 else "other")
    one_line_error(res)
    if out.exists():
        assert_whole_files(out)
    assert not (out / "scan.json").exists()
    assert_ok(run_cli("scan", base, "--benchmarks", bench, "-o", out))
    record("file-limit", "scan", "survived")
    assert any(w in res.stderr for w in FULL_WORDS), res.stderr


# ------------------------------------------------ reruns over an older output, killed midway


def _changed(path: Path):
    mtime = path.stat().st_mtime_ns

    def changed() -> bool:
        try:
            return path.stat().st_mtime_ns != mtime
        except FileNotFoundError:
            return False

    return changed


def test_reembed_of_a_changed_source_killed_midway_leaves_no_mixed_store(workdir, checkpoint):
    root = workdir / "reembed"
    source = root / "pool"
    write_pool(source, shards=4, per_shard=3, seed=51)
    store = root / "store"
    args = ["embed", source, "-o", store, "--checkpoint", checkpoint]
    assert_ok(run_cli(*args))
    old = open_store(store)
    old_emb = old.embeddings().copy()
    # The source changes: shard 2 gets other images under the same keys.
    rng = np.random.default_rng(52)
    write_tar(
        source / "00002.tar",
        [(f"p002{i:04d}", {"png": noise_png(rng), "txt": b"new"}) for i in range(3)],
    )
    shard = store / "emb" / "00002.npy"
    killed = run_and_kill(args, until=_changed(shard), delay=0)
    record("kill", "re-embed", "killed" if killed else "finished-before-kill")
    try:
        now = open_store(store)
    except StoreError:
        record("kill", "re-embed", "marked-unfinished")
    else:
        # Still claims to be finished: then it must still be the old store, whole.
        now.verify()
        np.testing.assert_array_equal(now.embeddings(), old_emb)
        record("kill", "re-embed", "previous-intact")
    assert_ok(run_cli(*args))
    open_store(store).verify()


def test_rescan_killed_midway_leaves_no_mixed_result(workdir):
    root = workdir / "rescan"
    base = write_unit_store(root / "base", 8000, 32, seed=61, shard_rows=1000).path
    bench_a = write_unit_store(root / "bench-a", 30, 32, seed=62).path
    bench_b = write_unit_store(root / "bench-b", 30, 32, seed=63).path
    out = root / "scan"
    assert_ok(run_cli("scan", base, "--benchmarks", bench_a, "-o", out))
    before = tree_files(out)
    killed = run_and_kill(
        ["scan", base, "--benchmarks", bench_b, "-o", out],
        until=_changed(out / "rows" / "00000.npy"),
        delay=0,
    )
    record("kill", "re-scan", "killed" if killed else "finished-before-kill")
    assert killed
    _previous_or_unfinished(out, before)
    record("kill", "re-scan", "survived")
