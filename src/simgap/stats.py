"""Intervals for every accuracy the report shows: a two-way (seeds x test points) bootstrap.

A split's accuracy on a benchmark is the mean of a 0/1 matrix ``correct[seed, test]``: its models
(one per training seed) scored on the same test points. Both are samples: the seeds of all the
trainings that could have been run, the test points of all the images the benchmark could have
held. Each bootstrap replicate draws seeds and test points with replacement, independently, and
takes the mean over the drawn cells (a crossed bootstrap: the same drawn test points for every
seed). The 95% interval is the 2.5th and 97.5th percentile of the replicates.

Every model of a run is resampled with the *same* draws (one test draw per benchmark and
replicate, one seed draw per seed count and replicate): a difference of two splits is then
paired over the same test points and seeds, and its interval is far tighter than two separate
intervals suggest. Draws are multinomial counts, so a replicate is a weighted mean: two matrix
products, never a copy of the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class NotComputable(ValueError):
    """The data cannot support the estimate (too few models, no test points, a line with no
    slope): an analysis records it as not computed, with why. Anything else an analysis raises
    (unreadable or inconsistent files) is an error of the run."""


LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile interval (fractions for accuracies)."""

    mean: float
    lo: float
    hi: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the sign of the difference is resolved at this level."""
        return self.lo > 0 or self.hi < 0

    def as_dict(self, resolved: bool = False) -> dict:
        out = {"mean": self.mean, "lo": self.lo, "hi": self.hi}
        return {**out, "resolved": self.resolved} if resolved else out


def interval(
    point: float, replicates: np.ndarray, level: float = LEVEL, discrete: bool = False
) -> Interval:
    """The percentile interval of ``replicates`` around ``point`` (NaN replicates dropped).
    ``discrete``: the ends are replicate values (for a statistic on a grid, such as a pruning
    fraction), not interpolations between them."""
    reps = np.asarray(replicates, np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Interval(float(point), float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    if discrete:
        lo = np.percentile(reps, tail, method="lower")
        hi = np.percentile(reps, 100 - tail, method="higher")
    else:
        lo, hi = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(point), float(lo), float(hi))


class Bootstrap:
    """The shared draws of one analysis: test-point weights per benchmark, seed weights per seed
    count, ``replicates`` of each, from one seeded generator (the same run gives the same
    intervals)."""

    def __init__(self, tests: dict[str, int], replicates: int = 2000, seed: int = 0):
        if replicates < 1:
            raise ValueError(f"replicates must be at least 1, got {replicates}")
        self.replicates = replicates
        self.tests = dict(tests)
        self._seed = seed
        rng = np.random.default_rng(seed)
        # Benchmarks in sorted order: the draws of one do not depend on which others are listed.
        self._test_weights = {}
        for bench in sorted(self.tests):
            n = self.tests[bench]
            if n < 1:
                raise NotComputable(f"benchmark {bench} has no test points")
            self._test_weights[bench] = _counts(rng, n, replicates)
        self._seed_weights: dict[int, np.ndarray] = {}

    def seed_weights(self, seeds: int) -> np.ndarray:
        """``replicates x seeds`` draw counts; one seed is never resampled (weight 1)."""
        if seeds not in self._seed_weights:
            if seeds == 1:
                w = np.ones((self.replicates, 1))
            else:
                rng = np.random.default_rng([self._seed, seeds])
                w = _counts(rng, seeds, self.replicates)
            self._seed_weights[seeds] = w
        return self._seed_weights[seeds]

    def test_weights(self, bench: str) -> np.ndarray:
        return self._test_weights[bench]

    def replicate(self, correct: np.ndarray, bench: str) -> np.ndarray:
        """The mean of ``correct`` (seeds x tests, or one model's tests) in every replicate."""
        c = _matrix(correct, self.tests[bench], bench)
        ws = self.seed_weights(c.shape[0])  # B x S
        wt = self._test_weights[bench]  # B x n
        per_seed = wt @ c.T  # B x S: each seed's correct count under the replicate's test draw
        return (ws * per_seed).sum(axis=1) / (ws.sum(axis=1) * wt.sum(axis=1))


def _counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """Multinomial draw counts: row b says how often each of n items was drawn (n draws)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


def _matrix(correct: np.ndarray, n: int, bench: str) -> np.ndarray:
    c = np.asarray(correct, np.float64)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != n:
        raise ValueError(f"{bench}: expected {n} test points per seed, got shape {c.shape}")
    return c


def accuracy(boot: Bootstrap, correct: np.ndarray, bench: str) -> tuple[Interval, np.ndarray]:
    """Mean accuracy over seeds and test points, its interval, and its replicates."""
    reps = boot.replicate(correct, bench)
    return interval(float(np.mean(correct)), reps), reps


def mean_of(
    point: Sequence[float], replicates: Sequence[np.ndarray]
) -> tuple[Interval, np.ndarray]:
    """The mean over benchmarks (e.g. the mean OOD top-1), replicate by replicate: the draws of
    each benchmark are independent, the seed draws shared, as in the data."""
    reps = np.mean(np.stack(replicates), axis=0)
    return interval(float(np.mean(point)), reps), reps


def difference(
    a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]
) -> tuple[Interval, np.ndarray]:
    """Paired difference a − b of two estimates made with the same draws."""
    reps = a[1] - b[1]
    return interval(a[0] - b[0], reps), reps
