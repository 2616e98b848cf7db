"""Split policies as pure functions over scan outputs, each a boolean keep-mask over pool rows.

Orderings are total (score, then row index), so every policy is deterministic; the random policy
takes an explicit seed.
"""

from __future__ import annotations

import zlib

import numpy as np


def gapmatch(margins: list[np.ndarray]) -> np.ndarray:
    """Keep a pool row iff no test point of any given benchmark finds it strictly more similar than
    that test point's threshold (its NN similarity to the reference set): every margin ≤ 0."""
    if not margins:
        raise ValueError("gapmatch needs the margins of at least one benchmark")
    return np.logical_and.reduce([m <= 0 for m in margins])


def union_score(scores: list[np.ndarray]) -> np.ndarray:
    """m(x) over the union of benchmarks: the max of the per-benchmark maxima."""
    return np.maximum.reduce(scores)


def _check_size(total: int, n: int) -> None:
    if not 0 <= n <= total:
        raise ValueError(f"split size {n} is outside [0, {total}] (the pool's size)")


def _order(score: np.ndarray) -> np.ndarray:
    # lexsort is stable on (score, row): equal scores keep their row order.
    return np.lexsort((np.arange(len(score)), score))


def near_pruned(score: np.ndarray, n: int) -> np.ndarray:
    """Keep the n rows least similar to the benchmarks (the most similar are removed first)."""
    _check_size(len(score), n)
    keep = np.zeros(len(score), bool)
    keep[_order(score)[:n]] = True
    return keep


def far_pruned(score: np.ndarray, n: int) -> np.ndarray:
    """Keep the n rows most similar to the benchmarks (the least similar are removed first)."""
    _check_size(len(score), n)
    keep = np.zeros(len(score), bool)
    keep[_order(-score)[:n]] = True
    return keep


def split_seed(seed: int, name: str) -> int:
    """A seeded split's seed, from the experiment's seed and the split's own name (not its
    position: adding a split changes no other split). Controls of different splits get different
    seeds, so their random subsets are not nested in one another."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def random_split(total: int, n: int, seed: int) -> np.ndarray:
    _check_size(total, n)
    keep = np.zeros(total, bool)
    keep[np.random.default_rng(seed).permutation(total)[:n]] = True
    return keep


def resolve_size(size: int | float, total: int) -> int:
    """A count (int), or a fraction of the pool (float in [0, 1])."""
    if isinstance(size, float):
        if not 0 <= size <= 1:
            raise ValueError(f"split fraction {size} is outside [0, 1]")
        return int(round(size * total))
    n = int(size)
    _check_size(total, n)
    return n


def parse_size(text: str) -> int | float:
    """``"0.25"`` → a fraction, ``"1000"`` → a count (the CLI's ``--size``)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"size {text!r} is neither a count nor a fraction") from None


def coreset(score: np.ndarray, n: int) -> np.ndarray:
    """The paper's coreset: far-pruned (most similar kept) against all benchmarks at once;
    ``score`` is the union score over every benchmark."""
    return far_pruned(score, n)
