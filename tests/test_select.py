import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from simgap.data.tars import iter_samples, write_tar
from simgap.parallel import Executor, ExecutorError, LocalEngine
from simgap.select import far_pruned, gapmatch, near_pruned, random_split, resolve_size, union_score
from simgap.splits import materialize, read_split, write_split


def brute_gapmatch(pool, tests_by_bench, thresholds_by_bench):
    keep = np.ones(len(pool), bool)
    for tests, thr in zip(tests_by_bench, thresholds_by_bench, strict=True):
        sims = pool @ tests.T
        keep &= ~(sims > thr[None, :]).any(axis=1)
    return keep


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 3))
def test_gapmatch_equals_brute_force(seed, n_pool, n_bench):
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n_pool, 4)).astype(np.float32)
    tests = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(n_bench)]
    thrs = []
    margins = []
    for t in tests:
        sims = pool @ t.T
        # Some thresholds exactly equal to a similarity: strict '>' keeps that row.
        thr = rng.choice(sims.ravel(), size=len(t)).astype(np.float32)
        thrs.append(thr)
        margins.append((sims - thr[None, :]).max(axis=1))
    np.testing.assert_array_equal(gapmatch(margins), brute_gapmatch(pool, tests, thrs))


def test_near_far_order_and_ties():
    score = np.array([0.5, 0.9, 0.5, 0.1, 0.9], np.float32)
    near = near_pruned(score, 3)
    assert near.tolist() == [True, False, True, True, False]
    far = far_pruned(score, 3)
    # Ties at 0.5 are broken by row: row 0 before row 2.
    assert far.tolist() == [True, True, False, False, True]
    assert far_pruned(score, 2).tolist() == [False, True, False, False, True]
    assert not near_pruned(score, 0).any() and far_pruned(score, 5).all()
    with pytest.raises(ValueError, match="outside"):
        far_pruned(score, 6)


def test_union_and_random():
    a, b = np.array([0.1, 0.8]), np.array([0.5, 0.2])
    assert union_score([a, b]).tolist() == [0.5, 0.8]
    r1, r2 = random_split(100, 30, seed=7), random_split(100, 30, seed=7)
    assert r1.sum() == 30 and (r1 == r2).all()
    assert not (random_split(100, 30, seed=8) == r1).all()
    assert resolve_size(0.25, 200) == 50 and resolve_size(17, 200) == 17


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _pool(tmp_path, n_shards=3, per=4):
    folder = tmp_path / "pool"
    keys = []
    for s in range(n_shards):
        samples = []
        for i in range(per):
            k = f"p{s}{i:03d}"
            keys.append(k)
            samples.append((k, {"jpg": _jpeg(i), "txt": f"cap {k}".encode(), "json": b"{}"}))
        write_tar(folder / f"{s:05d}.tar", samples)
    return folder, keys


def test_materialize_keeps_every_member_and_counts(tmp_path):
    pool, keys = _pool(tmp_path)
    kept = keys[::2] + ["p_missing"]
    write_split(tmp_path / "split", kept, {"name": "t", "policy": "test"})
    got_keys, meta = read_split(tmp_path / "split")
    assert got_keys == set(kept) and meta["size"] == len(kept)
    ref = tmp_path / "ref"
    for cls in ["star", "circle"]:
        (ref / cls).mkdir(parents=True)
        (ref / cls / f"r-{cls}.jpg").write_bytes(_jpeg(1))
    (ref / "classnames.txt").write_text("star\ncircle\n")
    out = tmp_path / "out"
    summary = materialize(tmp_path / "split", str(pool), out, reference=ref)
    assert summary["kept"] == 6 and summary["missing"] == 1 and summary["reference"] == 2
    samples = [s for t in sorted(out.glob("*.tar")) for s in iter_samples(str(t))]
    assert sorted(k for k, _ in samples) == sorted(keys[::2] + ["r-star", "r-circle"])
    assert all(set(m) == {"jpg", "txt", "json"} for _, m in samples)
    captions = {k: m["txt"].decode() for k, m in samples}
    assert captions["r-circle"] == "a photo of a circle"
    assert captions[keys[0]] == f"cap {keys[0]}"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 8
    # A rerun reuses finished shards and gives the same bytes.
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    materialize(tmp_path / "split", str(pool), out, reference=ref)
    assert before == {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert pq.read_table(tmp_path / "split" / "keys.parquet").column("key").to_pylist() == sorted(
        kept
    )


def test_materialize_never_writes_hostile_members(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    with tarfile.open(pool / "00000.tar", "w") as tar:
        for name in ["../escape.txt", "/abs.txt", "good.txt"]:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    write_split(tmp_path / "split", ["good", "../escape", "/abs"], {"name": "h"})
    out = tmp_path / "out"
    summary = materialize(tmp_path / "split", str(pool), out)
    assert summary["kept"] == 1 and summary["skipped"]["unsafe_member"] == 2
    assert not (tmp_path / "escape.txt").exists()
    names = tarfile.open(out / "00000.tar").getnames()
    assert names == ["good.txt"]


def _fails_on_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return x * 10


def test_executor_runs_in_order_and_names_failures():
    ex = Executor(LocalEngine(1), retries=1)
    assert ex.map(_fails_on_odd, [0, 2, 4]) == [0, 20, 40]
    with pytest.raises(ExecutorError, match="odd 3"):
        ex.map(_fails_on_odd, [0, 3])


def test_executor_process_pool_equals_in_process():
    assert Executor(LocalEngine(2)).map(_fails_on_odd, [0, 2, 4, 6]) == [0, 20, 40, 60]
