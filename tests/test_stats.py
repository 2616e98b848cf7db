"""simgap.stats: the two-way bootstrap against a numpy brute force, its coverage on synthetic
data, and paired against unpaired differences."""

from __future__ import annotations

import numpy as np
import pytest

from simgap import stats


def test_replicates_equal_the_brute_force_resampling():
    """A replicate is the mean over the drawn seeds and test points, each drawn cell counted as
    often as it was drawn: resample with explicit indices and compare."""
    rng = np.random.default_rng(5)
    correct = (rng.random((3, 40)) < 0.6).astype(float)
    boot = stats.Bootstrap({"b": 40}, replicates=50, seed=1)
    reps = boot.replicate(correct, "b")
    ws, wt = boot.seed_weights(3), boot.test_weights("b")
    for i in range(50):
        seeds = np.repeat(np.arange(3), ws[i].astype(int))
        tests = np.repeat(np.arange(40), wt[i].astype(int))
        assert len(seeds) == 3 and len(tests) == 40
        assert reps[i] == pytest.approx(correct[np.ix_(seeds, tests)].mean(), abs=1e-12)


def test_one_seed_is_a_test_point_bootstrap():
    correct = np.r_[np.ones(30), np.zeros(70)]
    boot = stats.Bootstrap({"b": 100}, replicates=4000, seed=0)
    iv, reps = stats.accuracy(boot, correct, "b")
    assert iv.mean == 0.3
    # The binomial standard error sqrt(.3 * .7 / 100) = 0.0458: a 95% interval of about ±0.09.
    assert reps.std() == pytest.approx(0.0458, rel=0.08)
    assert iv.lo == pytest.approx(0.21, abs=0.015) and iv.hi == pytest.approx(0.39, abs=0.015)


def test_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    """Synthetic experiments: each seed's model has its own accuracy (seed variance) and each
    test point its own difficulty; the interval must cover the population mean in most."""
    rng = np.random.default_rng(0)
    truth, covered, trials = 0.6, 0, 120
    for t in range(trials):
        seed_acc = np.clip(truth + rng.normal(0, 0.04, 10), 0, 1)
        correct = (rng.random((10, 400)) < seed_acc[:, None]).astype(float)
        boot = stats.Bootstrap({"b": 400}, replicates=400, seed=t)
        iv, _ = stats.accuracy(boot, correct, "b")
        covered += iv.lo <= truth <= iv.hi
    # 118 of 120 here. Binomial(120, 0.95) is above 105 with probability > 0.99; a bootstrap over
    # test points alone ignores the seed variance and covers 87 of these 120.
    assert covered >= 105, covered


def test_paired_difference_is_tighter_than_the_unpaired_one_and_resolves():
    """Two models that agree on most test points, one slightly better: the paired interval over
    the same test points excludes 0, the difference of two separate intervals does not."""
    rng = np.random.default_rng(3)
    base = (rng.random(500) < 0.5).astype(float)
    better = base.copy()
    flip = np.flatnonzero(base == 0)[:20]  # 4 points better, nothing worse
    better[flip] = 1
    boot = stats.Bootstrap({"b": 500}, replicates=2000, seed=0)
    a, b = stats.accuracy(boot, better, "b"), stats.accuracy(boot, base, "b")
    paired, _ = stats.difference((a[0].mean, a[1]), (b[0].mean, b[1]))
    assert paired.mean == pytest.approx(0.04)
    assert paired.resolved and paired.lo > 0
    # Unpaired: the two intervals overlap widely.
    assert a[0].lo < b[0].hi
    other = stats.Bootstrap({"b": 500}, replicates=2000, seed=99)
    unpaired = a[1] - stats.accuracy(other, base, "b")[1]
    assert np.percentile(unpaired, 2.5) < 0 < np.percentile(unpaired, 97.5)


def test_resolved_needs_the_interval_to_exclude_zero():
    assert stats.Interval(0.1, 0.01, 0.2).resolved
    assert stats.Interval(-0.1, -0.2, -0.01).resolved
    assert not stats.Interval(0.1, -0.01, 0.2).resolved
    assert stats.Interval(0.1, -0.01, 0.2).as_dict(resolved=True)["resolved"] is False


def test_draws_do_not_depend_on_the_other_benchmarks_listed():
    one = stats.Bootstrap({"a": 10, "b": 20}, replicates=5, seed=2)
    two = stats.Bootstrap({"b": 20, "a": 10}, replicates=5, seed=2)
    np.testing.assert_array_equal(one.test_weights("b"), two.test_weights("b"))
    with pytest.raises(ValueError, match="expected 10 test points"):
        one.replicate(np.ones((2, 11)), "a")
