"""The FAISS IVF look-up: the recall it records equals a brute-force computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simgap.scan.lookup import IvfConfig, build_ivf, open_ivf
from simgap.store import write_store

MODEL = {"arch": "test", "pretrained": "none"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    rng = np.random.default_rng(31)
    # Clustered data, as real embeddings are: IVF recall is then high but below 1 at nprobe 1.
    centers = rng.standard_normal((20, 16))
    x = centers[rng.integers(0, 20, 3000)] + 0.6 * rng.standard_normal((3000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    keys = [f"p{i:05d}" for i in range(len(x))]
    return write_store(tmp_path_factory.mktemp("ivf") / "base", x, keys, MODEL, 700), x


def brute_recall(x: np.ndarray, queries: np.ndarray, approx: np.ndarray, k: int) -> float:
    sims = (queries.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    exact = np.lexsort((np.broadcast_to(np.arange(len(x)), sims.shape), -sims), axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


@pytest.mark.parametrize("nprobe", [1, 32])
def test_recall_recorded_matches_bruteforce(base, tmp_path, nprobe):
    store, x = base
    cfg = IvfConfig(nlist=32, nprobe=nprobe, codec="Flat", train_rows=2000, recall_queries=200)
    meta = build_ivf(store, tmp_path / "ivf", cfg)
    assert json.loads((tmp_path / "ivf" / "index.json").read_text()) == meta
    index = open_ivf(tmp_path / "ivf", store.path)
    q_rows = np.array(meta["queries"]["store_rows"])
    queries = x[q_rows]
    sims, rows, keys = index.search(queries, cfg.k)
    want = brute_recall(x, queries, rows, cfg.k)
    assert meta["recall_at_k"] == pytest.approx(want, abs=1e-12)
    assert keys[0, 0] == f"p{rows[0, 0]:05d}"
    if nprobe == cfg.nlist:
        assert meta["recall_at_k"] == 1.0  # every list visited: exhaustive
    else:
        assert 0.3 < meta["recall_at_k"] < 1.0


def test_given_queries_and_stale_index(base, tmp_path):
    store, x = base
    rng = np.random.default_rng(32)
    q = rng.standard_normal((50, 16))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float16)
    cfg = IvfConfig(nlist=16, nprobe=2, codec="SQfp16", train_rows=3000, k=5)
    meta = build_ivf(store, tmp_path / "ivf", cfg, queries=q)
    _, rows, _ = open_ivf(tmp_path / "ivf", store).search(q, 5)
    assert meta["recall_at_k"] == pytest.approx(brute_recall(x, q, rows, 5), abs=1e-12)
    other = write_store(tmp_path / "other", x[:100], [f"o{i}" for i in range(100)], MODEL)
    with pytest.raises(ValueError, match="another version"):
        open_ivf(tmp_path / "ivf", other)
