"""Materialize throughput against a raw sequential read of the same tars, in one run.

    .venv/bin/python benchmarks/materialize.py [--shards 8] [--samples 400] [--kb 40] [--keep 1.0]
        [--shard-size 0] [--engine thread] [--workers 4]

Writes webdataset shards of random bytes (jpg/txt/json members), then, each from a cold page
cache (posix_fadvise DONTNEED on every input tar), interleaved ``--repeats`` times, best of each:
(a) reads every tar sequentially in 4 MiB blocks; (b) copies every tar whole with
copy_file_range and fsyncs it (``cp`` + ``sync``: the ceiling for any durable copy of these
bytes on this disk); (c) materializes a split keeping ``--keep`` of the samples, as
``simgap materialize`` runs by default (one output shard per input, 4 IO threads; ``--shard-size
N`` reshards). All rates are input megabytes per second. The last line is one JSON object:
{"materialize_mb_per_s", "read_mb_per_s", "ratio", "copy_mb_per_s", "ratio_to_copy", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from simgap.data.tarwrite import write_tar
from simgap.materialize import materialize
from simgap.parallel import Executor, make_engine
from simgap.select.splitfile import write_split


def make_pool(root: Path, shards: int, samples: int, kb: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    for s in range(shards):
        part = []
        for i in range(samples):
            key = f"p{s:03d}{i:05d}"
            size = int(kb * 1024 * rng.uniform(0.5, 1.5))
            part.append(
                (
                    key,
                    {
                        "jpg": rng.bytes(size),
                        "txt": f"a caption for {key}".encode(),
                        "json": json.dumps({"key": key}).encode(),
                    },
                )
            )
            keys.append(key)
        write_tar(root / f"{s:05d}.tar", part)
    return keys


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path]) -> float:
    drop_cache(paths)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 22):
                pass
    return time.perf_counter() - start


def raw_copy(paths: list[Path], out: Path) -> float:
    """The ceiling for any durable copy of these bytes: each tar whole, in the kernel
    (copy_file_range), fsync'd, from a cold cache, as ``cp`` then ``sync`` would."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    drop_cache(paths)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb") as src, open(out / p.name, "wb") as dst:
            size, offset = os.fstat(src.fileno()).st_size, 0
            while offset < size:
                offset += os.copy_file_range(src.fileno(), dst.fileno(), size - offset, offset)
            os.fsync(dst.fileno())
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed


def run_materialize(
    split: Path, paths: list[Path], out: Path, shard_size: int, engine: str, workers: int
):
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(paths)
    start = time.perf_counter()
    summary = materialize(
        split,
        "::".join(map(str, paths)),
        out,
        shard_size=shard_size or None,
        executor=Executor(make_engine(engine, workers)),
    )
    return time.perf_counter() - start, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=400, help="samples per input shard")
    ap.add_argument("--kb", type=int, default=40, help="mean image member size, KiB")
    ap.add_argument("--keep", type=float, default=1.0, help="fraction of samples kept")
    ap.add_argument(
        "--shard-size", type=int, default=0, help="samples per output shard (0: one per input)"
    )
    ap.add_argument("--engine", choices=["thread", "local"], default="thread")
    ap.add_argument("--workers", type=int, default=4, help="as `simgap materialize` runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    a = ap.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="simgap-bench-mat-"))
    pool = root / "pool"
    keys = make_pool(pool, a.shards, a.samples, a.kb)
    paths = sorted(pool.glob("*.tar"))
    rng = np.random.default_rng(1)
    kept = [k for k in keys if rng.random() < a.keep]
    write_split(root / "split", kept, {"name": "bench"})
    mb = sum(p.stat().st_size for p in paths) / 1e6
    reads, copies, mats = [], [], []
    for _ in range(a.repeats):  # interleaved so that load from other processes hits all alike
        reads.append(raw_read(paths))
        copies.append(raw_copy(paths, root / "copy"))
        t, summary = run_materialize(
            root / "split", paths, root / "out", a.shard_size, a.engine, a.workers
        )
        mats.append(t)
        assert summary["kept"] == len(kept), summary
    read_rate, copy_rate, mat_rate = mb / min(reads), mb / min(copies), mb / min(mats)
    if not a.dir:
        shutil.rmtree(root)
    print(
        json.dumps(
            {
                "materialize_mb_per_s": round(mat_rate, 1),
                "read_mb_per_s": round(read_rate, 1),
                "ratio": round(mat_rate / read_rate, 3),
                "copy_mb_per_s": round(copy_rate, 1),
                "ratio_to_copy": round(mat_rate / copy_rate, 3),
                "input_mb": round(mb, 1),
                "kept_fraction": a.keep,
                "samples": len(keys),
                "engine": a.engine,
                "workers": a.workers,
                "shard_size": a.shard_size or "per input",
            }
        )
    )


if __name__ == "__main__":
    main()
