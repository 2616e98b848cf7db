"""The CUDA paths that a machine without a GPU can still check (review: shared/reviews/cuda.md
sections 2-4): training launch and GPU assignment, numerics recorded and compared, device errors,
IEEE float32 forwards. GPU objects are faked where a GPU would be needed (torch.cuda device
properties, a CUDA error); everything else is the real thing."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from open_clip_train.params import parse_args
from PIL import Image

from simgap.data.tarwrite import write_tar
from simgap.embed import embed
from simgap.embed.encode import autocast_dtype, forward_context
from simgap.embed.shard import EmbedShard
from simgap.evaluate import evaluate_benchmarks
from simgap.experiment.config import load
from simgap.io import fingerprint
from simgap.models import (
    DeviceError,
    LoadedModel,
    check_device,
    device_key,
    ieee_fp32,
    load_model,
    numerics_identity,
    tf32_settings,
)
from simgap.parallel import Executor, LocalEngine
from simgap.store import StoreError, StoreWriter, check_compatible, open_store, write_store
from simgap.train import (
    DONE_FILE,
    LOG_FILE,
    GpuSlots,
    Recipe,
    SlurmJob,
    gpu_sets,
    open_clip_argv,
    slurm_script,
    torchrun_command,
    train,
    train_env,
    visible_gpus,
)

SRC = Path(__file__).resolve().parent.parent / "src"
TINY = Recipe(model="simgap-tiny-vit", epochs=1, batch_size=8, workers=1, seed=0)

# A stand-in for torch.cuda.get_device_properties on two GPU kinds.
H100 = {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0, "multi_processor_count": 132}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "major": 8, "minor": 0, "multi_processor_count": 108}


class FakeProps:
    def __init__(self, props: dict):
        self.__dict__.update(props)


def fake_gpu(monkeypatch, props: dict, count: int = 1) -> None:
    """torch.cuda as a machine with ``count`` GPUs of one kind shows it (no kernel runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: FakeProps(props))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: props["name"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91300)


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def source(tmp_path) -> Path:
    """Three tar shards of four small images each."""
    folder = tmp_path / "pool"
    for s in range(3):
        samples = [(f"p{s}{i}", {"png": _png((40 * s, 50 * i, 90))}) for i in range(4)]
        write_tar(folder / f"{s:05d}.tar", samples)
    return folder


# --- training at scale ---------------------------------------------------------------------


def test_paper_laion_recipe_checkpoints_gradients_at_4200_a_gpu():
    """Review #2: ViT-B/32 at 4,200 a GPU needs ~145 GB of activations without gradient
    checkpointing; the shipped config must turn it on."""
    cfg = load("paper-laion")
    recipe = cfg.train.recipe
    assert recipe.grad_checkpointing
    assert recipe.batch_size // cfg.train.gpus == 4200
    args = parse_args(open_clip_argv(recipe, "/d/{0..9}.tar", 10, Path("/r"), "x", "cuda"))
    assert args.grad_checkpointing


def test_torchrun_command_runs_this_interpreter():
    """Review #9: a bare `torchrun` is not on PATH when the venv is not activated."""
    words = shlex.split(torchrun_command(TINY, "/d/{0..1}.tar", 8, Path("/r"), "x", 2))
    assert words[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node=2"]  # fmt: skip


def test_slurm_tasks_see_every_gpu_of_their_node():
    """Review #8: open_clip_train uses cuda:<local rank>, so no task may get a GPU subset."""
    script = slurm_script(TINY, "/d/{0..1}.tar", 8, Path("/r"), "x", SlurmJob(gpus_per_node=8))
    srun = shlex.split(script.splitlines()[-1])
    assert "--gpu-bind=none" in srun
    assert not any(w.startswith("--accel-bind") and "g" in w.split("=", 1)[1] for w in srun)


def _shards(folder: Path, n: int = 16, shards: int = 2) -> str:
    folder.mkdir(parents=True)
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]
    names = ["red", "green", "blue", "yellow"]
    sizes = {}
    for s in range(shards):
        samples = []
        for i in range(s * n // shards, (s + 1) * n // shards):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colours[i % 4]).save(buf, "JPEG")
            samples.append(
                (f"p{i:05d}", {"jpg": buf.getvalue(), "txt": f"a {names[i % 4]}".encode()})
            )
        write_tar(folder / f"{s:05d}.tar", samples)
        sizes[f"{s:05d}.tar"] = len(samples)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def test_torchrun_training_goes_through_the_claim_resume_and_done_record(tmp_path):
    """Review #9: train(torchrun=True) starts `python -m torch.distributed.run` itself (1 CPU
    rank, gloo here), with the same run-folder claim, done record and skip-when-done as a local
    run."""
    data = _shards(tmp_path / "pool")
    out = tmp_path / "runs"
    lines: list[str] = []
    final = train(TINY, data, None, out, "tr", lines.append, threads=1, torchrun=True)
    assert final.is_file()
    done = json.loads((out / "tr" / DONE_FILE).read_text())
    assert "--local-loss" in done["argv"] and "gloo" in done["argv"]
    log = (out / "tr" / LOG_FILE).read_text()
    assert f"$ {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=1" in log
    # Done: a second call returns the checkpoint without starting anything.
    size = (out / "tr" / LOG_FILE).stat().st_size
    assert train(TINY, data, None, out, "tr", threads=1, torchrun=True) == final
    assert (out / "tr" / LOG_FILE).stat().st_size == size
    # Another recipe in the same folder is refused before any launch, as for a local run.
    with pytest.raises(ValueError, match="different recipe"):
        train(Recipe(model="simgap-tiny-vit", epochs=2, batch_size=8), data, None, out, "tr",
              torchrun=True)  # fmt: skip


def test_distributed_training_checks_shards_per_rank_before_launch(tmp_path):
    """open_clip_train asserts shards >= workers x ranks only after building the model."""
    data = _shards(tmp_path / "pool", shards=2)
    with pytest.raises(ValueError, match="2 shards cannot feed 4"):
        train(TINY, data, None, tmp_path / "runs", "x", gpus=4)


def test_train_refuses_cuda_without_a_gpu(tmp_path):
    """open_clip_train would warn and quietly train on the CPU instead."""
    data = _shards(tmp_path / "pool")
    with pytest.raises(DeviceError, match="'cuda'"):
        train(TINY, data, None, tmp_path / "runs", "x", device="cuda")
    assert not (tmp_path / "runs").exists()


def test_train_refuses_more_ranks_than_gpus(tmp_path, monkeypatch):
    fake_gpu(monkeypatch, H100, count=2)
    data = _shards(tmp_path / "pool", shards=4)
    with pytest.raises(DeviceError, match="4 ranks need 4 GPUs; 2 visible"):
        train(TINY, data, None, tmp_path / "runs", "x", device="cuda", gpus=4)
    with pytest.raises(DeviceError, match="2 ranks need 2 GPUs; 1 visible"):
        train(TINY, data, None, tmp_path / "runs", "x", device="cuda", gpus=2, cuda_devices="3")


def test_gpu_sets_never_share_a_gpu():
    """Review #10: trainings side by side get disjoint GPU sets; fewer trainings run at once
    when the GPUs run out."""
    eight = [str(i) for i in range(8)]
    assert gpu_sets("cuda", 8, 2, eight) == [tuple(eight)]  # two 8-GPU torchruns: one at a time
    assert gpu_sets("cuda", 4, 2, eight) == [tuple(eight[:4]), tuple(eight[4:])]
    assert gpu_sets("cuda", 1, 2, ["0"]) == [("0",)]  # two 1-GPU trainings, one GPU
    assert gpu_sets("cuda", 1, 3, ["GPU-a", "GPU-b"]) == [("GPU-a",), ("GPU-b",)]
    assert gpu_sets("cuda:1", 1, 2, ["4", "6"]) == [("6",)]  # cuda:N is one GPU
    assert gpu_sets("cpu", 1, 3, []) == [(), (), ()]
    for args in (("cuda", 4, 1, ["0", "1"]), ("cuda:2", 1, 1, ["0"]), ("cuda:0", 2, 1, eight)):
        with pytest.raises(ValueError):
            gpu_sets(*args)
    for sets in (gpu_sets("cuda", g, p, eight) for g in (1, 2, 3, 8) for p in (1, 2, 5)):
        used = [d for s in sets for d in s]
        assert len(used) == len(set(used))


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3,GPU-x"}) == ["2", "3", "GPU-x"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    if not torch.cuda.is_available():
        assert visible_gpus({}) == []


def test_gpu_slots_lend_each_set_to_one_training_at_a_time():
    slots = GpuSlots(gpu_sets("cuda", 2, 4, ["0", "1", "2", "3"]))
    holders: dict[tuple[str, ...], int] = {}
    clash = threading.Event()
    lock = threading.Lock()

    def training() -> None:
        with slots.lease() as gpus:
            with lock:
                holders[gpus] = holders.get(gpus, 0) + 1
                if holders[gpus] > 1:
                    clash.set()
            time.sleep(0.01)
            with lock:
                holders[gpus] -= 1

    threads = [threading.Thread(target=training) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clash.is_set()


def test_gpu_slots_of_a_plan_look_at_the_gpus_only_when_lent(monkeypatch):
    """A dry run of a GPU config on a machine without GPUs builds its slots without error."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, as on this machine
    slots = GpuSlots.for_trainings("cuda", 8, 1)
    with pytest.raises(ValueError, match="8 GPUs but 0 are visible"):
        with slots.lease():
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    with GpuSlots.for_trainings("cuda", 8, 2).lease() as gpus:
        assert gpus == tuple("01234567")
    with GpuSlots.for_trainings("cpu", 1, 2).lease() as gpus:
        assert gpus == ()


def test_a_training_sees_only_its_gpu_set():
    assert train_env(1, ("4", "5")) == {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "4,5"}
    assert train_env(None) == {}


# --- numerics recorded ---------------------------------------------------------------------


def test_store_manifest_records_its_numerics(tmp_path, source, checkpoint):
    store = embed(source, tmp_path / "s", checkpoint)
    assert store.numerics == {"device": "cpu", "autocast": "float32"}
    assert open_store(tmp_path / "s").numerics == store.numerics
    bf16 = embed(source, tmp_path / "b", checkpoint, precision="bf16")
    assert bf16.numerics == {"device": "cpu", "autocast": "bfloat16"}
    # Review #12: a bf16 store is not compared with a float32 one unless asked.
    with pytest.raises(StoreError, match="different numerics"):
        check_compatible(store, bf16)
    check_compatible(store, bf16, mixed_numerics=True)
    # A store that does not record its numerics (an imported array) is not checked for them.
    array = write_store(tmp_path / "a", store.embeddings().astype(np.float32), store.keys(),
                        store.model)  # fmt: skip
    check_compatible(store, array)
    check_compatible(array, bf16)


def _gpu_numerics(props: dict, autocast: str = "bfloat16") -> dict:
    return {
        "device": "cuda", "autocast": autocast, "tf32_matmul": False, "tf32_cudnn": False,
        "gpu": props["name"], "capability": f"{props['major']}.{props['minor']}",
        "sms": props["multi_processor_count"], "cuda": "13.0", "cudnn": 91300,
    }  # fmt: skip


def _write(writer: StoreWriter, name: str, numerics: dict) -> dict:
    emb = np.eye(4, dtype=np.float16)[:2]
    keys = pa.table({"key": [f"{name}a", f"{name}b"]})
    return writer.write_shard(name, emb, keys, numerics=numerics)


def test_a_store_embedded_on_two_gpu_kinds_lists_both(tmp_path):
    writer = StoreWriter(tmp_path / "s", {"arch": "m"}, 4, {})
    records = [_write(writer, "00000", _gpu_numerics(H100)), _write(writer, "00001",
               _gpu_numerics(A100))]  # fmt: skip
    numerics = writer.finish(records).numerics
    assert {k: numerics[k] for k in ("device", "autocast", "tf32_matmul")} == {
        "device": "cuda", "autocast": "bfloat16", "tf32_matmul": False}  # fmt: skip
    assert [h["gpu"] for h in numerics["hardware"]] == [A100["name"], H100["name"]]
    # One store never mixes numerics that change the similarities.
    writer = StoreWriter(tmp_path / "m", {"arch": "m"}, 4, {})
    records = [_write(writer, "00000", _gpu_numerics(H100)),
               _write(writer, "00001", _gpu_numerics(H100, "float32"))]  # fmt: skip
    with pytest.raises(StoreError, match="shard 00001 was embedded with other numerics"):
        writer.finish(records)


def test_numerics_name_the_gpu(monkeypatch):
    fake_gpu(monkeypatch, H100)
    with ieee_fp32():
        got = numerics_identity("cuda:0", torch.bfloat16)
    assert got == {**_gpu_numerics(H100), "cuda": torch.version.cuda}
    assert numerics_identity("cpu", None) == {"device": "cpu", "autocast": "float32"}


def test_resume_on_another_gpu_kind_redoes_the_shards(monkeypatch, checkpoint):
    """Review #13: cuBLAS promises the same bits only on the same GPU kind."""
    shard = EmbedShard("s", checkpoint, 64, "cuda", precision="bf16")
    fake_gpu(monkeypatch, H100)
    on_h100 = shard.fingerprint("task")
    assert shard.fingerprint("task") == on_h100
    fake_gpu(monkeypatch, A100)
    assert shard.fingerprint("task") != on_h100


def test_cpu_fingerprint_is_unchanged(checkpoint):
    """CPU stores embedded before numerics were recorded keep their shards."""
    shard = EmbedShard("s", checkpoint, 64, "cpu", model_sha256="abc")
    old = fingerprint(["task", "abc", False, "cpu,None,threads=1,padded", 256])
    assert shard.fingerprint("task") == old


def test_device_key_names_the_gpu_kind(monkeypatch):
    """Stage keys: a CPU result is never taken for a GPU one, nor an A100's for an H100's."""
    assert device_key("cpu") == "cpu"
    assert device_key("cuda") == "cuda"  # no GPU here (a Ray head): the kind alone
    fake_gpu(monkeypatch, H100, count=2)
    assert device_key("cuda:1") == "cuda:NVIDIA H100 80GB HBM3"
    assert device_key("cuda") == device_key("cuda:0")


# --- IEEE float32 forwards -----------------------------------------------------------------


def test_ieee_fp32_turns_tf32_off_and_restores_it():
    """Review #14: cuDNN convolutions default to TF32 on GPUs."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    with ieee_fp32():
        assert tf32_settings() == {"tf32_matmul": False, "tf32_cudnn": False}
        with ieee_fp32():
            pass
        assert conv.fp32_precision == "ieee"  # the inner block does not restore early
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


class Recording(torch.nn.Module):
    """The real model, noting the cuDNN conv precision each forward ran with."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.backends.cudnn.conv.fp32_precision)
        return self.model.encode_image(x)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.backends.cudnn.conv.fp32_precision)
        return self.model.encode_text(x)


def test_evaluation_forwards_run_in_ieee_fp32(tmp_path, checkpoint):
    loaded = load_model(checkpoint)
    loaded.model = Recording(loaded.model)
    root = tmp_path / "bench"
    for name, rgb in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), rgb).save(root / name / f"{name}.png")
    (root / "classnames.txt").write_text("red\nblue\n")
    summary = evaluate_benchmarks(loaded, {"b": root}, tmp_path / "out", ["a {c} square."])
    assert loaded.model.seen and set(loaded.model.seen) == {"ieee"}
    assert summary["numerics"] == {"device": "cpu", "autocast": "float32"}
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["numerics"]["device"] == "cpu"


def test_embed_forward_context_is_ieee_fp32():
    with forward_context("cpu", None):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.is_inference_mode_enabled()


def test_auto_precision_takes_bf16_only_where_it_is_native(monkeypatch):
    """Pre-Ampere GPUs emulate bf16 (slowly): auto is fp16 there."""
    calls = []

    def supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return including_emulation  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert autocast_dtype("cuda", "auto") == torch.float16
    assert calls == [False]


# --- devices and errors --------------------------------------------------------------------


def test_check_device():
    assert check_device("cpu") == "cpu"
    for bad, match in (("cuda", "no CUDA GPU|without CUDA"), ("tpu", "not a device|cpu or cuda")):
        with pytest.raises(DeviceError, match=match):
            check_device(bad)


def test_cli_device_cuda_without_gpu_is_one_error_line(tmp_path, source, checkpoint, capsys):
    """Real, on this machine without CUDA: embed, evaluate and train end in one line."""
    from simgap.cli import main

    data = _shards(tmp_path / "train")
    bench = tmp_path / "bench" / "red"
    bench.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(bench / "i.png")
    (tmp_path / "bench" / "classnames.txt").write_text("red\n")
    model = ["--model", "simgap-tiny", "--checkpoint", checkpoint.checkpoint]
    commands = [
        ["embed", str(source), "-o", str(tmp_path / "s"), *model, "--device", "cuda"],
        ["evaluate", str(tmp_path / "bench"), *model, "--device", "cuda"],
        ["train", data, "-o", str(tmp_path / "r"), "--device", "cuda"],
    ]
    for args in commands:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("simgap: error: device 'cuda':"), err
    # And as a real process: nothing but that line on stderr.
    env = {"PYTHONPATH": str(SRC), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", "simgap.cli", *commands[0]], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_driver_reads_model_facts_on_the_cpu(tmp_path, source, checkpoint, monkeypatch):
    """Review #17: for a GPU embed on a cluster, the driver (maybe a GPU-less Ray head) loads
    the model on the CPU only, for its identity and dim."""
    import simgap.embed.encode as embed_encode

    devices = []

    def recording_load(spec, device="cpu", **kw):
        devices.append(device)
        return load_model(spec, device, **kw)

    class Cluster:  # stands in for GPU workers elsewhere: runs nothing here
        def run(self, fn, tasks):
            for i, _ in enumerate(tasks):
                yield i, True, {"rows": 0, "shards": []}

    embed_encode.cached_model.cache_clear()
    embed_encode.model_dim.cache_clear()
    monkeypatch.setattr(embed_encode, "load_model", recording_load)
    embed(source, tmp_path / "s", checkpoint, Executor(Cluster()), device="cuda")
    embed_encode.cached_model.cache_clear()
    embed_encode.model_dim.cache_clear()
    assert devices == ["cpu"]


class StickyCudaFailure(torch.nn.Module):
    """A model whose GPU context breaks in its second shard: every later call fails too, as a
    device-side assert leaves a CUDA context."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls, self.broken = model, 0, False

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2 or self.broken:
            self.broken = True
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")
        return self.model.encode_image(x)


def test_a_cuda_error_names_its_shard_and_is_not_blamed_on_retries(
    tmp_path, source, checkpoint, monkeypatch
):
    import simgap.embed.run as embed_run
    import simgap.embed.shard as embed_shard

    loaded = load_model(checkpoint)
    broken = LoadedModel(StickyCudaFailure(loaded.model), loaded.preprocess, loaded.tokenizer,
                         loaded.identity)  # fmt: skip
    # The driver (embed) and the worker (EmbedShard) each look the model up.
    for module in (embed_run, embed_shard):
        monkeypatch.setattr(module, "cached_model", lambda spec, device: broken)
    monkeypatch.setattr(embed_run, "model_dim", lambda spec, device: 64)
    monkeypatch.setattr(embed_shard, "_lost_gpu", [])
    with pytest.raises(RuntimeError) as info:
        embed(source, tmp_path / "s", checkpoint, Executor(LocalEngine(1), retries=1),
              decode_workers=0)  # fmt: skip
    message = str(info.value)
    assert "shard 00001: AcceleratorError: CUDA error: device-side assert" in message
    # Shard 00002 (and every retry) is refused naming shard 00001, not failed as its own.
    assert "shard 00002:" not in message
    assert message.count("earlier CUDA error") == 2
    assert broken.model.calls == 2  # nothing ran on the broken context after the error
