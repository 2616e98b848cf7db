"""The runner's scheduling of chain stages: a chain runs in order, a stage waits for what it
reads, and one split's seeds train side by side once its shards exist."""

import threading

import pytest

from simgap.experiment import config, make_plan
from simgap.experiment.runner import Runner, Stage, execute
from simgap.parallel import Executor, LocalEngine

WAIT = 20.0  # seconds a stage waits for its partner before the test calls them serialized


def _seeded_split(events: dict, log: list):
    """materialize, then two seeds (each its own chain) that must overlap to finish."""
    both = threading.Barrier(2, timeout=WAIT)

    def materialize(r):
        log.append("materialize")
        return "shards"

    def train(seed):
        def fn(r):
            assert r["materialize-full"] == "shards"  # read only after it is done
            log.append(f"train-{seed}")
            both.wait()  # raises BrokenBarrierError if the other seed never starts
            return seed

        return fn

    def evaluate(seed):
        def fn(r):
            log.append(f"evaluate-{seed}")
            return r[f"train-{seed}"]

        return fn

    return [
        Stage("world", {}, lambda r: log.append("world")),
        Stage("materialize-full", {}, materialize, after=("world",), chain="full"),
        Stage("train-s0", {"s": 0}, train("s0"), after=("materialize-full",), chain="full"),
        Stage("evaluate-s0", {}, evaluate("s0"), after=("train-s0",), chain="full"),
        Stage("train-s1", {"s": 1}, train("s1"), after=("materialize-full",), chain="full@s1"),
        Stage("evaluate-s1", {}, evaluate("s1"), after=("train-s1",), chain="full@s1"),
    ]


def test_seeds_of_one_split_train_side_by_side_after_its_shards(tmp_path):
    log: list[str] = []
    runner = Runner(tmp_path, _seeded_split({}, log), lambda _: None)
    execute(runner, parallel=2)
    assert log[:2] == ["world", "materialize"]
    assert sorted(log[2:4]) == ["train-s0", "train-s1"]
    assert sorted(log[4:]) == ["evaluate-s0", "evaluate-s1"]
    assert runner.results["evaluate-s1"] == "s1"


def test_one_slot_runs_the_chains_one_stage_at_a_time(tmp_path):
    """parallel=1 cannot overlap the two seeds: the barrier breaks, and the failure is raised."""
    log: list[str] = []
    runner = Runner(tmp_path, _seeded_split({}, log), lambda _: None)
    with pytest.raises(threading.BrokenBarrierError):
        execute(runner, parallel=1)
    # Nothing starts after a failure: the other seed never began its evaluation.
    assert "evaluate-s1" not in log and "evaluate-s0" not in log


def test_a_chain_keeps_its_order_without_after(tmp_path):
    """Stages of one chain run in plan order even when none names the other in ``after``."""
    order: list[str] = []
    gate = threading.Event()

    def slow(r):
        assert gate.wait(WAIT)
        order.append("a1")

    def release(r):
        gate.set()
        order.append("b1")

    stages = [
        Stage("a1", {}, slow, chain="a"),
        Stage("a2", {}, lambda r: order.append("a2"), chain="a"),
        Stage("b1", {}, release, chain="b"),
    ]
    execute(Runner(tmp_path, stages, lambda _: None), parallel=2)
    assert order.index("a1") < order.index("a2")
    assert order[0] == "b1"


def test_paper_world_gives_every_seed_its_own_chain(tmp_path):
    cfg = config.load("paper-world")
    stages = make_plan(cfg, tmp_path, lambda m: None, Executor(LocalEngine(1))).stages
    seeds = [s for s in stages if s.name.startswith("train-full@") or s.name == "train-full"]
    chains = {s.chain for s in seeds}
    assert len(chains) == len(seeds) >= 3
    for s in seeds:
        assert s.after == ("materialize-full",)


def test_paper_world_runs_the_audit_in_the_training_block(tmp_path):
    """The audit reads only the sources: it is a chain of its own, planned after the last
    training (so it fills a slot beside the last ones) and before the analyses."""
    cfg = config.load("paper-world")
    stages = make_plan(cfg, tmp_path, lambda m: None, Executor(LocalEngine(1))).stages
    names = [s.name for s in stages]
    audit = stages[names.index("audit")]
    assert audit.chain == "audit" and all(a.startswith("embed-") for a in audit.after)
    last_train = max(i for i, n in enumerate(names) if n.startswith(("train-", "evaluate-")))
    first_analysis = min(i for i, n in enumerate(names) if n.startswith("analysis-robustness"))
    assert last_train < names.index("audit") < first_analysis
    # everything from the first materialize to the audit is one block of chain stages
    first_chain = min(i for i, s in enumerate(stages) if s.chain is not None)
    assert all(s.chain is not None for s in stages[first_chain : names.index("audit") + 1])
