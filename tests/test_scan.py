"""The fused scan against a numpy brute force: every output, exactly, in every screen precision."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simgap.scan import (
    KernelConfig,
    ScanOptions,
    iter_scan_rows,
    load_scan,
    merge_topk,
    scan_arrays,
    scan_store,
    write_scan,
)
from simgap.scan.kernel import Int8Bound, error_coefficient, quantize_rows
from simgap.store import write_store

MODEL = {"arch": "test", "pretrained": "none"}
SCREENS = ("fp32", "bf16", "int8")
# benchmarks/gpu_check_scan.py reruns the brute-force tests with SIMGAP_TEST_DEVICE=cuda.
DEVICE = os.environ.get("SIMGAP_TEST_DEVICE", "cpu")


def unit_fp16(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return (a / np.where(n == 0, 1, n)).astype(np.float16)


def sims_of(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The reference similarity: float32 of the float64 dot product (exact for fp16 inputs)."""
    return (x.astype(np.float64) @ t.astype(np.float64).T).astype(np.float32)


def brute(x: np.ndarray, t: np.ndarray, thr: np.ndarray | None, k: int) -> dict:
    s = sims_of(x, t).reshape(len(x), len(t))
    n, m = s.shape
    top_sim = np.full((m, k), -np.inf, np.float32)
    top_row = np.full((m, k), -1, np.int64)
    for j in range(m):
        order = np.lexsort((np.arange(n), -s[:, j]))[:k]  # sim desc, row id asc
        top_sim[j, : len(order)] = s[order, j]
        top_row[j, : len(order)] = order
    out = {
        "topk_sim": top_sim,
        "topk_row": top_row,
        "row_max": s.max(1) if n else np.zeros(0, np.float32),
        "row_argmax": s.argmax(1).astype(np.int32) if n else np.zeros(0, np.int32),
        "count_above": None,
        "row_margin": None,
    }
    if thr is not None:
        out["count_above"] = (s > thr[None, :]).sum(0).astype(np.int64)
        out["row_margin"] = (s - thr[None, :]).max(1) if n else np.zeros(0, np.float32)
        # The removal decision: margin > 0 iff some similarity is strictly above its threshold.
        assert np.array_equal(out["row_margin"] > 0, (s > thr[None, :]).any(1))
    return out


def assert_matches(res, ref: dict) -> None:
    for name, want in ref.items():
        got = getattr(res, name)
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            np.testing.assert_array_equal(got, want, err_msg=name)


def split_blocks(x: np.ndarray, cuts: list[int]) -> list[tuple[int, np.ndarray]]:
    edges = [0, *sorted(min(c, len(x)) for c in cuts), len(x)]
    return [(a, x[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = unit_fp16(rng.standard_normal((700, 24)))
    t = unit_fp16(rng.standard_normal((90, 24)))
    s = sims_of(x, t)
    thr = np.quantile(s, 0.97, axis=0).astype(np.float32)
    return x, t, thr


@pytest.mark.parametrize(
    ("precision", "gemm"),
    [("fp32", "numpy"), ("fp32", "torch"), ("bf16", "torch"), ("int8", "torch")],
)
def test_random_matches_bruteforce(data, precision, gemm):
    if gemm == "numpy" and DEVICE != "cpu":
        pytest.skip("numpy's GEMM is CPU only")
    x, t, thr = data
    blocks = split_blocks(x, [100, 100, 333])  # includes an empty block
    res = scan_arrays(
        blocks,
        t,
        thr,
        topk=7,
        config=KernelConfig(precision, DEVICE, 128, 40, gemm=gemm),
    )
    assert_matches(res, brute(x, t, thr, 7))


def test_precisions_agree_without_thresholds(data):
    x, t, _ = data
    a = scan_arrays([(0, x)], t, topk=5, config=KernelConfig("fp32", DEVICE, 256, 64))
    assert_matches(a, brute(x, t, None, 5))
    for precision in ("bf16", "int8"):
        cfg = KernelConfig(precision, DEVICE, 96, 32)
        b = scan_arrays([(0, x)], t, topk=5, config=cfg)
        for name in ("topk_sim", "topk_row", "row_max", "row_argmax"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_ties_duplicates_and_thresholds_at_similarities():
    rng = np.random.default_rng(1)
    # Few distinct directions: many duplicate rows, duplicate tests and exactly tied similarities.
    base = unit_fp16(rng.integers(-1, 2, (12, 8)))
    x = base[rng.integers(0, len(base), 300)]
    t = np.concatenate([base[:5], base[:5], unit_fp16(rng.standard_normal((6, 8)))])
    s = sims_of(x, t)
    # Thresholds equal to attained similarities: those rows are not above them (strict >).
    thr = s[rng.integers(0, len(x), len(t)), np.arange(len(t))].copy()
    for precision in SCREENS:
        res = scan_arrays(
            split_blocks(x, [50, 51, 200]),
            t,
            thr,
            topk=9,
            config=KernelConfig(precision, DEVICE, 32, 7),
        )
        assert_matches(res, brute(x, t, thr, 9))
    assert (s == thr[None, :]).any(0).all()


def test_massive_ties_across_merges():
    """Thousands of identical rows: every row ties for every test, so top-k candidates overflow
    the merge buffer many times; the lowest row ids must win."""
    rng = np.random.default_rng(7)
    base = unit_fp16(rng.standard_normal((3, 10)))
    x = base[rng.integers(0, 3, 6000)]
    t = np.concatenate([base, unit_fp16(rng.standard_normal((2, 10)))])
    for precision in SCREENS:
        res = scan_arrays(
            split_blocks(x, [2500]),
            t,
            topk=7,
            config=KernelConfig(precision, DEVICE, 256, 3),
        )
        assert_matches(res, brute(x, t, None, 7))


def test_bf16_adversarial_near_thresholds():
    """Thresholds within 1e-4 of similarities, where the bf16 screen alone decides wrongly."""
    rng = np.random.default_rng(2)
    d = 64
    # Near-parallel positive vectors: similarities close to 1, where bf16 error is largest.
    x = unit_fp16(1.0 + 0.3 * rng.random((400, d)))
    t = unit_fp16(1.0 + 0.3 * rng.random((30, d)))
    s = sims_of(x, t)
    pick = rng.integers(0, len(x), len(t))
    delta = np.where(np.arange(len(t)) % 2 == 0, -5e-5, 5e-5)
    thr = (s[pick, np.arange(len(t))] + delta).astype(np.float32)
    screen = (torch.from_numpy(x).bfloat16() @ torch.from_numpy(t).bfloat16().T).float().numpy()
    assert ((screen > thr) != (s > thr)).any(), "the case must be adversarial for plain bf16"
    cfg = KernelConfig("bf16", DEVICE, 64, 16)
    res = scan_arrays([(0, x)], t, thr, topk=4, config=cfg)
    assert_matches(res, brute(x, t, thr, 4))


def test_int8_adversarial_near_thresholds():
    """Thresholds within 1e-4 of similarities, where the int8 screen alone decides wrongly."""
    rng = np.random.default_rng(2)
    d = 64
    x = unit_fp16(1.0 + 0.3 * rng.random((400, d)))
    t = unit_fp16(1.0 + 0.3 * rng.random((30, d)))
    s = sims_of(x, t)
    pick = rng.integers(0, len(x), len(t))
    thr = s[pick, np.arange(len(t))] + np.where(np.arange(len(t)) % 2, 5e-5, -5e-5)
    thr = thr.astype(np.float32)
    qx, qt = (
        quantize_rows(torch.from_numpy(x).float(), 127),
        quantize_rows(torch.from_numpy(t).float(), 127),
    )
    screen = (
        qx.q.double() @ qt.q.double().T * qx.scale.double()[:, None] * qt.scale.double()
    ).numpy()
    assert ((screen > thr) != (s > thr)).any(), "the case must be adversarial for plain int8"
    res = scan_arrays([(0, x)], t, thr, topk=4, config=KernelConfig("int8", DEVICE, 64, 16))
    assert_matches(res, brute(x, t, thr, 4))


def test_int8_error_within_bound():
    """The int8 screen's error against the exact similarity stays within Int8Bound, for random,
    near-parallel and outlier-dimension rows, and the bound is not absurdly loose."""
    rng = np.random.default_rng(3)
    d = 256
    spiky = rng.standard_normal((300, d))
    spiky[:, :4] *= 30  # a few dominant dimensions, as in CLIP embeddings
    for a in (rng.standard_normal((300, d)), 1 + 0.1 * rng.random((300, d)), spiky):
        x = unit_fp16(a)
        q = quantize_rows(torch.from_numpy(x).float(), 127)
        acc = q.q.int() @ q.q.int().T  # exact int32
        screen = (acc.float() * q.scale) * q.scale[:, None]
        err = np.abs(screen.numpy() - sims_of(x, x))
        eps = Int8Bound(q.norms, q.norms).eps()
        assert err.max() <= eps, (err.max(), eps)
        assert err.max() > eps / 40


def test_bf16_error_within_bound():
    rng = np.random.default_rng(3)
    d = 256
    cases = [rng.standard_normal((300, d)), 1 + 0.1 * rng.random((300, d))]
    c = error_coefficient(d, "bf16", "cpu")
    for a in cases:
        x = unit_fp16(a)
        screen = (torch.from_numpy(x).bfloat16() @ torch.from_numpy(x).bfloat16().T).float()
        err = np.abs(screen.numpy() - sims_of(x, x))
        assert err.max() <= c * 1.001, (err.max(), c)
        assert err.max() > c / 20  # the bound is not absurdly loose


def test_edge_sizes():
    rng = np.random.default_rng(4)
    t = unit_fp16(rng.standard_normal((5, 6)))
    thr = np.full(5, 0.1, np.float32)
    one = unit_fp16(rng.standard_normal((1, 6)))
    cases = [
        [],  # no blocks at all
        [(0, np.zeros((0, 6), np.float16))],  # one empty block
        [(0, one)],  # a single row, k > N
        [(0, np.zeros((0, 6), np.float16)), (0, one), (1, np.zeros((0, 6), np.float16))],
    ]
    for blocks in cases:
        x = np.concatenate([b for _, b in blocks]) if blocks else np.zeros((0, 6), np.float16)
        for precision in SCREENS:
            res = scan_arrays(blocks, t, thr, topk=3, config=KernelConfig(precision, DEVICE))
            assert_matches(res, brute(x, t, thr, 3))
    single = scan_arrays([(0, one)], t[:1], topk=1)
    assert single.topk_row.tolist() == [[0]] and single.row_argmax.tolist() == [0]


def test_fp32_tests_and_row_sink():
    rng = np.random.default_rng(5)
    x = unit_fp16(rng.standard_normal((300, 16)))
    t = rng.standard_normal((20, 16)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    thr = np.full(20, 0.4, np.float32)
    seen = []
    res = scan_arrays(
        split_blocks(x, [120]),
        t,
        thr,
        topk=3,
        row_sink=lambda i, off, mx, arg, mg: seen.append((i, off, mx, arg, mg)),
        collect_rows=False,
        chunk_rows=50,
    )
    ref = brute(x, t, thr, 3)
    assert res.row_max is None and res.row_margin is None
    assert [(i, off, len(mx)) for i, off, mx, _, _ in seen] == [(0, 0, 120), (1, 120, 180)]
    np.testing.assert_array_equal(np.concatenate([s[2] for s in seen]), ref["row_max"])
    np.testing.assert_array_equal(np.concatenate([s[3] for s in seen]), ref["row_argmax"])
    np.testing.assert_array_equal(np.concatenate([s[4] for s in seen]), ref["row_margin"])
    np.testing.assert_array_equal(res.topk_sim, ref["topk_sim"])
    np.testing.assert_array_equal(res.count_above, ref["count_above"])


def test_merge_topk_is_associative_over_shards(data):
    x, t, _ = data
    parts = [
        scan_arrays([(off, blk)], t, topk=6, collect_rows=False)
        for off, blk in split_blocks(x, [200, 450])
    ]
    p = [(r.topk_sim, r.topk_row) for r in parts]
    left = merge_topk(merge_topk(p[0], p[1]), p[2])
    right = merge_topk(p[2], merge_topk(p[1], p[0]))
    ref = brute(x, t, None, 6)
    for merged in (left, right):
        np.testing.assert_array_equal(merged[0], ref["topk_sim"])
        np.testing.assert_array_equal(merged[1], ref["topk_row"])


def test_progress_reports_rows(data):
    x, t, _ = data
    calls = []
    scan_arrays(
        split_blocks(x, [300]),
        t,
        topk=1,
        progress=lambda a, b: calls.append((a, b)),
        chunk_rows=200,
    )
    assert calls[-1][0] == len(x) and [a for a, _ in calls] == sorted(a for a, _ in calls)


def test_scan_store_keep_mask_and_files(tmp_path, data):
    x, t, thr = data
    store = write_store(tmp_path / "store", x, [f"p{i:05d}" for i in range(len(x))], MODEL, 250)
    ref = brute(x, t, thr, 5)
    calls = []
    res = scan_store(
        store,
        t,
        thr,
        ScanOptions(topk=5, out_dir=tmp_path / "scan", progress=lambda a, b: calls.append((a, b))),
    )
    assert_matches(res, ref)
    assert calls[-1] == (len(x), len(x))
    assert_matches(load_scan(tmp_path / "scan"), ref)
    names = [name for name, _, _ in iter_scan_rows(tmp_path / "scan")]
    assert names == [s.name for s in store.shards]
    no_rows = load_scan(tmp_path / "scan", rows=False)
    assert no_rows.row_max is None and no_rows.count_above is not None

    # Rescan a subset without copying: excluded rows are nobody's neighbour and get NaN/-1.
    mask = np.random.default_rng(6).random(len(x)) < 0.4
    offsets = {s.name: s.offset for s in store.shards}
    sub = scan_store(
        store,
        t,
        thr,
        ScanOptions(
            topk=5,
            keep=lambda name: mask[offsets[name] : offsets[name] + 250],
            config=KernelConfig("bf16"),
        ),
    )
    kept = np.flatnonzero(mask)
    sub_ref = brute(x[kept], t, thr, 5)
    np.testing.assert_array_equal(sub.topk_sim, sub_ref["topk_sim"])
    ids = np.where(sub_ref["topk_row"] >= 0, kept[sub_ref["topk_row"]], -1)
    np.testing.assert_array_equal(sub.topk_row, ids)
    np.testing.assert_array_equal(sub.count_above, sub_ref["count_above"])
    np.testing.assert_array_equal(sub.row_max[kept], sub_ref["row_max"])
    np.testing.assert_array_equal(sub.row_argmax[kept], sub_ref["row_argmax"])
    np.testing.assert_array_equal(sub.row_margin[kept], sub_ref["row_margin"])
    assert np.isnan(sub.row_max[~mask]).all() and (sub.row_argmax[~mask] == -1).all()
    assert np.isnan(sub.row_margin[~mask]).all()


def test_write_and_load_in_memory_result(tmp_path, data):
    x, t, _ = data
    res = scan_arrays([(0, x)], t, topk=2)
    write_scan(res, tmp_path / "s")
    back = load_scan(tmp_path / "s")
    assert_matches(back, brute(x, t, None, 2))


def test_rejects_bad_inputs(data):
    x, t, thr = data
    with pytest.raises(ValueError, match="no tests"):
        scan_arrays([(0, x)], t[:0])
    with pytest.raises(ValueError, match="finite"):
        scan_arrays([(0, x)], t, np.full(len(t), np.nan, np.float32))
    with pytest.raises(ValueError, match="d="):
        scan_arrays([(0, x[:, :5])], t)
    with pytest.raises(ValueError, match="precision"):
        scan_arrays([(0, x)], t, config=KernelConfig("fp16"))


# Small integer grids give duplicates, ties and thresholds exactly at similarities.
@st.composite
def scan_cases(draw):
    n = draw(st.integers(0, 40))
    m = draw(st.integers(1, 12))
    d = draw(st.integers(1, 12))
    grid = st.integers(-2, 2)
    x = unit_fp16(np.array(draw(st.lists(grid, min_size=n * d, max_size=n * d))).reshape(n, d))
    t = unit_fp16(np.array(draw(st.lists(grid, min_size=m * d, max_size=m * d))).reshape(m, d))
    thr = None
    if draw(st.booleans()):
        choices = np.unique(sims_of(x, t)).tolist() + [-1.0, 0.0, 0.5]
        thr = np.array(draw(st.lists(st.sampled_from(choices), min_size=m, max_size=m)), np.float32)
    cuts = draw(st.lists(st.integers(0, n), max_size=3))
    k = draw(st.integers(1, 6))
    tiles = (draw(st.integers(1, 24)), draw(st.integers(1, 8)))
    return x, t, thr, cuts, k, tiles, draw(st.sampled_from(SCREENS))


@settings(max_examples=90, deadline=None, derandomize=True)
@given(scan_cases())
def test_property_matches_bruteforce(case):
    x, t, thr, cuts, k, (tile_rows, tile_tests), precision = case
    res = scan_arrays(
        split_blocks(x, cuts),
        t,
        thr,
        topk=k,
        config=KernelConfig(precision, DEVICE, tile_rows, tile_tests),
    )
    assert_matches(res, brute(x, t, thr, k))
