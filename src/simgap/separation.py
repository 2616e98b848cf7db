"""How well the similarity model separates classes, which every gap depends on: k-NN top-1 of
the ID benchmark's test points against the reference set's labelled embeddings
(``analysis/separation.json``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simgap import stats
from simgap.io import write_json
from simgap.layout import RunLayout
from simgap.store import Store


def knn_predict(
    reference: Store, labels: np.ndarray, tests: np.ndarray, k: int, chunk: int = 16384
) -> np.ndarray:
    """Each test embedding's class by a majority of its k nearest reference embeddings (cosine);
    a tie goes to the class of the nearest tied neighbour. The reference set is read a shard at
    a time, in chunks: ImageNet-train does not fit beside its similarity matrix."""
    q = tests.astype(np.float32)
    best_sim = np.full((len(q), 0), -np.inf, np.float32)
    best_lab = np.zeros((len(q), 0), np.int64)
    for offset, _, block in reference.iter_blocks():
        for start in range(0, len(block), chunk):
            emb = np.asarray(block[start : start + chunk], np.float32)
            sim = q @ emb.T
            lab = np.broadcast_to(labels[offset + start : offset + start + len(emb)], sim.shape)
            sim = np.concatenate([best_sim, sim], axis=1)
            lab = np.concatenate([best_lab, lab], axis=1)
            keep = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            best_sim = np.take_along_axis(sim, keep, axis=1)
            best_lab = np.take_along_axis(lab, keep, axis=1)
    out = np.empty(len(q), np.int64)
    for i, row in enumerate(best_lab):  # sorted nearest first
        classes, counts = np.unique(row, return_counts=True)
        tied = set(classes[counts == counts.max()].tolist())
        out[i] = next(c for c in row if c in tied)
    return out


def _reference_classes(sources: list[str], names: list[str]) -> np.ndarray:
    """Reference rows' labels in the benchmark's class indices: by class folder name, or by
    WordNet id for an ImageNet-train folder against a benchmark with ImageNet's 1000 classes."""
    folders = [Path(s).parent.name for s in sources]
    index = {n: i for i, n in enumerate(names)}
    if all(f in index for f in folders):
        return np.array([index[f] for f in folders])
    from simgap.data.clip_benchmark import imagenet_wnids

    wnids = {w: i for i, w in enumerate(imagenet_wnids())}
    if len(names) == len(wnids) and all(f in wnids for f in folders):
        return np.array([wnids[f] for f in folders])
    unknown = sorted({f for f in folders if f not in index})
    raise stats.NotComputable(
        f"reference class folders are not the benchmark's class names ({len(unknown)} unknown, "
        f"first: {unknown[0]!r})"
    )


def separation_analysis(
    reference: Store,
    tests: Store,
    classnames: list[str],
    bench: str,
    out: Path,
    k: int = 10,
    max_tests: int = 2000,
    seed: int = 0,
) -> dict:
    """How well the similarity model separates classes, which every gap depends on: k-NN top-1
    of the ID benchmark's test points against the reference set's labelled embeddings, with a
    bootstrap interval over test points (at most max_tests, a seeded sample)."""
    ref_table = reference.keys_table()
    labels = _reference_classes(ref_table.column("source").to_pylist(), classnames)
    test_table = tests.keys_table()
    emb = tests.embeddings()
    idx = np.arange(len(emb))
    if len(idx) > max_tests:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_tests, replace=False))
    truth = np.array(test_table.column("label").to_pylist())[idx]
    correct = (knn_predict(reference, labels, emb[idx], k) == truth).astype(np.float64)
    boot = stats.Bootstrap({bench: len(idx)}, 2000, seed)
    iv, _ = stats.accuracy(boot, correct, bench)
    doc = {
        "benchmark": bench,
        "k": k,
        "tests": int(len(idx)),
        "reference": int(reference.rows),
        "classes": len(classnames),
        "chance": 1.0 / len(classnames),
        "accuracy": iv.as_dict(),
    }
    write_json(RunLayout(out).separation, doc)
    return {"computed": True, "accuracy": iv.mean}
