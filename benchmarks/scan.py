"""Benchmark the exact fused scan against raw GEMMs and FAISS on the same vectors, side by side.

Writes a random fp16 store to a temp folder, runs ``scan_store`` end to end from disk (with
per-test thresholds, as the gap-matching scan does), measures the raw torch bf16 and numpy fp32
GEMM throughput on a slice of the same problem, and FAISS ``IndexFlatIP`` k=1 search on the same
vectors. The last line printed is one JSON object.

    python benchmarks/scan.py --rows 100000 --tests 2048      # quick
    python benchmarks/scan.py                                  # 1e6 x 8192 x 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from simgap.scan import iter_scan_rows, resolve_precision, scan_store
from simgap.store import StoreWriter, open_store


def random_unit_fp16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    a = rng.standard_normal((n, d), dtype=np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a.astype(np.float16)


def write_random_store(path: Path, rows: int, dim: int, shard_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    writer = StoreWriter(path, {"arch": "random", "seed": seed}, dim, {"kind": "random"})
    records = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        keys = pa.table({"key": [f"p{start + j:09d}" for j in range(n)]})
        records.append(writer.write_shard(f"{i:05d}", random_unit_fp16(rng, n, dim), keys))
    writer.finish(records)


def gemm_gflops(fn, flop: float, repeat: int = 3) -> float:
    fn()  # warm-up: allocation, thread pool start
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flop * repeat / (time.perf_counter() - t) / 1e9


def fp32_gemm_gflops(base: np.ndarray, tests: np.ndarray) -> float:
    """numpy (OpenBLAS) fp32 GEMM of one (slice rows x all tests) tile, output materialised."""
    x32, t32 = base.astype(np.float32), tests.astype(np.float32)
    out = np.empty((len(x32), len(t32)), np.float32)
    flop = 2.0 * x32.shape[0] * t32.shape[0] * x32.shape[1]
    return gemm_gflops(lambda: np.matmul(x32, t32.T, out=out), flop)


def bf16_gemm_gflops(base: np.ndarray, tests: np.ndarray) -> float:
    """torch bf16 GEMM on the same shape."""
    xb, tb = torch.from_numpy(base).bfloat16(), torch.from_numpy(tests).bfloat16()
    out = torch.empty((len(xb), len(tb)), dtype=torch.bfloat16)
    flop = 2.0 * xb.shape[0] * tb.shape[0] * xb.shape[1]
    return gemm_gflops(lambda: torch.mm(xb, tb.T, out=out), flop, repeat=1)


def faiss_k1_seconds(store_path: Path, tests: np.ndarray) -> float:
    import faiss

    store = open_store(store_path)
    index = faiss.IndexFlatIP(store.dim)
    for _, _, emb in store.iter_blocks():
        index.add(np.asarray(emb, np.float32))
    t = time.perf_counter()
    index.search(tests.astype(np.float32), 1)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tests", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--gemm", default="auto", choices=["auto", "torch", "numpy"])
    p.add_argument("--tile-rows", type=int, default=None)
    p.add_argument("--tile-tests", type=int, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-thresholds", action="store_true")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--gemm-rows", type=int, default=8192, help="rows of the raw GEMM slice")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    rng = np.random.default_rng(a.seed + 1)
    tests = random_unit_fp16(rng, a.tests, a.dim)
    # Random unit vectors in d=512 have similarity ~N(0, 1/d); thresholds near 4.5 sigma remove
    # a few percent of rows, like the paper's benchmarks.
    sigma = 1 / np.sqrt(a.dim)
    thr = None if a.no_thresholds else rng.uniform(4.1 * sigma, 5.4 * sigma, a.tests)
    thr = None if thr is None else thr.astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="simgap-bench-") as tmp:
        path = Path(tmp) / "base"
        t0 = time.perf_counter()
        write_random_store(path, a.rows, a.dim, a.shard_rows, a.seed)
        print(f"wrote {a.rows} x {a.dim} fp16 store in {time.perf_counter() - t0:.1f}s", flush=True)
        store = open_store(path)

        last = [time.perf_counter(), 0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 10 or done == total:
                rate = done / (now - t_scan)
                eta = (total - done) / rate if rate else float("inf")
                print(f"  scan {done}/{total} rows, {rate:.0f} rows/s, eta {eta:.0f}s", flush=True)
                last[0] = now

        first = np.array(next(store.iter_blocks())[2][: a.gemm_rows])
        # The machine may be shared: measure the reference GEMM just before and after the scan.
        fp32_before = fp32_gemm_gflops(first, tests)
        load_before = os.getloadavg()[0]
        t_scan = time.perf_counter()
        res = scan_store(
            store,
            tests,
            thresholds=thr,
            topk=a.topk,
            out_dir=Path(tmp) / "scan",
            progress=progress,
            precision=a.precision,
            gemm=a.gemm,
            tile_rows=a.tile_rows,
            tile_tests=a.tile_tests,
            return_rows=False,
        )
        scan_s = time.perf_counter() - t_scan
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        removed = None
        if thr is not None:
            rows = iter_scan_rows(Path(tmp) / "scan")
            removed = int(sum((rec["margin"] > 0).sum() for _, _, rec in rows))
            print(
                f"  {removed} rows above a threshold; {(res.count_above > 0).mean():.3f} of tests"
            )

        load_after = os.getloadavg()[0]
        fp32_after = fp32_gemm_gflops(first, tests)
        fp32 = (fp32_before + fp32_after) / 2
        bf16 = bf16_gemm_gflops(first, tests)
        print(
            f"  raw GEMMs on {len(first)} x {a.tests} x {a.dim}: fp32 {fp32_before:.1f} before, "
            f"{fp32_after:.1f} after the scan; bf16 {bf16:.1f} GFLOP/s",
            flush=True,
        )
        faiss_s = None if a.skip_faiss else faiss_k1_seconds(path, tests)

    flop = 2.0 * a.rows * a.tests * a.dim
    scan_gflops = flop / scan_s / 1e9
    out = {
        "rows": a.rows,
        "tests": a.tests,
        "dim": a.dim,
        "threads": a.threads,
        "precision": resolve_precision(a.precision, "cpu"),
        "thresholds": thr is not None,
        "rows_removed": removed,
        "scan_seconds": round(scan_s, 3),
        "scan_gflops": round(scan_gflops, 2),
        "bf16_matmul_gflops": round(bf16, 2),
        "fp32_matmul_gflops": round(fp32, 2),
        "ratio_vs_bf16_matmul": round(scan_gflops / bf16, 3),
        "ratio_vs_fp32_matmul": round(scan_gflops / fp32, 3),
        "faiss_k1_seconds": None if faiss_s is None else round(faiss_s, 3),
        "speedup_vs_faiss": None if faiss_s is None else round(faiss_s / scan_s, 3),
        "peak_rss_mb": round(peak_mb, 1),
        "cpu_native_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "loadavg_before_after": [round(load_before, 2), round(load_after, 2)],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
