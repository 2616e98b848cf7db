"""Benchmark the exact fused scan against raw GEMMs and FAISS on the same vectors, side by side.

Writes a random fp16 store to a temp folder, runs ``scan_store`` end to end from disk (with
per-test thresholds, as the gap-matching scan does), measures the raw screen GEMMs (numpy fp32,
torch bf16, torch int8) on a slice of the same problem, the kernel alone on in-memory rows of
the first shards (its time apart from disk and checksums, and its recheck fraction), and FAISS
``IndexFlatIP`` k=1 search on the same vectors. The last line printed is one JSON object;
``ratio_vs_screen_gemm`` compares the scan with the raw GEMM of the screen it used.

On CUDA the device is warmed up first (context, cuBLAS handles, module loading), GEMM anchors are
timed with CUDA events over >= 100 repetitions on the kernel's tile shape, and the keys measured
on the CPU whatever the device (numpy fp32 GEMM, CPU flags) are listed under ``cpu_only_keys``.

    python benchmarks/scan.py --rows 100000 --tests 2048      # quick
    python benchmarks/scan.py                                  # 1e6 x 8192 x 512
    python benchmarks/scan.py --device cuda --precision bf16   # on a GPU node

Memory bound (peak RSS of this process, ``ru_maxrss``) on an existing store, bounded portions:

    python benchmarks/scan.py --store BASE --max-shards 1 --tests 50000 --skip-gemms --skip-faiss
    python benchmarks/scan.py --store BASE --tests 512 --skip-gemms --skip-faiss
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

from simgap.scan import KernelConfig, ScanOptions, iter_scan_rows, kernel, scan_arrays, scan_store
from simgap.store import Store, StoreWriter, open_store


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


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def gemm_gflops(fn, flop: float, repeat: int = 3) -> float:
    fn()  # warm-up: allocation, thread pool start
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flop * repeat / (time.perf_counter() - t) / 1e9


def cuda_gemm_gflops(fn, flop: float, repeat: int = 100) -> float:
    """A GPU GEMM's rate from CUDA events around ``repeat`` back-to-back launches, after a
    warm-up; no host syncs inside the timed region."""
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return flop * repeat / (start.elapsed_time(stop) / 1e3) / 1e9


def screen_gemm_gflops(
    precision: str, base: np.ndarray, tests: np.ndarray, device: str
) -> float | None:
    """torch's raw GEMM of the screen dtype on ``base`` x ``tests`` (the scan's device), output
    into one reused buffer; int8 counts integer ops (``torch._int_mm``, the kernel's backend)."""
    if precision == "fp32" and not device.startswith("cuda"):
        return None  # numpy's GEMM is the fp32 anchor on CPUs
    xb = torch.from_numpy(base).to(device).float()
    tb = torch.from_numpy(tests).to(device).float()
    if precision == "int8":
        xb, tb = kernel.quantize_rows(xb, 127).q, kernel.quantize_rows(tb, 127).q
        out = torch.empty((len(xb), len(tb)), dtype=torch.int32, device=device)
    else:
        dtype = kernel.SCREEN_DTYPES[precision]
        xb, tb = xb.to(dtype), tb.to(dtype)
        out = torch.empty((len(xb), len(tb)), dtype=dtype, device=device)
    flop = 2.0 * xb.shape[0] * tb.shape[0] * xb.shape[1]

    def run() -> None:
        kernel.tile_gemm(xb, tb, out, "torch")

    if device.startswith("cuda"):
        with kernel.screen_gemm_guard("cuda"):
            return cuda_gemm_gflops(run, flop)
    return gemm_gflops(run, flop, repeat=1)


def kernel_only(
    store: Store, tests: np.ndarray, thr: np.ndarray | None, topk: int, cfg, rows: int
) -> tuple[int, float, float | None]:
    """The kernel alone on the first ``rows`` rows in memory (read before timing): rows,
    seconds (synchronised on CUDA), recheck fraction."""
    blocks, n = [], 0
    for offset, _, emb in store.iter_blocks():
        if n >= rows:
            break
        part = np.array(emb[: rows - n])
        blocks.append((offset, part))
        n += len(part)
    t = time.perf_counter()
    res = scan_arrays(blocks, tests, thr, topk=topk, config=cfg, collect_rows=False)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return n, time.perf_counter() - t, res.recheck_fraction


def warm_up(cfg, dim: int) -> None:
    """First use of the device outside any timing: CUDA context, cuBLAS handles, kernels."""
    rng = np.random.default_rng(0)
    x, t = random_unit_fp16(rng, 256, dim), random_unit_fp16(rng, 64, dim)
    scan_arrays([(0, x)], t, np.zeros(64, np.float32), topk=2, config=cfg)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def fp32_gemm_gflops(base: np.ndarray, tests: np.ndarray) -> float:
    """numpy (OpenBLAS) fp32 GEMM of one (slice rows x all tests) tile, output materialised."""
    x32, t32 = base.astype(np.float32), tests.astype(np.float32)
    out = np.empty((len(x32), len(t32)), np.float32)
    flop = 2.0 * x32.shape[0] * t32.shape[0] * x32.shape[1]
    return gemm_gflops(lambda: np.matmul(x32, t32.T, out=out), flop)


def first_shards(store: Store, n: int | None) -> Store:
    """The same store restricted to its first n shards (a bounded portion of a big scan)."""
    if n is None:
        return store
    manifest = {**store.manifest, "shards": store.manifest["shards"][:n]}
    return Store(store.path, manifest)


def faiss_k1_seconds(store: Store, tests: np.ndarray) -> float:
    import faiss

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
    p.add_argument("--precision", default="auto", choices=list(kernel.PRECISIONS))
    p.add_argument("--gemm", default="auto", choices=["auto", "torch", "numpy"])
    p.add_argument("--tile-rows", type=int, default=None)
    p.add_argument("--tile-tests", type=int, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-thresholds", action="store_true")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--gemm-rows", type=int, default=None, help="rows of the raw GEMM slice")
    p.add_argument(
        "--kernel-rows", type=int, default=100_000, help="rows of the in-memory kernel-only run"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", help="scan this existing store instead of a random one")
    p.add_argument("--max-shards", type=int, help="scan only the store's first N shards")
    p.add_argument(
        "--tests-store",
        nargs="+",
        help="tests from these stores (e.g. a world's benchmarks) instead of random vectors; "
        "thresholds: each test's 99th-percentile similarity to the first 10,000 base rows",
    )
    p.add_argument("--skip-gemms", action="store_true", help="no raw GEMM reference runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    rng = np.random.default_rng(a.seed + 1)
    if a.tests_store:
        tests = np.concatenate([open_store(Path(s)).embeddings() for s in a.tests_store])
        a.tests = len(tests)
        head = np.concatenate(
            [np.asarray(e[:10_000]) for _, _, e in open_store(Path(a.store)).iter_blocks()]
        )[:10_000]
        sims = head.astype(np.float32) @ tests.astype(np.float32).T
        thr = None if a.no_thresholds else np.quantile(sims, 0.99, axis=0).astype(np.float32)
    else:
        tests = random_unit_fp16(rng, a.tests, a.dim)
        # Random unit vectors in d=512 have similarity ~N(0, 1/d); thresholds near 4.5 sigma
        # remove a few percent of rows, like the paper's benchmarks.
        sigma = 1 / np.sqrt(a.dim)
        thr = None if a.no_thresholds else rng.uniform(4.1 * sigma, 5.4 * sigma, a.tests)
        thr = None if thr is None else thr.astype(np.float32)

    cfg = KernelConfig(
        precision=a.precision,
        device=a.device,
        tile_rows=a.tile_rows,
        tile_tests=a.tile_tests,
        gemm=a.gemm,
    ).resolved()
    cuda = a.device.startswith("cuda")
    # The GEMM anchors run on the kernel's row tile (CPU: 2048 rows) unless told otherwise.
    gemm_rows = a.gemm_rows or cfg.tile_rows
    warm_up(cfg, a.dim)
    with tempfile.TemporaryDirectory(prefix="simgap-bench-") as tmp:
        path = Path(a.store) if a.store else Path(tmp) / "base"
        if not a.store:
            t0 = time.perf_counter()
            write_random_store(path, a.rows, a.dim, a.shard_rows, a.seed)
            print(f"wrote {a.rows} x {a.dim} store in {time.perf_counter() - t0:.1f}s", flush=True)
        full = open_store(path)
        store = first_shards(full, a.max_shards)
        if store.dim != a.dim:
            raise SystemExit(f"{path}: dim {store.dim}, pass --dim {store.dim}")

        last = [time.perf_counter(), 0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 10 or done == total:
                rate = done / (now - t_scan)
                eta = (total - done) / rate if rate else float("inf")
                print(f"  scan {done}/{total} rows, {rate:.0f} rows/s, eta {eta:.0f}s", flush=True)
                last[0] = now

        first = np.array(next(store.iter_blocks())[2][:gemm_rows])
        tile_tests = tests[: cfg.tile_tests]  # the kernel's test tile
        # The machine may be shared: measure the reference GEMM just before and after the scan.
        fp32_before = None if a.skip_gemms or cuda else fp32_gemm_gflops(first, tile_tests)
        load_before = os.getloadavg()[0]
        rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t_scan = time.perf_counter()
        res = scan_store(
            store,
            tests,
            thr,
            ScanOptions(
                topk=a.topk,
                out_dir=Path(tmp) / "scan",
                progress=progress,
                config=cfg,
                return_rows=False,
            ),
        )
        if cuda:
            torch.cuda.synchronize()
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
        fp32 = bf16 = int8 = fp32_torch = None
        if not a.skip_gemms:
            if not cuda:
                fp32_after = fp32_gemm_gflops(first, tile_tests)
                fp32 = (fp32_before + fp32_after) / 2
            else:
                fp32_torch = screen_gemm_gflops("fp32", first, tile_tests, a.device)
            bf16 = screen_gemm_gflops("bf16", first, tile_tests, a.device)
            int8 = screen_gemm_gflops("int8", first, tile_tests, a.device)
            print(
                f"  raw GEMMs on {len(first)} x {len(tile_tests)} x {a.dim}: fp32 "
                f"{fp32 or fp32_torch:.1f}, bf16 {bf16:.1f} GFLOP/s, int8 {int8:.1f} GOP/s",
                flush=True,
            )
        k_rows, k_s, recheck = kernel_only(store, tests, thr, a.topk, cfg, a.kernel_rows)
        print(f"  kernel alone: {k_rows} rows in memory in {k_s:.2f}s", flush=True)
        faiss_s = None if a.skip_faiss else faiss_k1_seconds(store, tests)

    flop = 2.0 * store.rows * a.tests * a.dim
    scan_gflops = flop / scan_s / 1e9
    # The paper's full scan: 2e8 pool rows x 2e5 tests x 640 dims.
    paper_flop = 2.0 * 2e8 * 2e5 * 640

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else round(x / y, 3)

    def rounded(x: float | None, digits: int = 2) -> float | None:
        return None if x is None else round(x, digits)

    screen_gemm = {"int8": int8, "bf16": bf16, "fp32": fp32_torch if cuda else fp32}
    kernel_gflops = 2.0 * k_rows * a.tests * a.dim / k_s / 1e9
    flags = sorted(kernel.cpu_flags() & set(CPU_FLAGS))

    out = {
        "rows": store.rows,
        "store_rows": full.rows,
        "shards_scanned": len(store.shards),
        "tests": a.tests,
        "dim": a.dim,
        "threads": a.threads,
        "device": a.device,
        "precision": cfg.precision,
        "gemm": cfg.gemm,
        "thresholds": thr is not None,
        "rows_removed": removed,
        "scan_seconds": round(scan_s, 3),
        "scan_gflops": round(scan_gflops, 2),
        "read_gb_per_s": round(store.rows * a.dim * 2 / scan_s / 1e9, 3),
        "bf16_matmul_gflops": rounded(bf16),
        "fp32_matmul_gflops": rounded(fp32),
        "fp32_torch_matmul_gflops": rounded(fp32_torch),
        "int8_matmul_gops": rounded(int8),
        "ratio_vs_bf16_matmul": ratio(scan_gflops, bf16),
        "ratio_vs_fp32_matmul": ratio(scan_gflops, fp32),
        "ratio_vs_screen_gemm": ratio(scan_gflops, screen_gemm[cfg.precision]),
        "gemm_shape": [len(first), len(tile_tests), a.dim],
        "kernel_rows": k_rows,
        "kernel_seconds": round(k_s, 3),
        "kernel_gflops": round(kernel_gflops, 2),
        "kernel_ratio_vs_screen_gemm": ratio(kernel_gflops, screen_gemm[cfg.precision]),
        "recheck_fraction": None if recheck is None else float(f"{recheck:.3g}"),
        "faiss_k1_seconds": None if faiss_s is None else round(faiss_s, 3),
        "speedup_vs_faiss": ratio(faiss_s, scan_s),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_before_scan_mb": round(rss_before_mb, 1),
        "projected_paper_scan_hours": round(paper_flop / (scan_gflops * 1e9) / 3600, 2),
        "projected_paper_kernel_hours": round(paper_flop / (kernel_gflops * 1e9) / 3600, 2),
        "cpu_native_bf16": None if cuda else bool(torch.cpu._is_avx512_bf16_supported()),
        "cpu_flags": flags,
        "gpu": torch.cuda.get_device_name(a.device) if cuda else None,
        # Measured on the CPU (numpy GEMM, CPU features) whatever the scan's device.
        "cpu_only_keys": ["fp32_matmul_gflops", "ratio_vs_fp32_matmul", "cpu_native_bf16"],
        "loadavg_before_after": [round(load_before, 2), round(load_after, 2)],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
