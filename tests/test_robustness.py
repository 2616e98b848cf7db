"""simgap.robustness: the logit-axis line, effective robustness and similarity bins."""

from __future__ import annotations

import numpy as np
import pytest

from simgap.robustness import (
    Line,
    accuracy_by_similarity,
    effective_robustness,
    fit_line,
    logit,
)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_fit_recovers_a_known_line_on_logit_axes():
    # Reference models placed exactly on logit(ood) = 0.8 logit(id) - 1.2.
    id_acc = np.array([0.2, 0.35, 0.5, 0.62, 0.75, 0.9])
    ood_acc = _sigmoid(0.8 * np.log(id_acc / (1 - id_acc)) - 1.2)
    line = fit_line(id_acc, ood_acc)
    assert line.slope == pytest.approx(0.8, abs=1e-9)
    assert line.intercept == pytest.approx(-1.2, abs=1e-9)
    assert line.predict(0.5) == pytest.approx(_sigmoid(-1.2))
    np.testing.assert_allclose(line.predict(id_acc), ood_acc, rtol=1e-9)


def test_fit_is_least_squares_in_logit_space():
    rng = np.random.default_rng(3)
    id_acc = rng.uniform(0.1, 0.9, 40)
    ood_acc = np.clip(_sigmoid(1.1 * logit(id_acc) - 0.5 + rng.normal(0, 0.2, 40)), 0.01, 0.99)
    line = fit_line(id_acc, ood_acc)
    # Brute force: normal equations on the logit-transformed points.
    x, y = logit(id_acc), logit(ood_acc)
    a = np.stack([x, np.ones_like(x)], axis=1)
    slope, intercept = np.linalg.solve(a.T @ a, a.T @ y)
    assert (line.slope, line.intercept) == pytest.approx((slope, intercept), abs=1e-9)
    assert line.slope == pytest.approx(1.1, abs=0.15)


def test_effective_robustness_is_distance_to_the_line_in_accuracy_units():
    line = Line(slope=1.0, intercept=0.0)  # ood = id
    assert effective_robustness(line, 0.6, 0.7) == pytest.approx(0.1)
    assert effective_robustness(line, 0.6, 0.5) == pytest.approx(-0.1)
    line = fit_line([0.3, 0.5, 0.7], _sigmoid(0.5 * logit(np.array([0.3, 0.5, 0.7])) - 1.0))
    er = effective_robustness(line, np.array([0.5, 0.5]), np.array([0.4478, _sigmoid(-1.0)]))
    np.testing.assert_allclose(er, [0.4478 - _sigmoid(-1.0), 0.0], atol=1e-9)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        fit_line([0.5], [0.4])
    with pytest.raises(ValueError, match="same ID accuracy"):
        fit_line([0.5, 0.5], [0.4, 0.3])
    with pytest.raises(ValueError, match="not percent"):
        fit_line([50.0, 60.0], [40.0, 45.0])
    with pytest.raises(ValueError, match="differ in length"):
        fit_line([0.5, 0.6], [0.4, 0.3, 0.2])


def test_perfect_accuracy_is_clipped_not_infinite():
    line = fit_line([0.0, 0.5, 1.0], [0.1, 0.3, 1.0])
    assert np.isfinite(line.slope) and np.isfinite(line.intercept)
    assert 0 < line.predict(1.0) < 1


def test_accuracy_by_similarity_equal_count_bins_match_brute_force():
    rng = np.random.default_rng(0)
    sim = rng.uniform(0.3, 1.0, 103)
    correct = rng.uniform(size=103) < sim  # accuracy rises with similarity
    table = accuracy_by_similarity(correct, sim, bins=10)
    assert table.column_names == ["bin_lo", "bin_hi", "n", "accuracy"]
    n = table.column("n").to_pylist()
    assert sum(n) == 103 and max(n) - min(n) <= 1 and len(n) == 10
    order = np.argsort(sim, kind="stable")
    start = 0
    for row in table.to_pylist():
        idx = order[start : start + row["n"]]
        assert row["bin_lo"] == sim[idx].min() and row["bin_hi"] == sim[idx].max()
        assert row["accuracy"] == pytest.approx(correct[idx].mean())
        start += row["n"]
    lo, hi = table.column("bin_lo").to_pylist(), table.column("bin_hi").to_pylist()
    assert all(h <= nxt for h, nxt in zip(hi, lo[1:], strict=False))
    acc = table.column("accuracy").to_pylist()
    assert acc[-1] > acc[0]


def test_accuracy_by_similarity_small_and_bad_inputs():
    table = accuracy_by_similarity(np.array([True, False, True]), np.array([0.9, 0.1, 0.5]))
    assert table.num_rows == 3  # fewer points than bins: one point per bin, none empty
    assert table.column("accuracy").to_pylist() == [0.0, 1.0, 1.0]
    assert accuracy_by_similarity(np.array([], bool), np.array([])).num_rows == 0
    with pytest.raises(ValueError, match="bool"):
        accuracy_by_similarity(np.array([1, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        accuracy_by_similarity(np.array([True]), np.array([np.nan]))
    with pytest.raises(ValueError, match="equal in length"):
        accuracy_by_similarity(np.array([True]), np.array([0.1, 0.2]))


def test_guarded_records_what_the_data_cannot_support_and_raises_the_rest():
    from simgap.analysis import guarded

    logged = []

    def no_slope():
        fit_line([0.5, 0.5], [0.4, 0.3])

    doc = guarded("robustness", no_slope, logged.append)
    assert doc["computed"] is False and "same ID accuracy" in doc["why"]
    assert logged and "not computed" in logged[0]

    def corrupt():
        raise ValueError("eval/x-photo.parquet: test keys differ")

    with pytest.raises(ValueError, match="test keys differ"):
        guarded("robustness", corrupt, logged.append)
