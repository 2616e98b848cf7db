"""Helpers of the fault suite (fixtures live in conftest.py).

Shared machinery of the fault suite: tiny worlds, real CLI subprocesses, real SIGKILLs.

Every kill test follows one pattern: run a command uninterrupted, move its output aside, run it
again in the *same* place and SIGKILL its whole process group at a seeded random point, rerun it
to completion, then compare the final outputs byte for byte with the uninterrupted run (same
paths, because some outputs record absolute paths), check that every output file under its final
name parses whole, and that no key was lost or duplicated.

Counts (faults injected / survived, inputs tried, outcomes) are collected by ``record`` and
printed at the end of the session; set ``SIMGAP_FAULT_STATS=/path.jsonl`` to keep the rows and
``SIMGAP_FAULT_SUMMARY=/path.json`` for their summary (``summarize``: kills survived per stage,
inputs tried per reader by outcome, load ratios held, tracebacks seen).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from simgap.data.tarwrite import write_tar

SIMGAP = [sys.executable, "-m", "simgap.cli"]
# A folder name no stage may mangle: spaces, a quote-free shell metacharacter, non-ASCII.
ODD_NAME = "dir with spaces & ünïcødé 数据"
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # simgap.io.write_atomic's temp names

_STATS: list[dict] = []
# CLI runs that ran to their end (run_cli), and how many of them printed a Python traceback
# (the contract is one ``simgap: error:`` line; killed runs are not counted).
CLI_RUNS = {"runs": 0, "tracebacks": 0}


def record(kind: str, stage: str, outcome: str, **extra) -> None:
    """Note one fault injected / input tried and what happened (``outcome``)."""
    _STATS.append({"kind": kind, "stage": stage, "outcome": outcome, **extra})


def summarize(rows: list[dict], cli_runs: dict, tests: dict) -> dict:
    """The fault section's numbers from one session's ``record`` rows.

    ``kills``: per kind of kill (``kill``: a CLI's process group; ``ray-kill``: Ray workers) and
    stage, points per outcome and the kills injected. ``inputs``: per reader (fuzz, catalogue,
    hostile inputs), inputs tried per outcome. ``load``: per stage, store size, memory limit
    above the baseline, used, their ratio and whether it held. ``other``: disk-full and file
    limits. ``tracebacks``: finished CLI runs whose stderr held a traceback, and the failed tests
    (in-process, an unexpected exception type fails its test); ``clean``: neither."""
    kills: dict = {}
    inputs: dict = {}
    load: dict = {}
    other: dict = {}
    for r in rows:
        n = r.get("count", 1)  # a fuzz row stands for ``count`` inputs with the same outcome
        kind, stage, outcome = r["kind"], r["stage"], r["outcome"]
        if kind in ("kill", "ray-kill"):
            k = kills.setdefault(kind, {}).setdefault(stage, {"points": 0, "kills": 0})
            k["points"] += 1 if kind == "kill" else 0
            k["kills"] += r.get("kills", 1) if kind == "kill" else n
            k[outcome] = k.get(outcome, 0) + (1 if kind == "kill" else n)
        elif kind in ("fuzz", "input", "hostile"):
            reader = stage if kind != "hostile" else f"{stage} (hostile)"
            source = "fuzz" if kind == "fuzz" else "catalogue"
            i = inputs.setdefault(source, {}).setdefault(reader, {"tried": 0})
            i["tried"] += n
            i[outcome] = i.get(outcome, 0) + n
        elif kind == "load":
            load[stage] = {
                "store_mib": r.get("store_mib"),
                "limit_mib": r.get("limit_mib"),
                "used_mib": r.get("used_mib"),
                "ratio": round(r["store_mib"] / r["limit_mib"], 2) if r.get("limit_mib") else None,
                "held": outcome == "within-limit",
            }
        else:
            o = other.setdefault(kind, {}).setdefault(stage, {})
            o[outcome] = o.get(outcome, 0) + n
    failed = tests.get("failed", [])
    return {
        "tests": {k: (len(v) if isinstance(v, list) else v) for k, v in tests.items()},
        "kills": kills,
        "inputs": inputs,
        "load": load,
        "other": other,
        "tracebacks": {
            "cli_runs": cli_runs["runs"],
            "cli_tracebacks": cli_runs["tracebacks"],
            "failed_tests": failed,
        },
        # The suite's claim: every test passed and no finished CLI run printed a traceback.
        "clean": not failed and not cli_runs["tracebacks"],
    }


# ------------------------------------------------------------------------ running the CLI


def cli_env(**extra: str) -> dict[str, str]:
    # One thread per process: the machine has 2 cores and other tests run beside these.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return {**env, **extra}


def run_cli(*args, timeout: float = 600, env=None, preexec_fn=None, cwd=None):
    proc = subprocess.run(
        [*SIMGAP, *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=env or cli_env(),
        preexec_fn=preexec_fn,
        cwd=cwd,
    )
    CLI_RUNS["runs"] += 1
    CLI_RUNS["tracebacks"] += "Traceback (most recent call last)" in proc.stderr
    return proc


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"


def one_line_error(proc, *fragments: str) -> str:
    """The CLI's contract for bad input: exit 2, one stderr line ``simgap: error: ...``."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("simgap: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def run_and_kill(
    args: list,
    *,
    after_lines: int = 0,
    pattern: str = "",
    after_file: Path | None = None,
    watch: Path | None = None,
    after_files: int = 0,
    until=None,
    delay: float = 0.0,
    timeout: float = 600,
) -> bool:
    """Start the CLI in its own process group; SIGKILL the group ``delay`` seconds after the
    trigger (the ``after_lines``-th stderr line matching ``pattern``, ``after_file`` existing and
    ``after_files`` final files under ``watch``, ``until()`` true).
    Returns True if it was killed, False if it finished first."""
    proc = subprocess.Popen(
        [*SIMGAP, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=cli_env(),
        start_new_session=True,
    )
    seen = [0]
    rx = re.compile(pattern)

    def read() -> None:
        for line in proc.stderr:
            if rx.search(line):
                seen[0] += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.monotonic()
    fired: float | None = None
    killed = False
    while proc.poll() is None:
        now = time.monotonic()
        if now - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{args} ran past {timeout}s")
        if (
            fired is None
            and seen[0] >= after_lines
            and (after_file is None or after_file.exists())
            and (watch is None or _count_files(watch) >= after_files)
            and (until is None or until())
        ):
            fired = now
        if fired is not None and now - fired >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    reader.join(timeout=5)
    if killed:
        # Children (process pools, the training subprocess) share the group: make sure they died.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


# ------------------------------------------------------------------------ checking outputs


def _count_files(root: Path) -> int:
    try:
        return sum(1 for p in Path(root).rglob("*") if not TEMP_FILE.match(p.name) and p.is_file())
    except OSError:  # a folder renamed or removed while walking
        return 0


def tree_files(root: Path) -> dict[str, bytes]:
    """Every final output file (write_atomic temp names excluded) → bytes."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not TEMP_FILE.match(p.name):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def assert_same_tree(expected: Path, got: Path, ignore: tuple[str, ...] = ()) -> None:
    a = {k: v for k, v in tree_files(expected).items() if not any(re.search(i, k) for i in ignore)}
    b = {k: v for k, v in tree_files(got).items() if not any(re.search(i, k) for i in ignore)}
    assert sorted(a) == sorted(b), f"files differ: {sorted(set(a) ^ set(b))}"
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"bytes differ after kill + rerun: {differ}"


def assert_whole_files(root: Path) -> int:
    """Every output under its final name parses completely; returns how many were checked."""
    n = 0
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file() or TEMP_FILE.match(p.name):
            continue
        n += 1
        if p.suffix == ".npy":
            np.load(p, allow_pickle=False)
        elif p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".tar":
            read_tar_whole(p)
        elif p.suffix == ".pt":
            import torch

            torch.load(p, weights_only=True, map_location="cpu")
    return n


def read_tar_whole(path: Path) -> dict[str, bytes]:
    """All members; fails on a cut member or a missing end-of-archive marker."""
    data = Path(path).read_bytes()
    assert len(data) % 512 == 0 and data[-1024:] == b"\0" * 1024, f"{path}: no end marker"
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            f = tar.extractfile(info)
            body = f.read() if f else b""
            assert len(body) == info.size, f"{path}: {info.name} cut"
            members[info.name] = body
    return members


def tar_keys(paths) -> list[str]:
    keys = []
    for p in paths:
        names = read_tar_whole(p)
        keys += sorted({n.split(".", 1)[0] for n in names})
    return keys


def move_aside(path: Path, suffix: str = ".reference") -> Path:
    dest = path.with_name(path.name + suffix)
    shutil.rmtree(dest, ignore_errors=True)
    path.rename(dest)
    return dest


# ------------------------------------------------------------------------ tiny inputs


def png(rgb, size: int = 16, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def jpeg(rgb, size: int = 16, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), rgb).save(buf, "JPEG")
    return buf.getvalue()


def noise_png(rng: np.random.Generator, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_pool(folder: Path, shards: int, per_shard: int, seed: int = 0, prefix="p") -> list[str]:
    """img2dataset-layout shards of noise PNGs with captions; returns all keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{s:03d}{i:04d}"
            caption = f"noise {s} {i}".encode()
            samples.append((key, {"png": noise_png(rng), "txt": caption}))
            keys.append(key)
        write_tar(folder / f"{s:05d}.tar", samples)
    return keys


def write_unit_store(path: Path, n: int, dim: int, seed: int, model=None, shard_rows=None):
    from simgap.store import write_store

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    keys = [f"k{seed}-{i:07d}" for i in range(n)]
    model = model or {"arch": "test", "pretrained": None, "checkpoint_sha256": "0" * 64}
    return write_store(path, emb, keys, model, shard_rows=shard_rows or max(n, 1))
