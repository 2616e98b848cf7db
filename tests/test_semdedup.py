"""semdedup and the image-based filter against brute force; semdedup's memory bound."""

import json
import subprocess
import sys

import numpy as np
import pytest

from simgap.select import image_based, semdedup
from simgap.select.clusters import train_centroids
from simgap.select.semdedup import dedup_cluster
from simgap.store import write_store

MODEL = {"arch": "test", "checkpoint_sha256": "0"}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _with_duplicates(rng, n_base, n_dup, d=16, noise=0.03):
    base = _unit(rng.standard_normal((n_base, d)))
    src = rng.integers(0, n_base, n_dup)
    dups = _unit(base[src] + noise * rng.standard_normal((n_dup, d)))
    return _unit(np.concatenate([base, dups])[rng.permutation(n_base + n_dup)])


def brute_dedup(x, eps, rule):
    """The keep rules written as plainly as possible: a double loop over pairs."""
    thr = np.float32(1 - eps)
    s = x @ x.T
    keep = []
    for j in range(len(x)):
        earlier = [i for i in range(j) if (rule == "any" or i in keep)]
        if all(s[j, i] <= thr for i in earlier):
            keep.append(j)
    mask = np.zeros(len(x), bool)
    mask[keep] = True
    return mask


def test_keep_rules_differ_on_a_chain():
    # a ~ b and b ~ c above 1 - eps, a and c below: "kept" keeps a and c, "any" only a.
    t = np.deg2rad([0.0, 20.0, 40.0])
    x = np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)
    eps = 1 - np.cos(np.deg2rad(25))
    assert dedup_cluster(x, eps, "kept").tolist() == [True, False, True]
    assert dedup_cluster(x, eps, "any").tolist() == [True, False, False]
    with pytest.raises(ValueError, match="keep rule"):
        dedup_cluster(x, eps, "first")


@pytest.mark.parametrize("rule", ["kept", "any"])
def test_dedup_cluster_blocks_equal_brute_force(rule):
    x = _with_duplicates(np.random.default_rng(1), 60, 40)
    want = brute_dedup(x, 0.01, rule)
    assert 0 < want.sum() < len(x)
    for block in (7, 32, 1024):
        for chunk in (5, 1024):
            got = dedup_cluster(x, 0.01, rule, block=block, chunk=chunk)
            np.testing.assert_array_equal(got, want)
    # float16 rows (as spilled) are widened a block at a time; same answer as float32 rows.
    x16 = x.astype(np.float16)
    want16 = dedup_cluster(x16.astype(np.float32), 0.01, rule)
    np.testing.assert_array_equal(dedup_cluster(x16, 0.01, rule, block=7, chunk=5), want16)


@pytest.mark.parametrize("rule", ["kept", "any"])
def test_semdedup_equals_brute_force_on_a_store(tmp_path, rule):
    x = _with_duplicates(np.random.default_rng(2), 400, 200)
    store = write_store(tmp_path / "s", x, [f"k{i:04d}" for i in range(len(x))], MODEL, 128)
    x = store.embeddings().astype(np.float32)
    eps, k = 0.01, 8
    cents = train_centroids(store, k, seed=3)
    assign = (x @ cents.T).argmax(axis=1)
    want = np.zeros(len(x), bool)
    for c in range(k):
        rows = np.flatnonzero(assign == c)  # row order = "earlier"
        want[rows] = brute_dedup(x[rows], eps, rule)
    # One bucket, and many buckets (spilled files) give the same answer.
    keep, stats = semdedup(store, k, eps, seed=3, rule=rule)
    keep_b, stats_b = semdedup(store, k, eps, seed=3, rule=rule, bucket_rows=50, batch_rows=37)
    # Clusters (~75 rows) larger than the bucket are deduplicated from disk, 16 rows a block.
    keep_d, stats_d = semdedup(
        store, k, eps, seed=3, rule=rule, bucket_rows=50, batch_rows=37, block=16
    )
    np.testing.assert_array_equal(keep, want)
    np.testing.assert_array_equal(keep_b, want)
    np.testing.assert_array_equal(keep_d, want)
    assert stats.equals(stats_d)
    assert stats.equals(stats_b)
    assert stats.column("size").to_pylist() == np.bincount(assign, minlength=k).tolist()
    assert sum(stats.column("kept").to_pylist()) == int(want.sum())
    assert sum(stats.column("removed").to_pylist()) == len(x) - int(want.sum()) > 0


def test_image_based_equals_brute_force(tmp_path):
    rng = np.random.default_rng(4)
    pool = write_store(
        tmp_path / "pool",
        _unit(rng.standard_normal((500, 8))),
        [f"p{i}" for i in range(500)],
        MODEL,
        200,
    )
    # The reference set sits in one corner of the space: only some clusters are kept.
    ref_x = _unit(rng.standard_normal((30, 8)) * 0.3 + np.eye(8)[0])
    ref = write_store(tmp_path / "ref", ref_x, [f"r{i}" for i in range(30)], MODEL)
    keep = image_based(pool, ref, 16, seed=1)
    cents = train_centroids(pool, 16, seed=1)
    p, r = pool.embeddings().astype(np.float32), ref.embeddings().astype(np.float32)
    want = np.isin((p @ cents.T).argmax(axis=1), (r @ cents.T).argmax(axis=1))
    np.testing.assert_array_equal(keep, want)
    assert 0 < keep.sum() < len(keep)


_CHILD = """
import json, resource, sys
import numpy as np
import pyarrow as pa
pa.array(np.zeros(3, np.int64))  # imports pandas on first use: a fixed cost, paid up front
from simgap.store import open_store
from simgap.select.clusters import train_centroids
from simgap.select.semdedup import semdedup
store = open_store(sys.argv[1])
if sys.argv[2] == "baseline":
    # Everything but the streaming: imports, the k-means sample, BLAS thread buffers and one
    # cluster's working set.
    from simgap.select.clusters import nearest_centroid, sample_rows
    from simgap.select.semdedup import dedup_cluster
    cents = train_centroids(store, int(sys.argv[3]), 0, 6400)
    x = sample_rows(store, 1024, 1)
    nearest_centroid(x, cents)
    dedup_cluster(x, 0.05)
    out = {}
else:
    keep, stats = semdedup(
        store, int(sys.argv[3]), 0.05, 0, batch_rows=1024, bucket_rows=2000, sample=6400
    )
    out = {"kept": int(keep.sum()), "rows": len(keep)}
print(json.dumps(out))
"""

_WRAP = """
import resource, subprocess, sys
r = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], capture_output=True,
                   text=True, check=True)
print(r.stdout.strip())
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_kib(*args):
    out = subprocess.run(
        [sys.executable, "-c", _WRAP, _CHILD, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return json.loads(out[0]), int(out[1])


def test_semdedup_memory_stays_within_the_bucket_budget(tmp_path):
    rng = np.random.default_rng(6)
    n, d = 64_000, 512
    x = np.empty((n, d), np.float16)
    for a in range(0, n, 16_000):
        x[a : a + 16_000] = _unit(rng.standard_normal((16_000, d)))
    store = write_store(tmp_path / "big", x, [f"k{i:05d}" for i in range(n)], MODEL, 4_000)
    del x
    store_mib = n * d * 2 / 2**20  # 62.5 MiB of embeddings
    # 16 clusters of ~4000 rows, 2x the 2000-row bucket: memory must not follow the cluster
    # size (which grows with the store at a fixed cluster count). With 100 clusters of ~640
    # rows this test once passed at +0.0 MiB while a big store's clusters blew the bound.
    _, base_kib = _peak_kib(store.path, "baseline", 16)
    result, peak_kib = _peak_kib(store.path, "run", 16)
    assert result["rows"] == n and 0 < result["kept"] <= n
    extra_mib = (peak_kib - base_kib) / 1024
    # Budget: a 2000-row bucket as float16 plus one cluster of it as float32 (6 MiB), and
    # 1024 x 1024 float32 tiles; not a cluster (8 MiB as float32), not the store.
    print(f"semdedup peak: {extra_mib:+.1f} MiB over a {base_kib / 1024:.0f} MiB baseline")
    assert extra_mib < 0.15 * store_mib, (extra_mib, store_mib, base_kib / 1024)


def test_select_cli_semdedup_and_image_based_same_bytes(tmp_path):
    import pyarrow.parquet as pq

    from simgap.cli import main as cli_main

    rng = np.random.default_rng(7)
    x = _with_duplicates(rng, 150, 50)
    write_store(tmp_path / "pool", x, [f"k{i:04d}" for i in range(len(x))], MODEL, 64)
    write_store(tmp_path / "ref", _unit(rng.standard_normal((10, 16))), list("abcdefghij"), MODEL)
    outs = []
    for i in range(2):
        for policy, extra in (
            ("semdedup", ["--eps", "0.01"]),
            ("image-based", ["--reference", str(tmp_path / "ref")]),
        ):
            out = tmp_path / f"{policy}{i}"
            args = ["select", policy, str(tmp_path / "pool"), "-o", str(out), "--clusters", "5"]
            assert cli_main(args + extra) == 0
            outs.append({f: (out / f).read_bytes() for f in ("keys.txt", "keys.parquet")})
    assert outs[0] == outs[2] and outs[1] == outs[3]
    meta = json.loads((tmp_path / "semdedup0" / "split.json").read_text())
    assert meta["params"] == {"clusters": 5, "eps": 0.01, "rule": "kept"} and meta["removed"] > 0
    stats = pq.read_table(tmp_path / "semdedup0" / "clusters.parquet")
    assert sum(stats.column("size").to_pylist()) == len(x)
    assert sum(stats.column("removed").to_pylist()) == meta["removed"]
