"""The scan's checks that need a GPU, in one go; writes one JSON object (``--out``, and stdout).

1. ``exactness``: the brute-force, tie and edge tests of ``tests/test_scan.py`` on the GPU, every
   screen precision (``SIMGAP_TEST_DEVICE=cuda``), as a pytest run.
2. ``cpu_vs_cuda``: ``scan_arrays`` on random fp16 data on the CPU and on the GPU, with each
   screen; every output compared byte for byte.
3. ``bound_probe``: the largest |screen - exact| / (|x||t|) of the raw screen GEMM over random,
   near-parallel and tiny shapes, against the coefficient the kernel uses, with bf16
   reduced-precision reductions on (torch's default) and off (what the kernel sets); for int8
   the error against the Int8Bound eps. A ratio above 1 would disprove the bound.

    python benchmarks/gpu_check_scan.py --out gpu_scan.json [--device cuda]

``run_checks(device)`` returns the same dict for a driver script (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simgap.scan import KernelConfig, scan_arrays
from simgap.scan import kernel as K

ROOT = Path(__file__).resolve().parent.parent
SCREENS = ("fp32", "bf16", "int8")
OUTPUTS = ("topk_sim", "topk_row", "count_above", "row_max", "row_argmax", "row_margin")


def unit_fp16(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float16)


def exactness(device: str) -> dict:
    """tests/test_scan.py's brute-force tests on the device, each screen precision."""
    env = {**os.environ, "SIMGAP_TEST_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_scan.py"]
    cmd += ["-k", "bruteforce or ties or adversarial or edge or agree or fp32_tests"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"passed": proc.returncode == 0, "seconds": round(time.perf_counter() - t, 1),
            "tail": tail}  # fmt: skip


def cpu_vs_cuda(device: str, rows: int = 20000, tests: int = 700, dim: int = 512) -> dict:
    rng = np.random.default_rng(0)
    x = unit_fp16(rng.standard_normal((rows, dim), dtype=np.float32))
    t = unit_fp16(rng.standard_normal((tests, dim), dtype=np.float32))
    x[100:150] = x[0]  # duplicate rows: ties broken by row id
    thr = np.quantile((x[:2000].astype(np.float32) @ t.T.astype(np.float32)), 0.99, axis=0)
    thr = thr.astype(np.float32)
    blocks = [(0, x[:7000]), (7000, x[7000:])]
    ref = scan_arrays(blocks, t, thr, topk=10, config=KernelConfig("fp32"))
    out = {}
    for precision in SCREENS:
        cfg = KernelConfig(precision, device, tile_rows=4096, tile_tests=512)
        res = scan_arrays(blocks, t, thr, topk=10, config=cfg)
        same = {
            name: getattr(res, name).tobytes() == getattr(ref, name).tobytes() for name in OUTPUTS
        }
        out[precision] = {"bytes_equal": all(same.values()), "outputs": same,
                          "recheck_fraction": res.recheck_fraction}  # fmt: skip
    return out


def probe_cases(rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    cases = []
    for d in (512, 640, 1024):
        a = unit_fp16(rng.standard_normal((512, d)))
        cases.append((f"random d={d}", a, a[:256]))
        near = unit_fp16(1 + 0.05 * rng.random((512, d)))
        cases.append((f"near-parallel d={d}", near, near[:256]))
        for m in (4, 8):
            for n in (32, 64):
                cases.append((f"tiny {m}x{n}x{d}", near[:m], near[:n]))
    return cases


def bound_probe(device: str) -> dict:
    """max over cases of |screen - exact| / (|x||t|) / c (float screens) or / eps (int8)."""
    rng = np.random.default_rng(1)
    cases = probe_cases(rng)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction
    out: dict = {}
    try:
        for reduced in (True, False):
            matmul.allow_bf16_reduced_precision_reduction = reduced
            for precision in ("bf16", "fp32"):
                worst, where = 0.0, None
                for name, x, t in cases:
                    d = x.shape[1]
                    c = K.error_coefficient(d, precision, device)
                    dtype = K.SCREEN_DTYPES[precision]
                    xs = torch.from_numpy(x).to(device).float().to(dtype)
                    ts = torch.from_numpy(t).to(device).float().to(dtype)
                    screen = torch.mm(xs, ts.T).double().cpu().numpy()
                    exact = x.astype(np.float64) @ t.astype(np.float64).T
                    ref = exact.astype(np.float32).astype(np.float64)
                    norms = np.outer(np.linalg.norm(x.astype(np.float64), axis=1),
                                     np.linalg.norm(t.astype(np.float64), axis=1))  # fmt: skip
                    r = float((np.abs(screen - ref) / norms).max() / c)
                    if r > worst:
                        worst, where = r, name
                out[f"{precision}_reduced_reduction_{reduced}"] = {
                    "max_error_over_bound": worst,
                    "case": where,
                    "coefficient_d512": K.error_coefficient(512, precision, device),
                }
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before
    worst, where = 0.0, None
    for name, x, t in cases:
        xq = K.quantize_rows(torch.from_numpy(x).float().to(device), 127)
        tq = K.quantize_rows(torch.from_numpy(t).float().to(device), 127)
        acc = torch.empty((len(x), len(t)), dtype=torch.int32, device=device)
        K.tile_gemm(xq.q, tq.q, acc, "torch")
        screen = (acc.float() * tq.scale * xq.scale[:, None]).double().cpu().numpy()
        ref = (x.astype(np.float64) @ t.astype(np.float64).T).astype(np.float32)
        r = float(np.abs(screen - ref).max() / K.Int8Bound(xq.norms, tq.norms).eps())
        if r > worst:
            worst, where = r, name
    out["int8"] = {"max_error_over_eps": worst, "case": where}
    return out


def run_checks(device: str = "cuda") -> dict:
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "bound_probe": bound_probe(device),
        "cpu_vs_cuda": cpu_vs_cuda(device),
        "exactness": exactness(device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    result = run_checks(a.device)
    text = json.dumps(result)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
