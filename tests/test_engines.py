"""One engine builder for the CLI and `simgap run`: what each task asks Ray for, where a task's
CUDA device points, and GPU work spread over a local pool. No GPU needed: a local Ray cluster is
started with declared GPU resources, and the rest are checked on the objects themselves."""

from __future__ import annotations

import os
import sys
import time
import types

import pytest

from simgap.embed.run import auto_decode_workers, probe_device
from simgap.experiment import config
from simgap.experiment.engines import executors_of, kernel_config
from simgap.parallel import (
    EngineSpec,
    Executor,
    LocalEngine,
    RayEngine,
    ThreadEngine,
    build_engine,
    task_device,
)


def test_ray_tasks_ask_for_gpus_exactly_when_their_device_is_cuda():
    spec = EngineSpec("ray", 2, "auto", gpus_per_task=0.5, cpus_per_gpu_task=6)
    gpu = build_engine(spec, "cuda:3")
    assert gpu.options() == {"num_cpus": 6, "num_gpus": 0.5, "max_calls": 0}
    assert gpu.address == "auto"
    cpu = build_engine(spec, "cpu")
    assert cpu.options() == {"num_cpus": 1.0, "num_gpus": 0.0, "max_calls": 0}


def test_local_pools_spread_over_gpus_only_for_a_bare_cuda_device():
    assert build_engine(EngineSpec("local", 4), "cuda", gpu_count=2) == LocalEngine(4, 2)
    # An explicit GPU is the user's choice; one worker runs in this process.
    assert build_engine(EngineSpec("local", 4), "cuda:1", gpu_count=2) == LocalEngine(4, 0)
    assert build_engine(EngineSpec("local", 1), "cuda", gpu_count=2) == LocalEngine(1, 0)
    assert build_engine(EngineSpec("local", 4), "cpu", gpu_count=2) == LocalEngine(4, 0)


def test_paper_laion_stages_get_gpus_where_their_device_is_cuda():
    cfg = config.load("paper-laion")
    ex = executors_of(cfg)
    assert ex.embed.engine.options() == {"num_cpus": 8.0, "num_gpus": 1.0, "max_calls": 0}
    assert ex.scan.engine.options() == {"num_cpus": 8.0, "num_gpus": 1.0, "max_calls": 0}
    assert ex.io.engine.options()["num_gpus"] == 0.0  # copies
    assert kernel_config(cfg).device == "cuda"
    # [scan] overrides the engine for the scan alone; a CPU scan asks for no GPU.
    cpu_scan = config.override(cfg, {"scan.device": "cpu", "scan.engine": "local",
                                     "scan.workers": 3})  # fmt: skip
    ex = executors_of(cpu_scan)
    assert ex.scan.engine == LocalEngine(3, 0) and ex.embed.engine.num_gpus == 1.0
    half = executors_of(config.override(cfg, {"scan.gpus_per_task": 0.5}))
    assert half.scan.engine.num_gpus == 0.5 and half.embed.engine.num_gpus == 1.0


def test_a_bad_screen_precision_is_a_config_error(tmp_path):
    from simgap.experiment import make_plan

    cfg = config.parse('[scan]\nprecision = "fp7"\n', "c.toml")
    with pytest.raises(config.ConfigError, match="c.toml: scan: precision must be"):
        make_plan(cfg, tmp_path, print)


def test_gpu_embed_tasks_get_decode_workers_and_the_driver_stays_on_the_cpu():
    ray_gpu = Executor(RayEngine(num_cpus=6, num_gpus=1))
    assert auto_decode_workers(ray_gpu) == 5
    assert auto_decode_workers(Executor(RayEngine(num_cpus=1, num_gpus=0))) == 0
    assert auto_decode_workers(Executor(LocalEngine(2))) == 0
    # The driver reads the model's dimension on the CPU unless the tasks run in this process.
    assert probe_device(ray_gpu, "cuda") == "cpu"
    assert probe_device(Executor(LocalEngine(4, 2)), "cuda") == "cpu"
    assert probe_device(Executor(LocalEngine(1)), "cuda") == "cuda"


def test_ray_engine_keeps_its_workers_fake_ray(monkeypatch):
    """The options reach ray.remote: max_calls=0 (Ray's default for GPU tasks is 1 call per
    worker: a re-import, CUDA init and model load per shard)."""
    seen = {}
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True

    def remote(**options):
        seen.update(options)
        return lambda fn: types.SimpleNamespace(remote=lambda f, t: (f, t))

    fake.remote = remote
    fake.put = lambda fn: fn
    fake.wait = lambda refs, num_returns: (refs[:1], refs[1:])
    fake.get = lambda ref: (True, ref[0](ref[1]))
    monkeypatch.setitem(sys.modules, "ray", fake)
    out = Executor(RayEngine(num_cpus=2, num_gpus=1)).map(abs, [-1, -2])
    assert out == [1, 2]
    assert seen == {"num_cpus": 2, "num_gpus": 1, "max_calls": 0}


def _where(_: int) -> dict:
    time.sleep(0.5)  # both workers take a task
    return {"cuda": task_device("cuda"), "cuda1": task_device("cuda:1"), "pid": os.getpid()}


def test_local_workers_are_spread_over_gpus():
    runs = Executor(LocalEngine(2, gpus=2)).map(_where, [0, 1])
    assert len({r["pid"] for r in runs}) == 2
    assert sorted(r["cuda"] for r in runs) == ["cuda:0", "cuda:1"]
    assert all(r["cuda1"] == "cuda:1" for r in runs)  # an explicit GPU stays
    assert task_device("cuda") == "cuda" and task_device("cpu") == "cpu"  # this process


def _in_ray_task(_: int) -> dict:
    import ray

    return {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": task_device("cuda:1"),
        "resources": ray.get_runtime_context().get_assigned_resources(),
        "pid": os.getpid(),
    }


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # a hard dependency: a broken Ray must fail here, not skip

    if ray.is_initialized():
        ray.shutdown()
    from ray import cloudpickle

    # Ray's workers cannot import this test module: its task functions travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Declared GPUs: Ray schedules and accounts them without any GPU present.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_cuda_tasks_get_one_visible_gpu_each(ray_cluster):
    spec = EngineSpec("ray", gpus_per_task=1, cpus_per_gpu_task=1)
    runs = Executor(build_engine(spec, "cuda:1")).map(_in_ray_task, range(4))
    for r in runs:
        assert r["resources"]["GPU"] == 1.0 and r["resources"]["CPU"] == 1.0
        assert len(r["gpu_ids"]) == 1 and r["visible"] == r["gpu_ids"][0]
        assert r["device"] == "cuda"  # cuda:1 would name a GPU the task cannot see
    assert {r["visible"] for r in runs} <= {"0", "1"}
    # max_calls=0: workers are reused across tasks (max_calls=1 starts one per task).
    assert len({r["pid"] for r in runs}) < 4
    cpu = Executor(build_engine(spec, "cpu")).map(_in_ray_task, range(2))
    for r in cpu:
        assert r["gpu_ids"] == [] and "GPU" not in r["resources"] and r["device"] == "cuda:1"


def test_thread_engine_is_unchanged():
    assert Executor(ThreadEngine(2)).map(abs, [-3, 4]) == [3, 4]
