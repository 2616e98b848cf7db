"""Effective robustness and accuracy as a function of train-test similarity.

Effective robustness (Taori et al. 2020; Miller et al. 2021; Fang et al. 2022): reference models
trained on one distribution lie close to a line when ID and OOD accuracy are both put on a logit
axis. A model's effective robustness is its OOD accuracy minus what that line predicts at its ID
accuracy, in accuracy units (positive = more robust than the reference models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from simgap.stats import NotComputable

# Accuracies of exactly 0 or 1 have no logit: they are clipped to [EPS, 1 - EPS] before the
# transform, so a perfect model sits far out on the axis instead of at infinity.
EPS = 1e-4


@dataclass(frozen=True)
class Line:
    """logit(ood) = slope * logit(id) + intercept."""

    slope: float
    intercept: float

    def predict(self, id_acc: float | np.ndarray) -> float | np.ndarray:
        """The OOD accuracy the line expects at ``id_acc`` (accuracy units, in (0, 1))."""
        z = self.slope * logit(id_acc) + self.intercept
        out = 1.0 / (1.0 + np.exp(-z))
        return float(out) if np.ndim(out) == 0 else out


def logit(acc: float | np.ndarray) -> float | np.ndarray:
    p = np.clip(_accuracies(acc, "accuracy"), EPS, 1 - EPS)
    out = np.log(p / (1 - p))
    return float(out) if np.ndim(out) == 0 else out


def fit_line(id_acc: np.ndarray, ood_acc: np.ndarray) -> Line:
    """Least-squares line through reference models' (logit ID, logit OOD) accuracies."""
    x = logit(_accuracies(id_acc, "id_acc", vector=True))
    y = logit(_accuracies(ood_acc, "ood_acc", vector=True))
    if x.shape != y.shape:
        raise ValueError(f"id_acc and ood_acc differ in length: {x.size} vs {y.size}")
    if x.size < 2:
        raise NotComputable(f"a line needs at least 2 reference models, got {x.size}")
    if np.ptp(x) == 0:
        raise NotComputable(
            "all reference models have the same ID accuracy: the slope is undefined"
        )
    slope, intercept = np.polyfit(x, y, deg=1)
    return Line(float(slope), float(intercept))


def effective_robustness(
    line: Line, id_acc: float | np.ndarray, ood_acc: float | np.ndarray
) -> float | np.ndarray:
    """``ood_acc - line.predict(id_acc)``, in accuracy units."""
    ood = _accuracies(ood_acc, "ood_acc")
    out = ood - line.predict(id_acc)
    return float(out) if np.ndim(out) == 0 else out


def accuracy_by_similarity(correct: np.ndarray, nn_sim: np.ndarray, bins: int = 10) -> pa.Table:
    """Accuracy in equal-count bins of each test point's NN similarity to the training set.

    Points are sorted by similarity (stable, so ties keep input order) and cut into
    ``min(bins, n)`` runs whose sizes differ by at most one. ``bin_lo``/``bin_hi`` are the
    smallest and largest similarity inside a bin. Columns: bin_lo, bin_hi, n, accuracy.
    """
    hit = np.asarray(correct)
    sim = np.asarray(nn_sim, dtype=np.float64)
    if hit.ndim != 1 or sim.ndim != 1 or hit.shape != sim.shape:
        raise ValueError(
            f"correct and nn_sim must be 1-d and equal in length: {hit.shape} {sim.shape}"
        )
    if hit.dtype != np.bool_:
        raise ValueError(f"correct must be a bool array, got {hit.dtype}")
    if not np.isfinite(sim).all():
        raise ValueError("nn_sim holds NaN or infinite values")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    order = np.argsort(sim, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, sim.size)) if p.size] if sim.size else []
    return pa.table(
        {
            "bin_lo": pa.array([float(sim[p].min()) for p in parts], pa.float64()),
            "bin_hi": pa.array([float(sim[p].max()) for p in parts], pa.float64()),
            "n": pa.array([int(p.size) for p in parts], pa.int64()),
            "accuracy": pa.array([float(hit[p].mean()) for p in parts], pa.float64()),
        }
    )


def _accuracies(values: float | np.ndarray, name: str, vector: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if vector and arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d sequence of accuracies")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"{name} must hold accuracies in [0, 1] (fractions, not percent)")
    return arr
