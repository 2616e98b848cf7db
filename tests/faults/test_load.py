"""Load: a scan, and a SemDeDup, of a base store at least 8x larger than the memory the test
allows the process, with the same results as a chunked numpy brute force.

The memory bound is measured, not assumed: the scan runs as a grandchild of a small wrapper that
reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the scan's peak resident set, memory-mapped
store pages included). The same command on a tiny store gives the baseline (interpreter, torch,
libraries); the scan of the big store may use at most ``store bytes / 8`` above it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from simgap.store import StoreWriter

from .faultlib import SIMGAP, cli_env, record

MODEL = {"arch": "load", "pretrained": None, "checkpoint_sha256": "c" * 64}
WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def _rows(seed: int, n: int, dim: int, near_dups: float = 0.0) -> np.ndarray:
    """Random unit rows; a fraction ``near_dups`` are noisy copies of 64 shared prototypes
    (cosine ~0.95 to each other), so that SemDeDup has duplicates to find across shards."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = int(n * near_dups)
    if m:
        protos = np.random.default_rng(0).standard_normal((64, dim), dtype=np.float32)
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.2 / dim**0.5)
        x[:m] = protos[rng.integers(0, 64, m)] + noise
        x[:m] /= np.linalg.norm(x[:m], axis=1, keepdims=True)
    return x.astype(np.float16)


def write_big_store(path: Path, shards: int, rows: int, dim: int) -> int:
    """A store of ``shards`` × ``rows`` random unit rows, written shard by shard (the test
    process never holds more than one shard)."""
    writer = StoreWriter(path, MODEL, dim, {"kind": "load-test"})
    records = []
    for s in range(shards):
        keys = pa.table({"key": pa.array([f"b{s:04d}{i:07d}" for i in range(rows)])})
        emb = _rows(1000 + s, rows, dim, near_dups=0.1)
        records.append(writer.write_shard(f"{s:05d}", emb, keys))
    writer.finish(records)
    return shards * rows * dim * 2


def peak_rss_kib(args: list, python: bool = False) -> int:
    """Peak RSS of ``simgap ARGS`` (or of ``python ARGS``) run as a grandchild."""
    cmd = [sys.executable, *map(str, args)] if python else [*SIMGAP, *map(str, args)]
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=3000,
    )
    rc, peak = proc.stdout.split()
    assert rc == "0", proc.stderr[-2000:]
    return int(peak)


def brute_force(base: Path, shards: int, rows: int, dim: int, tests: np.ndarray, k: int):
    """Chunked fp32 numpy: per-row max/argmax, per-test top-k over all shards."""
    t = tests.astype(np.float32)
    row_max, row_arg, best_sim, best_row = [], [], None, None
    for s in range(shards):
        emb = np.load(base / "emb" / f"{s:05d}.npy").astype(np.float32)
        sims = emb @ t.T  # (rows, M)
        row_max.append(sims.max(1))
        row_arg.append(sims.argmax(1))
        ids = np.broadcast_to(np.arange(s * rows, (s + 1) * rows)[:, None], sims.shape)
        cand_sim = sims if best_sim is None else np.concatenate([best_sim, sims])
        cand_row = ids if best_row is None else np.concatenate([best_row, ids])
        top = np.argsort(-cand_sim, axis=0, kind="stable")[:k]
        best_sim = np.take_along_axis(cand_sim, top, 0)
        best_row = np.take_along_axis(cand_row, top, 0)
    return np.concatenate(row_max), np.concatenate(row_arg), best_sim.T, best_row.T


def _scan_within_limit(root: Path, shards: int, rows: int, dim: int, tests_n: int, k: int):
    from simgap.scan import load_scan
    from simgap.store import write_store

    base = root / "base"
    size = write_big_store(base, shards, rows, dim)
    tests = _rows(7, tests_n, dim)
    write_store(root / "bench", tests, [f"t{i:05d}" for i in range(tests_n)], MODEL)
    write_big_store(root / "tiny", 1, 1000, dim)
    # Baseline: the same command on a tiny base (imports, tests, kernel set-up).
    baseline = peak_rss_kib(["scan", root / "tiny", "--benchmarks", root / "bench", "--topk", k,
                             "-o", root / "scan-tiny"])  # fmt: skip
    peak = peak_rss_kib(["scan", base, "--benchmarks", root / "bench", "--topk", k,
                         "-o", root / "scan"])  # fmt: skip
    limit_kib = size // 8 // 1024
    used = peak - baseline
    record("load", "scan", "within-limit" if used <= limit_kib else "over-limit",
           store_mib=size >> 20, limit_mib=limit_kib >> 10, used_mib=used >> 10)  # fmt: skip
    assert used <= limit_kib, f"scan used {used >> 10} MiB over baseline, limit {limit_kib >> 10}"

    result = load_scan(root / "scan")
    mx, arg, top_sim, top_row = brute_force(base, shards, rows, dim, tests, k)
    # `simgap scan` writes one column per benchmark (here one): rows x benchmarks.
    assert result.row_max.shape == (len(mx), 1)
    np.testing.assert_allclose(result.row_max[:, 0], mx, atol=1e-5)
    np.testing.assert_allclose(result.topk_sim, top_sim, atol=1e-5)
    # Indices must agree wherever the brute force is not a near-tie.
    same_arg = result.row_argmax[:, 0] == arg
    assert same_arg.mean() > 0.999, same_arg.mean()
    assert (result.topk_row[:, 0] == top_row[:, 0]).mean() > 0.99


SEMDEDUP_CHILD = """
import sys, numpy as np
from simgap.store import open_store
from simgap.select.semdedup import semdedup
store = open_store(sys.argv[1])
keep, stats = semdedup(store, int(sys.argv[3]), eps=0.1, seed=0, batch_rows=4096,
                       bucket_rows=int(sys.argv[4]), work_dir=sys.argv[5])
np.save(sys.argv[2], keep)
"""


def semdedup_brute_force(store, n_clusters: int, eps: float) -> np.ndarray:
    """Same centroids (seeded), then plain numpy: nearest centroid per row, and per cluster in
    row order keep a row iff its similarity to every row kept so far is <= 1 - eps. Clusters
    are gathered a group at a time, about 1 GiB of rows per pass over the store."""
    from simgap.select.clusters import train_centroids

    centroids = train_centroids(store, n_clusters, 0)
    cluster = np.concatenate(
        [(np.asarray(e, np.float32) @ centroids.T).argmax(1) for _, _, e in store.iter_blocks()]
    )
    keep = np.zeros(store.rows, bool)
    per_pass = max(1, int(n_clusters * (1 << 30) / max(1, store.rows * store.dim * 2)))
    thr = np.float32(1 - eps)
    for first in range(0, n_clusters, per_pass):
        group = np.flatnonzero((cluster >= first) & (cluster < first + per_pass))
        x = _gather(store, group)
        for c in range(first, min(first + per_pass, n_clusters)):
            sel = np.flatnonzero(cluster[group] == c)
            # above[i, j]: row j comes before row i and is a duplicate of it. A row with no such
            # j is kept whatever came before; only the others need the sequential rule (the
            # Python loop over every row took most of the 2 GiB test's time).
            xs = x[sel]
            above = np.tril(xs @ xs.T > thr, k=-1)
            kept = ~above.any(1)
            for i in np.flatnonzero(~kept):
                kept[i] = not above[i][kept].any()  # above[i, j >= i] is False
            keep[group[sel[kept]]] = True
    return keep


def _gather(store, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted global ids) as float32, reading each shard once."""
    out = []
    for s in store.shards:
        sel = rows[(rows >= s.offset) & (rows < s.offset + s.rows)] - s.offset
        if len(sel):
            out.append(np.asarray(store.read_emb(s.name)[sel], np.float32))
    return np.concatenate(out) if out else np.zeros((0, store.dim), np.float32)


def _semdedup_within_limit(root: Path, shards: int, rows: int, dim: int, clusters: int):
    from simgap.store import open_store

    base = root / "base"
    size = write_big_store(base, shards, rows, dim)
    # The baseline runs the same k-means (same clusters, same sample size) on a tiny store.
    write_big_store(root / "tiny", 1, 64 * clusters, dim)
    (root / "work").mkdir()
    bucket = shards * rows // 32
    script = ["-c", SEMDEDUP_CHILD]
    baseline = peak_rss_kib([*script, root / "tiny", root / "k0.npy", clusters, 64 * clusters,
                             root / "work"], python=True)  # fmt: skip
    peak = peak_rss_kib([*script, base, root / "keep.npy", clusters, bucket, root / "work"],
                        python=True)  # fmt: skip
    limit_kib = size // 8 // 1024
    used = peak - baseline
    record("load", "semdedup", "within-limit" if used <= limit_kib else "over-limit",
           store_mib=size >> 20, limit_mib=limit_kib >> 10, used_mib=used >> 10)  # fmt: skip
    assert used <= limit_kib, (
        f"semdedup used {used >> 10} MiB over baseline, limit {limit_kib >> 10}"
    )
    keep = np.load(root / "keep.npy")
    expected = semdedup_brute_force(open_store(base), clusters, 0.1)
    assert (~expected).sum() > 0.05 * len(expected), "the test data should hold duplicates"
    np.testing.assert_array_equal(keep, expected)


def test_semdedup_of_a_store_8x_the_memory_limit(tmp_path):
    # 128 MiB store of 32 shards, d = 512; limit 16 MiB above the baseline. 16 clusters of
    # ~8k rows each exceed the 4096-row bucket, so buckets are regrouped on disk and clusters
    # deduplicated from disk in blocks: the path whose memory used to grow with the store.
    _semdedup_within_limit(tmp_path, shards=32, rows=4096, dim=512, clusters=32)


@pytest.mark.extended
def test_semdedup_of_a_2_gib_store_within_256_mib(tmp_path):
    # The 8x ratio at a size that runs in minutes on 2 cores (an 8 GiB store never finished
    # there): 2 GiB of 128 shards, d = 512; 256 clusters of ~8k rows each exceed the bucket.
    _semdedup_within_limit(tmp_path, shards=128, rows=16384, dim=512, clusters=256)


def test_scan_of_a_store_8x_the_memory_limit(tmp_path):
    # 128 MiB store of 128 shards, d = 512; limit 16 MiB above the baseline. The scan holds
    # a shard in flight while the next is read ahead, each also as float32 (about 5x a 1 MiB
    # shard): the bound is per shard, so shards must be small beside the limit.
    _scan_within_limit(tmp_path, shards=128, rows=1024, dim=512, tests_n=64, k=5)


@pytest.mark.extended
def test_scan_of_a_2_gib_store_within_256_mib(tmp_path):
    # The 8x ratio at a size that runs in minutes on 2 cores: 2 GiB of 128 shards, d = 512.
    _scan_within_limit(tmp_path, shards=128, rows=16384, dim=512, tests_n=256, k=10)
