"""The scan's numerics without a GPU: screen choice by CPU flags, the CUDA error model and its
guards (fake torch.cuda objects where a GPU would be needed), and the int8 GEMM exactness probe."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_scan import assert_matches, brute, sims_of, unit_fp16

from simgap.scan import KernelConfig, scan_arrays
from simgap.scan import kernel as K
from simgap.scan.kernel import screen as KS
from simgap.scan.scan import scan_device, wait_for_copy


@pytest.mark.parametrize(
    ("flags", "screen"),
    [
        # int8 measured slower end to end than fp32 with VNNI and under AVX2 (its recheck
        # fraction): auto takes fp32 there.
        ({"sse4_2", "avx", "avx2", "fma"}, "fp32"),  # the AVX2-only CI machine
        ({"avx2", "avx_vnni"}, "fp32"),
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),
        ({"avx2", "avx512_vnni", "avx512_bf16"}, "bf16"),
        ({"avx2", "amx_tile", "amx_bf16", "amx_int8"}, "bf16"),
        ({"sse4_2"}, "fp32"),
    ],
)
def test_auto_screen_by_cpu_flags(flags, screen):
    assert K.screen_for_cpu(frozenset(flags)) == screen
    assert K.resolve_precision("auto", "cpu", frozenset(flags)) == screen


def test_auto_screen_on_cuda_is_measured_in_the_worker(monkeypatch):
    rates = {"bf16": 2.0, "int8": 3.0}
    monkeypatch.setattr(KS, "cuda_screen_rates", lambda *a: rates)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert K.resolve_precision("auto", "cuda") == "int8"
    rates["bf16"] = 4.0
    assert KernelConfig(device="cuda").resolved().precision == "bf16"

    def no_cuda(*a):
        raise AssertionError("the driver must not touch CUDA")

    monkeypatch.setattr(KS, "cuda_screen_rates", no_cuda)
    assert KernelConfig(device="cuda").resolved(measure=False).precision == "auto"


@pytest.fixture
def new_precision_api():
    """torch's fp32_precision API in use: from then on its legacy getters raise."""
    flags = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    for f in flags:
        f.fp32_precision = "tf32"
    try:
        yield
    finally:
        for f in flags:
            f.fp32_precision = "none"


def test_fp32_bound_under_the_new_precision_api(new_precision_api):
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()  # what the bound must not read
    assert K.fp32_matmul_mode("cuda") == "tf32" and K.fp32_matmul_mode("cpu") == "tf32"
    for device in ("cpu", "cuda"):
        # TF32 inputs count with bf16's unit roundoff: a bound at least that wide.
        assert K.error_coefficient(512, "fp32", device) > 2 * K.UBF16


def test_fp32_bound_is_ieee_by_default():
    assert K.fp32_matmul_mode("cpu") == "ieee"
    assert K.error_coefficient(512, "fp32", "cpu") < 1e-4


def test_cuda_bf16_bound_models_tensor_cores_without_split_k_heuristic():
    d = 512
    u, v = K.UBF16, K.UTC
    gamma = d * v / (1 - d * v)
    want = 2 * u + u * u + gamma * (1 + u) ** 2 + u * (1 + u) ** 2 * (1 + gamma) + K.U32
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    assert flag  # torch's default: the screen GEMM turns it off (screen_gemm_guard)
    cuda, cpu = K.error_coefficient(d, "bf16", "cuda"), K.error_coefficient(d, "bf16", "cpu")
    assert cuda == pytest.approx(want, rel=1e-12)
    # Truncating accumulation costs ~3 gamma_d more than round-to-nearest, no 4 bf16 roundings.
    assert cpu + 2 * d * K.U32 < cuda < 0.0120


def test_screen_gemm_runs_with_reduced_precision_reduction_off(monkeypatch):
    seen = []

    def fake_gemm(xs, ts, out, gemm):
        seen.append(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
        return out

    monkeypatch.setattr(KS, "tile_gemm", fake_gemm)
    tt = SimpleNamespace(cols=8, screen=torch.zeros(8, 4, dtype=torch.bfloat16))
    cfg = KernelConfig("bf16", device="cuda", tile_rows=4, tile_tests=8, gemm="torch")
    xs = torch.zeros(4, 4, dtype=torch.bfloat16)
    KS.screen_tile(xs, tt, None, cfg, K.Scratch(torch.device("cpu")), (127, 127))
    assert seen == [False]
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction  # restored


def test_cuda_without_a_gpu_is_a_clean_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        KernelConfig("bf16", device="cuda").resolved()


def test_scan_device_names_the_current_gpu():
    assert scan_device("cuda", current=lambda: 1) == torch.device("cuda", 1)
    assert scan_device("cuda:0", current=lambda: 1) == torch.device("cuda", 0)
    assert scan_device("cpu") == torch.device("cpu")


def test_wait_for_copy_uses_the_rows_device(monkeypatch):
    """cuda:1 rows, cuda:0 current: the wait goes on cuda:1's stream, not the current device's."""
    calls = []

    class Stream:
        def __init__(self, device):
            self.device = device

        def wait_event(self, event):
            calls.append(("wait", self.device, event))

    def current_stream(device=None):
        return Stream(device if device is not None else torch.device("cuda", 0))

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    rows = SimpleNamespace(
        device=torch.device("cuda", 1),
        record_stream=lambda s: calls.append(("record", s.device, None)),
    )
    ready = object()
    wait_for_copy(SimpleNamespace(ready=ready, x=rows))
    one = torch.device("cuda", 1)
    assert calls == [("wait", one, ready), ("record", one, None)]


def saturating_int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, gemm: str):
    """oneDNN's s8s8s32 GEMM without VNNI: a + 128 as u8, pairs of u8*s8 products summed with
    int16 saturation (vpmaddubsw), then the 128 * sum(b) compensation."""
    p = (a.long() + 128)[:, None, :] * b.long()[None, :, :]
    if p.shape[2] % 2:
        p = torch.nn.functional.pad(p, (0, 1))
    pairs = (p[..., 0::2] + p[..., 1::2]).clamp(-32768, 32767)
    out.copy_(pairs.sum(2) - 128 * b.long().sum(1)[None, :])
    return out


def test_int8_probe_narrows_the_range_on_a_saturating_gemm(monkeypatch):
    monkeypatch.setattr(KS, "_INT8_EXACT", {})
    monkeypatch.setattr(KS, "tile_gemm", saturating_int_mm)
    assert not K.int8_gemm_exact(8, 8, 16, (127, 127), "cpu")
    assert K.int8_range(8, 8, 16, "cpu") == (127, 63)
    # The whole scan on that GEMM is still exact.
    rng = np.random.default_rng(8)
    x = unit_fp16(rng.standard_normal((90, 16)))
    x[:5] = unit_fp16(np.ones((5, 16)))  # all-max rows: where saturation bites
    t = np.concatenate([x[:3], unit_fp16(rng.standard_normal((13, 16)))])
    thr = np.quantile(sims_of(x, t), 0.9, axis=0).astype(np.float32)
    cfg = KernelConfig("int8", tile_rows=32, tile_tests=8)
    res = scan_arrays([(0, x)], t, thr, topk=3, config=cfg)
    assert_matches(res, brute(x, t, thr, 3))


def test_int8_scan_refuses_an_inexact_gemm(monkeypatch):
    monkeypatch.setattr(KS, "_INT8_EXACT", {})

    def wrong(a, b, out, gemm):
        return out.fill_(0)

    monkeypatch.setattr(KS, "tile_gemm", wrong)
    x = unit_fp16(np.random.default_rng(9).standard_normal((10, 8)))
    with pytest.raises(RuntimeError, match="not exact"):
        scan_arrays([(0, x)], x[:4], topk=1, config=KernelConfig("int8"))


def test_recheck_fraction_is_reported():
    rng = np.random.default_rng(10)
    x = unit_fp16(rng.standard_normal((500, 32)))
    t = unit_fp16(rng.standard_normal((40, 32)))
    thr = np.quantile(sims_of(x, t), 0.99, axis=0).astype(np.float32)
    for precision in ("fp32", "bf16", "int8"):
        res = scan_arrays([(0, x)], t, thr, topk=2, config=KernelConfig(precision))
        assert res.pairs_screened == 500 * 40
        assert 0 < res.recheck_fraction < 1
