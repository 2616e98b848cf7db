"""Experiment wiring of the CUDA fixes (review #9-#11, #14): the similarity model trains on the
configured device, a model trains through simgap.train.train on its own GPU set (torchrun for
several GPUs), and stage keys name the device."""

from __future__ import annotations

import simgap.experiment.steps as steps
from simgap.experiment import config, make_plan
from simgap.parallel import Executor, LocalEngine


def _stages(tmp_path, **settings):
    cfg = config.override(config.load("demo"), settings)
    stages = make_plan(cfg, tmp_path / "run", lambda m: None, Executor(LocalEngine(1))).stages
    return cfg, {s.name: s for s in stages}


def test_the_similarity_model_trains_on_the_configured_device(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(steps, "train", lambda *a, **kw: calls.append(kw) or tmp_path / "c.pt")
    monkeypatch.setattr(steps, "pool_samples", lambda data, r: 10)
    monkeypatch.setattr(steps, "pool_shards", lambda data: "pool.tar")
    _, stages = _stages(tmp_path, **{"train.device": "cuda"})
    stages["similarity-model"].fn({})
    assert calls[-1]["device"] == "cuda"


def test_a_model_trains_on_its_own_gpu_set(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(steps, "train", lambda *a, **kw: calls.append(kw) or tmp_path / "c.pt")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    cfg = config.override(
        config.load("demo"), {"train.device": "cuda", "train.gpus": 2, "train.parallel": 2}
    )
    recipe = cfg.train.recipe
    for name in ("a", "b"):
        steps.train_split(tmp_path, cfg, name, recipe, {"shards": "x", "samples": 10**6}, print)
    assert [c["gpus"] for c in calls] == [2, 2]
    assert {c["cuda_devices"] for c in calls} <= {("0", "1"), ("2", "3")}


def test_stage_keys_name_the_device(tmp_path):
    _, cpu = _stages(tmp_path)
    _, gpu = _stages(tmp_path, **{"evaluate.device": "cuda", "train.device": "cuda"})
    changed = {n for n in cpu if cpu[n].inputs != gpu[n].inputs}
    assert "similarity-model" in changed
    assert any(n.startswith("train-") for n in changed)
    assert any(n.startswith("evaluate-") for n in changed)
