"""The paper's claims as computed sentences (simgap.claims), and identical trainings run once
(simgap.experiment.steps.SharedTrainings)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from simgap import claims
from simgap.experiment.steps import SharedTrainings

META = {
    "full": {"policy": "full"},
    "combined": {"policy": "gapmatch", "benchmarks": ["photo", "sketch"]},
    "combined-random": {"policy": "random", "control_of": "combined"},
    "far-0.25": {"policy": "far", "params": {"fraction": 0.25}},
    "far-0.5": {"policy": "far", "params": {"fraction": 0.5}},
    "coreset": {"policy": "coreset", "params": {"fraction": 0.5}},
}


class Fixed:
    """Mean OOD top-1 per split with replicates spread ±spread around it (paired: the same
    noise for every split, as shared bootstrap draws give)."""

    def __init__(self, ood: dict[str, float], spread: float = 0.01):
        noise = np.random.default_rng(0).normal(0, spread, 1000)
        self.values = {s: (v, v + noise) for s, v in ood.items()}
        self.trained = list(ood)

    def estimate(self, split: str, bench: str) -> tuple[float, np.ndarray]:
        assert bench == claims.MEAN_OOD
        return self.values[split]


def test_the_ood_drop_sentence_follows_the_data():
    est = Fixed({"full": 0.50, "combined": 0.45, "combined-random": 0.48})
    c = claims.ood_drop(est, META)
    assert c["value"] == pytest.approx(0.05) and c["lo"] < 0.05 < c["hi"]
    assert "drops by 5.0 points" in c["text"] and "a drop of 2.0 points" in c["text"]
    assert "3.0 points below its control" in c["text"]
    # Paired replicates: the 3-point gap is resolved even though each accuracy varies by ±2.
    assert "resolved (the interval excludes 0)" in c["text"]
    # The opposite data gives the opposite sentence: nothing in it is fixed.
    est = Fixed({"full": 0.40, "combined": 0.45, "combined-random": 0.44})
    c = claims.ood_drop(est, META)
    assert "rises by 5.0 points" in c["text"] and "a rise of 4.0 points" in c["text"]
    assert "1.0 points above its control" in c["text"]


def test_an_unresolved_gap_says_so():
    rng = np.random.default_rng(1)
    est = Fixed({"full": 0.50, "combined": 0.45, "combined-random": 0.449})
    # Unpaired noise on the control: its 0.1-point gap cannot be resolved.
    est.values["combined-random"] = (0.449, 0.449 + rng.normal(0, 0.02, 1000))
    assert "not resolved (the interval includes 0)" in claims.ood_drop(est, META)["text"]


def test_the_smallest_far_fraction_within_the_full_pools_interval():
    est = Fixed({"full": 0.50, "far-0.25": 0.40, "far-0.5": 0.51, "coreset": 0.51})
    c = claims.far_fraction(est, META)
    assert c["value"] == 0.5 and c["lo"] == 0.5 and c["hi"] == 0.5
    assert "within it" in c["text"]
    # Just inside the interval's lower end: in some replicates no fraction reaches it (1.0).
    est = Fixed({"full": 0.50, "far-0.25": 0.40, "far-0.5": 0.485, "coreset": 0.485})
    c = claims.far_fraction(est, META)
    assert c["value"] == 0.5 and c["lo"] == 0.5 and c["hi"] == 1.0
    assert "is 0.5 (coreset" in c["text"] or "is 0.5 (far-0.5" in c["text"]
    assert "smaller ones stay below it (far-0.25)" in c["text"]
    est = Fixed({"full": 0.50, "far-0.25": 0.499, "far-0.5": 0.30, "coreset": 0.30})
    assert claims.far_fraction(est, META)["value"] == 0.25
    est = Fixed({"full": 0.50, "far-0.25": 0.20, "far-0.5": 0.30, "coreset": 0.30})
    none = claims.far_fraction(est, META)
    assert none["value"] is None and none["text"].startswith("No far-pruned split reaches")


def test_a_claim_without_its_splits_is_not_computed():
    est = Fixed({"combined": 0.45})
    c = claims.ood_drop(est, {"combined": META["combined"]})
    assert c["value"] is None and "not computed" in c["text"] and "the full pool" in c["text"]


def test_identical_trainings_run_once_and_a_resumed_run_reuses_them(tmp_path):
    calls = []

    def trainer(name):
        def fn():
            calls.append(name)
            time.sleep(0.2)  # the other thread arrives while this one trains
            ckpt = tmp_path / "train" / name / "final.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_bytes(b"weights")
            return str(ckpt)

        return fn

    shared = SharedTrainings(tmp_path)
    inputs = {"keys": "abc", "recipe": ["--seed", "0"]}
    out = {}
    threads = [
        threading.Thread(
            target=lambda n=n: out.__setitem__(n, shared.once(inputs, n, trainer(n), print))
        )
        for n in ("far-0.5", "coreset")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out["far-0.5"] == out["coreset"]
    # Another seed is another training.
    other = shared.once({**inputs, "recipe": ["--seed", "1"]}, "coreset@s1", trainer("s1"), print)
    assert calls[-1] == "s1" and other != out["coreset"]
    # A resumed run (a new process) finds the record and reuses the checkpoint.
    again = SharedTrainings(tmp_path).once(inputs, "far-0.5x", trainer("x"), print)
    assert again == out["coreset"] and calls == [calls[0], "s1"]
    # A record whose checkpoint is gone is trained again.
    (tmp_path / "train" / calls[0] / "final.pt").unlink()
    SharedTrainings(tmp_path).once(inputs, "far-0.5y", trainer("y"), print)
    assert calls[-1] == "y"


def test_each_split_is_compared_with_the_full_pool_that_matches_its_reference_flag():
    """The paper adds the reference set to the gap-matched splits but not to the far-pruned
    ones: each claim's baseline is the full pool with the reference set added alike."""
    meta = {k: {**v, "reference_added": k.startswith("combined")} for k, v in META.items()}
    meta["full-reference"] = {"policy": "full", "reference_added": True}
    assert claims.baseline(meta, "combined") == "full-reference"
    assert claims.baseline(meta, "far-0.5") == "full"
    est = Fixed({"full": 0.30, "full-reference": 0.50, "combined": 0.45, "combined-random": 0.44})
    assert "from the full pool (full-reference: 50.0%)" in claims.ood_drop(est, meta)["text"]
    est = Fixed(
        {"full": 0.30, "full-reference": 0.60, "far-0.25": 0.31, "far-0.5": 0.1, "coreset": 0.1}
    )
    assert claims.far_fraction(est, meta)["value"] == 0.25  # within full's interval, not 0.6's
