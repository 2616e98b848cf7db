"""The paper's two claims, computed from a run's outcomes: each a value with its 95% interval and
one sentence whose every direction and verdict comes from the numbers (never a fixed string).

1. How much mean OOD top-1 drops from the full pool to the combined gap-matched split, against
   the drop to its size-matched random control.
2. The smallest far-pruned (coreset) fraction whose mean OOD top-1 is within (or above) the full
   pool's 95% interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from simgap import stats

MEAN_OOD = "mean-ood"


class Estimates(Protocol):
    trained: list[str]

    def estimate(self, split: str, bench: str) -> tuple[float, np.ndarray]: ...


def pp(x: float) -> str:
    return f"{100 * x:.1f}"


def ci(iv: stats.Interval) -> str:
    return f"95% CI [{pp(iv.lo)}, {pp(iv.hi)}]"


def _claim(text: str, iv: stats.Interval | None) -> dict[str, Any]:
    if iv is None:
        return {"text": text, "value": None, "lo": None, "hi": None}
    return {"text": text, "value": iv.mean, "lo": iv.lo, "hi": iv.hi}


def baseline(meta: Mapping[str, Mapping], split: str | None = None) -> str | None:
    """The full-pool model to compare a split with: of the full-pool splits (the full pool
    alone, the full pool plus the reference set), the one that adds the reference set exactly
    when the split does; the first one when none matches or no split is given."""
    fulls = [s for s, m in meta.items() if m.get("policy") == "full"]
    if split is not None and split in meta:
        added = bool(meta[split].get("reference_added"))
        same = [s for s in fulls if bool(meta[s].get("reference_added")) == added]
        if same:
            return same[0]
    return fulls[0] if fulls else None


def verdict(iv: stats.Interval) -> str:
    """Whether an interval of a difference resolves its sign, in words."""
    if iv.resolved:
        return "resolved (the interval excludes 0)"
    return "not resolved (the interval includes 0)"


def ood_drop(est: Estimates, meta: Mapping[str, Mapping]) -> dict[str, Any]:
    """Claim 1: full → combined gap-matched split, against full → its random control."""
    combined = next(
        (
            s
            for s, m in meta.items()
            if str(m.get("policy")) == "gapmatch" and len(m.get("benchmarks") or []) > 1
        ),
        None,
    )
    full = baseline(meta, combined)
    control = next(
        (s for s, m in meta.items() if combined and m.get("control_of") == combined), None
    )
    missing = [
        what
        for what, s in (
            ("the full pool", full),
            ("the combined split", combined),
            ("its control", control),
        )
        if s is None
    ]
    if missing:
        return _claim(
            "OOD drop from the full pool to the combined gap-matched split: not computed "
            f"(this run trained no model on {', '.join(missing)}).",
            None,
        )
    f, c, r = (est.estimate(s, MEAN_OOD) for s in (full, combined, control))
    drop, _ = stats.difference(f, c)
    drop_ctl, _ = stats.difference(f, r)
    vs, _ = stats.difference(c, r)
    moves = "drops" if drop.mean >= 0 else "rises"
    ctl_moves = "a drop" if drop_ctl.mean >= 0 else "a rise"
    side = "above" if vs.mean >= 0 else "below"
    text = (
        f"Mean OOD top-1 {moves} by {pp(abs(drop.mean))} points from the full pool ({full}: "
        f"{pp(f[0])}%) to the combined gap-matched split {combined} ({pp(c[0])}%; drop "
        f"{pp(drop.mean)}, {ci(drop)}); its size-matched random control {control} "
        f"({pp(r[0])}%) shows {ctl_moves} of {pp(abs(drop_ctl.mean))} points (drop "
        f"{pp(drop_ctl.mean)}, {ci(drop_ctl)}). "
        f"The gap-matched split is {pp(abs(vs.mean))} points {side} its control ({ci(vs)}): "
        f"{verdict(vs)}."
    )
    return _claim(text, drop)


def far_fraction(est: Estimates, meta: Mapping[str, Mapping]) -> dict[str, Any]:
    """Claim 2: the smallest far-pruned fraction whose mean OOD top-1 reaches the full pool's
    interval (its lower end); the interval of that fraction over the bootstrap replicates (a
    replicate in which no fraction reaches it counts as 1, the full pool)."""
    far = sorted(
        (
            (float(m["params"]["fraction"]), s)
            for s, m in meta.items()
            if m.get("policy") in ("far", "coreset") and "fraction" in (m.get("params") or {})
        ),
    )
    full = baseline(meta, far[0][1] if far else None)
    if full is None or not far:
        what = "the full pool" if full is None else "a far-pruned (coreset) split"
        return _claim(
            f"Smallest far-pruned fraction as good as the full pool: not computed (this run "
            f"trained no model on {what}).",
            None,
        )
    f = est.estimate(full, MEAN_OOD)
    full_iv = stats.interval(*f)
    points = {s: est.estimate(s, MEAN_OOD) for _, s in far}
    reached = [(frac, s) for frac, s in far if points[s][0] >= full_iv.lo]
    reps = np.ones(len(f[1]))
    for frac, s in reversed(far):  # smallest last: it wins
        reps = np.where(points[s][1] >= full_iv.lo, frac, reps)
    listed = ", ".join(f"{s} {pp(points[s][0])}%" for _, s in far)
    if not reached:
        return {
            **_claim(
                f"No far-pruned split reaches the full pool's mean OOD top-1 ({full}: "
                f"{pp(f[0])}%, "
                f"{ci(full_iv)}): {listed}.",
                None,
            ),
            "lo": (iv := stats.interval(1.0, reps, discrete=True)).lo,
            "hi": iv.hi,
        }
    frac, split = reached[0]
    iv = stats.interval(frac, reps, discrete=True)
    where = "within" if points[split][0] <= full_iv.hi else "above"
    smaller = [s for fr, s in far if fr < frac]
    below = f"; the smaller ones stay below it ({', '.join(smaller)})" if smaller else ""
    text = (
        f"The smallest far-pruned fraction whose mean OOD top-1 is within (or above) the full "
        f"pool's 95% interval ({full}: {pp(full_iv.lo)}–{pp(full_iv.hi)}%) is {frac:g} ({split}: "
        f"{pp(points[split][0])}%, {where} it){below}; over bootstrap replicates that fraction "
        f"lies in [{iv.lo:g}, {iv.hi:g}]. All far-pruned splits: {listed}."
    )
    return _claim(text, iv)


def compute(est: Estimates, meta: Mapping[str, Mapping]) -> list[dict[str, Any]]:
    return [ood_drop(est, meta), far_fraction(est, meta)]
