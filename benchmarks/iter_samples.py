"""The shared header walk against Python's tarfile stream reader, in one run.

    .venv/bin/python benchmarks/iter_samples.py [--samples 1000] [--px 64] [--repeats 7]

Writes one img2dataset-style tar of small JPEGs with captions (the embed pipeline's input), then
reads every sample with (a) ``simgap.data.tars.iter_samples`` and (b) the anchor: tarfile's
streaming reader grouping members by key (what iter_samples did before the walk), from the page
cache, best of ``--repeats``. Then the training side: every member through (c) webdataset's
``tar_file_iterator`` (what open_clip_train reads shards with) and (d) simgap's drop-in for it
(``simgap.train.tarstream``, which ``simgap._train_entry`` installs). The last line is one JSON
object: {"iter_samples_us_per_sample", "tarfile_us_per_sample", "speedup",
"webdataset_us_per_member", "train_reader_us_per_member", "train_reader_speedup", ...}.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from webdataset import tariterators

from simgap.data.tars import iter_samples, split_name
from simgap.train.tarstream import tar_file_iterator

sys.path.insert(0, str(Path(__file__).parent))
from embed import write_images  # noqa: E402 - the embed benchmark's JPEG shards


def tarfile_samples(path: str) -> int:
    """The anchor: tarfile's stream reader, members grouped by key."""
    n, current = 0, None
    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            key, _ = split_name(info.name)
            f = tar.extractfile(info)
            if f is not None:
                f.read()
            if key != current:
                n, current = n + 1, key
    return n


def members(reader: Callable, path: str) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in reader(fh))


def best_us(fn: Callable[[], int], repeats: int) -> float:
    best, n = float("inf"), 1
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--px", type=int, default=64, help="image side, pixels")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="simgap-bench-tars-"))
    try:
        write_images(root, a.samples, a.px, per_shard=a.samples)  # one shard: 00000.tar
        path = str(root / "00000.tar")
        ours = best_us(lambda: sum(1 for _ in iter_samples(path)), a.repeats)
        anchor = best_us(lambda: tarfile_samples(path), a.repeats)
        wds = tariterators.tar_file_iterator
        train = functools.partial(tar_file_iterator, fallback=wds)
        wds_us = best_us(lambda: members(wds, path), a.repeats)
        train_us = best_us(lambda: members(train, path), a.repeats)
    finally:
        shutil.rmtree(root)
    print(
        json.dumps(
            {
                "iter_samples_us_per_sample": round(ours, 1),
                "tarfile_us_per_sample": round(anchor, 1),
                "speedup": round(anchor / ours, 2),
                "webdataset_us_per_member": round(wds_us, 2),
                "train_reader_us_per_member": round(train_us, 2),
                "train_reader_speedup": round(wds_us / train_us, 2),
                "samples": a.samples,
                "px": a.px,
            }
        )
    )


if __name__ == "__main__":
    main()
