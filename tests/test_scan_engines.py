"""The per-shard scan on every engine, and its resume after a kill: same bytes as one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from simgap.parallel import Executor, LocalEngine, RayEngine
from simgap.scan import (
    KernelConfig,
    ScanOptions,
    load_scan,
    load_tests_table,
    scan_arrays,
    scan_store,
)
from simgap.store import StoreWriter, open_store, write_store

MODEL = {"arch": "test", "pretrained": "none"}


def unit_fp16(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float16)


def make_store(path: Path, x: np.ndarray, sizes: list[int], prefix: str = "p"):
    """A store whose shards have the given sizes (zero-size shards included)."""
    assert sum(sizes) == len(x)
    writer = StoreWriter(path, MODEL, x.shape[1], {"kind": "array"})
    records, start = [], 0
    for i, n in enumerate(sizes):
        keys = pa.table(
            {"key": pa.array([f"{prefix}{start + j:06d}" for j in range(n)], pa.string())}
        )
        records.append(writer.write_shard(f"{i:05d}", x[start : start + n], keys))
        start += n
    return writer.finish(records)


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every output file (temp files of killed writes start with '.')."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    rng = np.random.default_rng(11)
    x = unit_fp16(rng.standard_normal((900, 16)))
    x[500:520] = x[0]  # duplicate rows across shards: ties broken by row id in every merge
    t = unit_fp16(rng.standard_normal((40, 16)))
    sims = (x.astype(np.float64) @ t.astype(np.float64).T).astype(np.float32)
    thr = np.quantile(sims, 0.95, axis=0).astype(np.float32)
    store = make_store(tmp_path_factory.mktemp("s") / "base", x, [250, 0, 300, 1, 349])
    return store, t, thr


def run_scan(store, t, thr, out: Path, executor: Executor | None = None, precision="auto"):
    info = pa.table({"benchmark": ["b"] * len(t), "key": [f"t{i}" for i in range(len(t))]})
    cfg = KernelConfig(precision)
    opts = ScanOptions(topk=6, out_dir=out, executor=executor, test_info=info, config=cfg)
    return scan_store(store, t, thr, opts)


def test_local_pool_and_ray_equal_one_process(case, tmp_path):
    store, t, thr = case
    one = run_scan(store, t, thr, tmp_path / "one")
    # The per-shard merge equals the single-stream scan of all rows.
    stream = scan_arrays([(0, store.embeddings())], t, thr, topk=6)
    for name in ("topk_sim", "topk_row", "count_above", "row_max", "row_argmax", "row_margin"):
        np.testing.assert_array_equal(getattr(one, name), getattr(stream, name), err_msg=name)
    want = folder_bytes(tmp_path / "one")
    assert "done/00001.json" in want and "parts/00001.npy" in want  # the zero-size shard
    # Every screen gives the same bytes: the screen only decides what is recomputed exactly.
    for precision in ("fp32", "bf16", "int8"):
        run_scan(store, t, thr, tmp_path / precision, None, precision)
        assert folder_bytes(tmp_path / precision) == want, precision

    run_scan(store, t, thr, tmp_path / "pool", Executor(LocalEngine(2)), "int8")
    assert folder_bytes(tmp_path / "pool") == want

    import ray  # a hard dependency: a broken Ray must fail here, not skip

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_executor = Executor(RayEngine(num_cpus=2))  # one worker
        run_scan(store, t, thr, tmp_path / "ray", ray_executor, "int8")
    finally:
        ray.shutdown()
    assert folder_bytes(tmp_path / "ray") == want


def test_outputs_name_benchmark_and_keys(case, tmp_path):
    store, t, thr = case
    res = run_scan(store, t, thr, tmp_path / "s")
    table = load_tests_table(tmp_path / "s")
    keys = np.array(store.keys())
    assert table.column("benchmark").to_pylist() == ["b"] * len(t)
    assert table.column("key").to_pylist() == [f"t{i}" for i in range(len(t))]
    np.testing.assert_array_equal(
        np.array(table.column("topk_key").to_pylist()), keys[res.topk_row]
    )
    assert table.column("nn_key").to_pylist() == keys[res.topk_row[:, 0]].tolist()
    np.testing.assert_array_equal(table.column("count_above").to_numpy(), res.count_above)
    np.testing.assert_array_equal(table.column("threshold").to_numpy(), thr)
    back = load_scan(tmp_path / "s")
    np.testing.assert_array_equal(back.row_margin, res.row_margin)


def test_resume_skips_finished_shards_and_redoes_changed_ones(case, tmp_path):
    store, t, thr = case
    out = tmp_path / "s"
    run_scan(store, t, thr, out)
    want = folder_bytes(out)
    # A half-finished state: one shard's outputs lost, another's done record stale.
    (out / "done" / "00002.json").unlink()
    (out / "rows" / "00000.npy").write_bytes(b"garbage")
    stale = (
        (out / "done" / "00000.json").read_text().replace('"fingerprint": "', '"fingerprint": "x')
    )
    (out / "done" / "00000.json").write_text(stale)
    mtime = (out / "parts" / "00004.npy").stat().st_mtime_ns
    run_scan(store, t, thr, out)
    assert folder_bytes(out) == want
    assert (out / "parts" / "00004.npy").stat().st_mtime_ns == mtime  # not recomputed
    # Other thresholds: every shard is redone, none reused.
    res = run_scan(store, t, thr - 0.01, out)
    assert (out / "parts" / "00004.npy").stat().st_mtime_ns != mtime
    assert (res.count_above >= load_scan(tmp_path / "s").count_above).all()


def test_sigkill_then_rerun_gives_identical_bytes(tmp_path):
    rng = np.random.default_rng(12)
    d = 32
    base = make_store(tmp_path / "base", unit_fp16(rng.standard_normal((3000, d))), [100] * 30)
    bench = write_store(tmp_path / "bench", unit_fp16(rng.standard_normal((300, d))),
                        [f"b{i:04d}" for i in range(300)], MODEL)  # fmt: skip
    ref = write_store(tmp_path / "ref", unit_fp16(rng.standard_normal((200, d))),
                      [f"r{i:04d}" for i in range(200)], MODEL)  # fmt: skip
    args = [str(base.path), "--benchmarks", str(bench.path), "--thresholds-from", str(ref.path)]
    from simgap.cli import main

    assert main(["scan", *args, "-o", str(tmp_path / "clean")]) == 0
    want = folder_bytes(tmp_path / "clean")

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simgap.cli", "scan", *args, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "done").glob("*.json"))) < 3:
            assert proc.poll() is None, "the scan finished before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list((out / "done").glob("*.json")))
    assert 3 <= done < 30 and not (out / "scan.json").exists()
    assert main(["scan", *args, "-o", str(out)]) == 0
    assert folder_bytes(out) == want
    assert open_store(base.path).rows == 3000


def test_single_row_store_threshold_equal_to_similarity(tmp_path):
    """One base row; thresholds exactly at its similarities (strict >: not above) and just below."""
    rng = np.random.default_rng(13)
    x = unit_fp16(rng.standard_normal((1, 8)))
    t = unit_fp16(rng.standard_normal((4, 8)))
    sims = (x.astype(np.float64) @ t.astype(np.float64).T).astype(np.float32)[0]
    thr = sims.copy()
    thr[2] = np.nextafter(sims[2], np.float32(-1))
    store = make_store(tmp_path / "one", x, [0, 1, 0])
    res = scan_store(store, t, thr, ScanOptions(topk=3, out_dir=tmp_path / "s", executor=None))
    assert res.count_above.tolist() == [0, 0, 1, 0]
    np.testing.assert_array_equal(res.topk_sim[:, 0], sims)
    assert (res.topk_row[:, 0] == 0).all() and (res.topk_row[:, 1:] == -1).all()
    assert np.isneginf(res.topk_sim[:, 1:]).all()
    assert res.row_max.tolist() == [sims.max()] and res.row_argmax.tolist() == [sims.argmax()]
    assert res.row_margin[0] == np.float32(sims[2] - thr[2]) > 0
