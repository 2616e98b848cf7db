"""Contamination audit: which test points have a near-duplicate in a base set.

Two methods (``verify``):

- ``"none"`` (the paper's): a pair (test point, base row) is a near-duplicate when their embedding
  similarity is strictly above ``threshold``. The exact scan screens the base set (per-row margin
  against a constant threshold); only the rows it flags are re-read to list their pairs.
- ``"pixels"`` (default): two stages. Candidates are each test point's top-k base rows by
  embedding similarity (the scan) and by an 8x8 thumbnail descriptor (one streamed pass over the
  base images); each candidate is then verified on pixels (``pixels.match_score``: best
  normalised cross-correlation over small crops and shifts) and kept when the score is at least
  ``pixel_threshold``. Embedding similarity alone cannot tell a copy of an image from another
  image of its class with a small model; the pixels can.

Outputs (``out_dir``): ``audit.json`` {"method", "threshold", "benchmarks": {name: {"tests",
"contaminated", "fraction"}}, "pairs", "base"} (+ "verify": the pixel stage's parameters and
candidate counts; + "ground_truth": precision/recall/tp/fp/fn at the pair level when the injected
pairs are given) and ``pairs.parquet`` (benchmark, test_key, base_key, similarity[, pixel_score]),
sorted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simgap.audit import pixels
from simgap.io import sha256_bytes, write_json, write_parquet
from simgap.layout import benchmark_name
from simgap.store import Store, check_compatible
from simgap.types import Log

# Chosen on the world (see the README's audit section for the measurement behind it).
DEFAULT_THRESHOLD = 0.95
VERIFY_METHODS = ("pixels", "none")
DEFAULT_VERIFY = "pixels"


def store_name(store: Store) -> str:
    """A benchmark's name from its store folder (``stores/bench-sketch`` → ``sketch``)."""
    return benchmark_name(store.path.name)


def audit(
    tests: Mapping[str, Store] | Store,
    base: Store,
    threshold: float = DEFAULT_THRESHOLD,
    ground_truth: pa.Table | None = None,
    out_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    verify: str = DEFAULT_VERIFY,
    pixel_threshold: float = pixels.PIXEL_THRESHOLD,
    topk: int = pixels.THUMB_TOPK,
    log: Log | None = None,
) -> dict[str, Any]:
    """Audit every benchmark in ``tests`` (name → store, or one store named by its folder)
    against ``base``; ``ground_truth`` has columns pool_key, benchmark, test_key. ``verify``
    picks the method (module docstring); ``threshold`` is the embedding threshold of ``"none"``,
    ``pixel_threshold`` and ``topk`` (candidates per test point and descriptor) those of
    ``"pixels"``."""
    from simgap.scan import ScanOptions, scan_store

    if verify not in VERIFY_METHODS:
        raise ValueError(f"unknown audit verification {verify!r}; known: {VERIFY_METHODS}")
    if isinstance(tests, Store):
        tests = {store_name(tests): tests}
    if not tests:
        raise ValueError("audit needs at least one benchmark store")
    check_compatible(base, *tests.values())
    names = list(tests)
    embs = [tests[n].embeddings() for n in names]
    keys = [np.array(tests[n].keys(), dtype=object) for n in names]
    bench_of = np.concatenate([np.full(len(e), i, np.int32) for i, e in enumerate(embs)])
    test_keys = np.concatenate(keys)
    emb = np.concatenate(embs)
    thr = np.float32(threshold)
    report: dict[str, Any] = {"method": verify, "threshold": float(threshold)}
    if verify == "none":
        thresholds = np.full(len(emb), thr, np.float32)
        res = scan_store(base, emb, thresholds, ScanOptions(topk=0, progress=progress))
        pairs = _pairs(base, emb.astype(np.float32), res.row_margin, thr)
        cols: dict[str, list] = {}
    else:
        sources = [s for n in names for s in _sources(tests[n], tests[n].keys_table())]
        k = min(topk, base.rows)
        res = scan_store(base, emb, options=ScanOptions(topk=k, progress=progress))
        pairs, cols, report["verify"] = _verified_pairs(
            base,
            emb.astype(np.float32),
            list(test_keys),
            sources,
            res.topk_row,
            k,
            pixel_threshold,
            log,
        )
    table = _pairs_table(names, bench_of, test_keys, pairs, cols)
    report.update(
        {
            "benchmarks": _benchmark_counts(names, bench_of, pairs),
            "pairs": table.num_rows,
            "base": {"rows": base.rows, "shards_sha256": [s.sha256 for s in base.shards]},
        }
    )
    if ground_truth is not None:
        report["ground_truth"] = score_pairs(table, ground_truth, names)
    if out_dir is not None:
        write_parquet(Path(out_dir) / "pairs.parquet", table)
        write_json(Path(out_dir) / "audit.json", report)
    return report


def _pairs_table(
    names: list[str],
    bench_of: np.ndarray,
    test_keys: np.ndarray,
    pairs: list[tuple[int, str, float]],
    cols: dict[str, list],
) -> pa.Table:
    """One row per (test, base) pair found, sorted so that reruns write the same bytes."""
    return pa.table(
        {
            "benchmark": pa.array([names[bench_of[t]] for t, _, _ in pairs], pa.string()),
            "test_key": pa.array([test_keys[t] for t, _, _ in pairs], pa.string()),
            "base_key": pa.array([k for _, k, _ in pairs], pa.string()),
            "similarity": pa.array([s for _, _, s in pairs], pa.float32()),
            **{c: pa.array(v, pa.float32()) for c, v in cols.items()},
        }
    ).sort_by([("benchmark", "ascending"), ("test_key", "ascending"), ("base_key", "ascending")])


def _benchmark_counts(
    names: list[str], bench_of: np.ndarray, pairs: list[tuple[int, str, float]]
) -> dict[str, dict[str, Any]]:
    """Per benchmark: its test points, how many have a pair, and that fraction."""
    hit = np.zeros(len(bench_of), bool)
    hit[[t for t, _, _ in pairs]] = True
    counts = {}
    for i, n in enumerate(names):
        sel = bench_of == i
        c = int(hit[sel].sum())
        counts[n] = {
            "tests": int(sel.sum()),
            "contaminated": c,
            "fraction": c / max(int(sel.sum()), 1),
        }
    return counts


def _pairs(
    base: Store, tests: np.ndarray, margin: np.ndarray, thr: np.float32
) -> list[tuple[int, str, float]]:
    """(test index, base key, similarity) of every pair above ``thr`` among the flagged rows."""
    out = []
    for s in base.shards:
        rows = np.flatnonzero(margin[s.offset : s.offset + s.rows] > 0)
        if not len(rows):
            continue
        emb = np.asarray(base.read_emb(s.name)[rows], np.float64)
        shard_keys = base.read_keys(s.name).column("key").to_pylist()
        # float64 sums of fp16 products are exact; one rounding to float32 gives the scan's value,
        # so a pair exactly at the threshold is decided as the scan decided it.
        sims = (emb @ np.asarray(tests, np.float64).T).astype(np.float32)
        for r, t in zip(*np.nonzero(sims > thr), strict=True):
            out.append((int(t), shard_keys[rows[r]], float(sims[r, t])))
    return out


def _sources(store: Store, keys: pa.Table) -> list[str]:
    """The ``source`` column that finds a store's samples again (needed to verify on pixels)."""
    if "source" not in keys.column_names:
        raise ValueError(
            f"{store.path}: keys table has no 'source' column, so its images cannot be found "
            "again for pixel verification (use --verify none)"
        )
    return keys.column("source").to_pylist()


def _shard_images(base: Store, shard: str, rows: np.ndarray | None = None):
    """(keys, working-resolution images) of one base shard, or of its ``rows`` only."""
    kt = base.read_keys(shard)
    keys, src = kt.column("key").to_pylist(), _sources(base, kt)
    if rows is not None:
        keys, src = [keys[r] for r in rows], [src[r] for r in rows]
    return keys, pixels.load_images(keys, src)


def _verified_pairs(
    base: Store,
    emb: np.ndarray,
    test_keys: list[str],
    test_sources: list[str],
    emb_top: np.ndarray,
    k: int,
    pixel_threshold: float,
    log: Log | None,
) -> tuple[list[tuple[int, str, float]], dict[str, list], dict[str, Any]]:
    """The pixel method: thumbnail top-k ∪ embedding top-k candidates, each verified on pixels.

    Streams the base shards twice: once for thumbnails, once for the candidates' images only."""
    test_imgs = pixels.load_images(test_keys, test_sources)
    t_thumb = pixels.thumbnails(test_imgs)
    best_sim = np.full((len(test_keys), k), -np.inf, np.float32)
    best_row = np.full((len(test_keys), k), -1, np.int64)
    for s in base.shards:  # running top-k by thumbnail similarity
        _, imgs = _shard_images(base, s.name)
        sims = t_thumb @ pixels.thumbnails(imgs).T
        rows = np.broadcast_to(s.offset + np.arange(s.rows), sims.shape)
        allsim, allrow = np.hstack([best_sim, sims]), np.hstack([best_row, rows])
        order = np.argsort(-allsim, axis=1, kind="stable")[:, :k]
        best_sim = np.take_along_axis(allsim, order, 1)
        best_row = np.take_along_axis(allrow, order, 1)
    cand = sorted(
        {(t, int(r)) for t in range(len(test_keys)) for r in best_row[t] if r >= 0}
        | {(t, int(r)) for t in range(len(test_keys)) for r in emb_top[t] if r >= 0}
    )
    by_row: dict[int, list[int]] = {}
    for t, r in cand:
        by_row.setdefault(r, []).append(t)
    pairs, scores, done = [], [], 0
    verifier = pixels.Verifier(test_imgs)
    for s in base.shards:
        rows = np.array(sorted(r for r in by_row if s.offset <= r < s.offset + s.rows), np.int64)
        if not len(rows):
            continue
        keys, imgs = _shard_images(base, s.name, rows - s.offset)
        b_emb = np.asarray(base.read_emb(s.name)[rows - s.offset], np.float32)
        for j, r in enumerate(rows):
            ids = by_row[int(r)]
            for t, score in zip(ids, verifier.scores(imgs[j], ids), strict=True):
                if score >= pixel_threshold:
                    pairs.append((t, keys[j], float(b_emb[j] @ emb[t])))
                    scores.append(float(score))
            done += len(ids)
        if log is not None:
            log(f"audit: verified {done}/{len(cand)} candidate pairs on pixels")
    params = {
        "candidates": {
            "thumbnail_side": pixels.THUMB_SIDE,
            "thumbnail_topk": k,
            "embedding_topk": k,
            "pairs": len(cand),
        },
        "pixels": {
            "side": pixels.SIDE,
            "max_crop": pixels.MAX_CROP,
            "blur": "[1,2,1]/4",
            "statistic": "max normalised cross-correlation over crop sides and shifts",
            "threshold": float(pixel_threshold),
            "coarse_threshold": pixels.COARSE_THRESHOLD,
        },
    }
    return pairs, {"pixel_score": scores}, params


def score_pairs(found: pa.Table, truth: pa.Table, benchmarks: list[str]) -> dict[str, Any]:
    """Pair-level precision and recall of the audit against injected near-duplicates."""
    for col in ("pool_key", "benchmark", "test_key"):
        if col not in truth.column_names:
            raise ValueError(f"ground truth lacks column {col!r} (has {truth.column_names})")
    want = set(benchmarks)
    true = {
        (b, t, p)
        for b, t, p in zip(
            truth.column("benchmark").to_pylist(),
            truth.column("test_key").to_pylist(),
            truth.column("pool_key").to_pylist(),
            strict=True,
        )
        if b in want
    }
    got = set(
        zip(
            found.column("benchmark").to_pylist(),
            found.column("test_key").to_pylist(),
            found.column("base_key").to_pylist(),
            strict=True,
        )
    )
    tp = len(got & true)
    fp, fn = len(got) - tp, len(true) - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / len(got) if got else 1.0,
        "recall": tp / len(true) if true else 1.0,
        "truth_sha256": sha256_bytes("\n".join("\t".join(x) for x in sorted(true)).encode()),
    }
