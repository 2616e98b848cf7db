"""simgap.train: argv, launch scripts, and real open_clip_train runs on CPU on a tiny world."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from open_clip_train.params import parse_args
from PIL import Image

from simgap._train_entry import _weights_only_load, split_own_options
from simgap.data.keylist import read_key_list
from simgap.evaluate import evaluate_benchmark
from simgap.io import sha256_file
from simgap.models import ModelSpec, load_model
from simgap.train import (
    DONE_FILE,
    ENTRY_MODULE,
    KEY_HASH,
    KEY_HASHES_FILE,
    RECORD_FILE,
    Recipe,
    SlurmJob,
    TrainError,
    check_resumable,
    count_samples,
    key_hash,
    open_clip_argv,
    prepare_run,
    slurm_script,
    torchrun_command,
    train,
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}
# The ViT variant learns solid colours in a handful of steps; the adapter, not the model, is tested.
TINY = Recipe(model="simgap-tiny-vit", epochs=2, batch_size=16, workers=1, seed=0)
NASTY = "/data/my shards/$HOME;`id`&'q'/{00000..00003}.tar"
HOSTILE = "$(touch pwned) `touch pwned2`; echo 'x' \"y\" > z"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _colour_sample(i: int) -> list[tuple[str, bytes]]:
    colour = list(COLOURS)[i % len(COLOURS)]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[colour]).save(buf, "JPEG")
    return [(f"p{i:07d}.jpg", buf.getvalue()), (f"p{i:07d}.txt", f"a {colour} square".encode())]


def _distractor(i: int) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (i, i, i)).save(buf, "JPEG")
    return [(f"d{i:07d}.jpg", buf.getvalue()), (f"d{i:07d}.txt", b"a dark square")]


def write_colour_shards(
    folder: Path, n: int = 64, shards: int = 2, distractors_every: int = 0
) -> str:
    """n solid-colour 32px JPEGs captioned "a <colour> square", img2dataset layout; with
    distractors_every=k, a dark "d..." sample follows every k-th colour sample."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = n // shards
    sizes = {}
    for s in range(shards):
        count = 0
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                members = _colour_sample(i)
                if distractors_every and i % distractors_every == 0:
                    members += _distractor(i)
                for name, data in members:
                    _member(tar, name, data)
                count += len(members) // 2
        sizes[f"{s:05d}.tar"] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_colour_shards(tmp_path_factory.mktemp("world") / "pool")


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    out = tmp_path_factory.mktemp("train-a")
    lines: list[str] = []
    final = train(TINY, shards, 64, out, "tiny", log=lines.append, threads=1)
    return out, final, lines


# --- argv and launch scripts -------------------------------------------------------------


def test_warmup_fraction_is_a_share_of_the_scheduler_steps(tmp_path):
    """open_clip_train's cosine schedule runs ceil(samples / global batch) x epochs steps; a
    warm-up fraction becomes that share of them, for an epoch budget and a samples-seen one."""
    from simgap.experiment.keys import recipe_key
    from simgap.train.recipe import warmup_steps

    share = dataclasses.replace(TINY, warmup_fraction=0.08)  # 2 epochs of batch 16
    assert parse_args(open_clip_argv(share, NASTY, 1000, tmp_path, "r")).warmup == round(
        0.08 * 63 * 2
    )
    seen = dataclasses.replace(share, samples_seen=200_000, epochs=16, batch_size=64)
    # 16 parts of 12,500: ceil(12,500 / 64) = 196 steps each, 3,136 in all
    assert parse_args(open_clip_argv(seen, NASTY, 7, tmp_path, "r")).warmup == 251
    assert warmup_steps(dataclasses.replace(share, warmup_fraction=0.0001), 10) == 1
    assert warmup_steps(TINY, 10**9) == TINY.warmup  # unset: the steps as given
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_steps(dataclasses.replace(TINY, warmup_fraction=1.5), 1000)
    # The cache key names the share (its steps depend on the data the key leaves out), and a
    # recipe without one keeps the key it had.
    assert recipe_key(share) != recipe_key(dataclasses.replace(share, warmup_fraction=0.1))
    assert "warmup_fraction" not in recipe_key(TINY)


def test_open_clip_argv_parses_with_open_clip_train(tmp_path):
    argv = open_clip_argv(TINY, NASTY, 1000, tmp_path, "run-1")
    args = parse_args(argv)
    assert args.model == TINY.model
    assert args.train_data == NASTY
    assert args.train_num_samples == 1000
    assert args.dataset_type == "webdataset"
    assert (args.epochs, args.batch_size, args.workers, args.seed) == (2, 16, 1, 0)
    assert (args.lr, args.wd, args.warmup) == (5e-4, 0.2, 10)
    assert (args.beta1, args.beta2, args.eps) == (0.9, 0.98, 1e-6)
    assert args.precision == "fp32"
    assert args.device == "cpu"
    assert args.resume == "latest" and args.save_most_recent
    assert args.save_frequency == 0
    assert args.logs == str(tmp_path.absolute()) and args.name == "run-1"
    assert "wandb" not in args.report_to and "tensorboard" not in args.report_to


def test_run_name_must_be_one_folder(tmp_path):
    with pytest.raises(ValueError, match="single folder"):
        open_clip_argv(TINY, NASTY, 10, tmp_path, "a/b")


def test_torchrun_command_quotes_and_keeps_global_batch(tmp_path):
    recipe = Recipe(model="ViT-B-32", batch_size=64, precision="amp")
    out = tmp_path / "out dir; rm -rf ~"
    cmd = torchrun_command(recipe, NASTY, 10_000, out, "split$(x)", nproc_per_node=8)
    words = shlex.split(cmd)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert words[:8] == [*launcher, "--nproc_per_node=8", "-m", ENTRY_MODULE, "--"]
    args = parse_args(words[8:])
    assert args.train_data == NASTY
    assert args.logs == str(out.absolute()) and args.name == "split$(x)"
    assert args.batch_size == 8  # 64 global over 8 GPUs
    assert args.device == "cuda" and args.precision == "amp"
    assert args.local_loss and args.gather_with_grad
    with pytest.raises(ValueError, match="divisible"):
        torchrun_command(recipe, NASTY, 10, out, "x", nproc_per_node=5)


def test_slurm_script_content(tmp_path):
    recipe = Recipe(model="ViT-B-32", batch_size=256)
    out = tmp_path / "runs & logs"
    script = slurm_script(
        recipe,
        NASTY,
        10_000,
        out,
        "near;x",
        SlurmJob(nodes=2, gpus_per_node=4, partition="gpu", time="1:00:00"),
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=1:00:00",
    ):
        assert f"#SBATCH {directive}" in lines
    assert not any(line.startswith("#SBATCH --account") for line in lines)
    srun = shlex.split(lines[-1])
    assert srun[:7] == [
        "srun",
        "--cpu-bind=v",
        "--gpu-bind=none",
        "python",
        "-u",
        "-m",
        ENTRY_MODULE,
    ]
    args = parse_args(srun[7:])
    assert args.train_data == NASTY and args.name == "near;x"
    assert args.logs == str(out.absolute())
    assert args.batch_size == 32  # 256 global over 2 x 4 GPUs
    assert "export MASTER_PORT=29500" in lines
    with pytest.raises(ValueError, match="unsafe"):
        slurm_script(recipe, NASTY, 10, out, "x", SlurmJob(job_name="x\n#SBATCH --mem=0"))
    with pytest.raises(ValueError, match="unsafe"):
        slurm_script(recipe, NASTY, 10, out, "x", SlurmJob(partition="gpu; rm -rf ~"))


def test_missing_shards_fail_before_launch(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        train(TINY, str(tmp_path / "{00000..00001}.tar"), 64, tmp_path / "out", "x")


# --- real open_clip_train runs on CPU ------------------------------------------------------


def test_tiny_run_layout_and_checkpoint_loads(trained):
    out, final, lines = trained
    assert final == out / "tiny" / "checkpoints" / "epoch_2.pt"
    assert (out / "tiny" / "checkpoints" / "epoch_latest.pt").is_file()
    assert not (out / "tiny" / "checkpoints" / "epoch_1.pt").exists()  # save_frequency=0
    assert (out / "tiny" / "out.log").is_file() and (out / "tiny" / DONE_FILE).is_file()
    assert any("Device cpu" in line for line in lines)  # never tried CUDA
    assert any("fused: True" in line for line in lines)  # simgap._train_entry's AdamW
    assert (out / "tiny" / "simgap-train.log").read_text().count("Start epoch") == 2
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
    loaded = load_model(ModelSpec(TINY.model, checkpoint=str(final)))
    assert loaded.identity["checkpoint_sha256"] == sha256_file(final)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][key]), key


def test_trained_model_tells_colours_apart(trained, tmp_path):
    # End to end: the trained checkpoint, loaded by simgap, classifies unseen shades zero-shot.
    root = tmp_path / "bench"
    root.mkdir()
    (root / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    for c, (r, g, b) in COLOURS.items():
        (root / c).mkdir()
        for j, d in enumerate((-20, 0, 20)):
            shade = tuple(min(255, max(0, v + d)) for v in (r, g, b))
            Image.new("RGB", (48, 48), shade).save(root / c / f"{c}-{j:05d}.jpg")
    loaded = load_model(ModelSpec(TINY.model, checkpoint=str(trained[1])))
    assert evaluate_benchmark(loaded, root, ["a {c} square"])["top1"] >= 0.75


def test_completed_run_returns_without_training(trained, shards, monkeypatch):
    out, final, _ = trained

    def no_launch(*a, **k):
        raise AssertionError("a completed run must not start open_clip_train")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    assert train(TINY, shards, 64, out, "tiny") == final


def test_other_recipe_in_same_run_dir_is_refused(trained, shards):
    out, _, _ = trained
    with pytest.raises(ValueError, match="different recipe"):
        train(Recipe(epochs=3, batch_size=16), shards, 64, out, "tiny")


def test_same_seed_same_weights(trained, shards, tmp_path):
    _, final_a, _ = trained
    final_b = train(TINY, shards, 64, tmp_path, "tiny", log=lambda line: None, threads=1)
    a = torch.load(final_a, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(final_b, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class _Interrupt(Exception):
    pass


def test_killed_run_resumes_from_latest_checkpoint(shards, tmp_path):
    """Kill the real subprocess (SIGKILL) right after epoch 1 was saved, then rerun."""
    recipe = Recipe(epochs=2, batch_size=16, seed=1)

    def kill_at_second_epoch(line: str) -> None:
        # open_clip_train saves epoch_latest.pt before it logs the next "Start epoch".
        if "Start epoch 1" in line:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(recipe, shards, 64, tmp_path, "k", log=kill_at_second_epoch, threads=1)
    ckpts = tmp_path / "k" / "checkpoints"
    assert torch.load(ckpts / "epoch_latest.pt", weights_only=True)["epoch"] == 1
    assert not (ckpts / "epoch_2.pt").exists() and not (tmp_path / "k" / DONE_FILE).exists()

    lines: list[str] = []
    final = train(recipe, shards, 64, tmp_path, "k", log=lines.append, threads=1)
    assert any("resuming checkpoint" in line and "(epoch 1)" in line for line in lines)
    assert not any("Start epoch 0" in line for line in lines)
    assert torch.load(final, weights_only=True)["epoch"] == 2
    # The resumed epoch sees the samples in the uninterrupted run's order: the same weights.
    whole = train(recipe, shards, 64, tmp_path, "whole", log=lambda line: None, threads=1)
    _assert_same_weights(final, whole)


def test_failed_run_raises_with_log_tail(shards, tmp_path):
    # An option open_clip_train rejects: the child exits non-zero before training.
    with pytest.raises(TrainError, match=r"(?s)exited with status 2.*precision"):
        train(Recipe(precision="fp64"), shards, 64, tmp_path, "bad", log=lambda line: None)


# --- key lists applied on the fly -----------------------------------------------------------


def _state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_key_list_over_source_shards_trains_exactly_the_listed_samples(trained, tmp_path):
    """Source shards = the 64 training samples with 16 dark distractors interleaved; the key
    list names the 64. The filtered stream is then the materialized one, sample for sample,
    so the weights must equal the run on the materialized shards bit for bit."""
    source = write_colour_shards(tmp_path / "source", distractors_every=4)
    keys = tmp_path / "split" / "keys.txt"
    keys.parent.mkdir()
    keys.write_text("".join(f"p{i:07d}\n" for i in range(64)))
    assert count_samples(source) == 80
    out = tmp_path / "out"
    final = train(TINY, source, None, out, "keyed", log=lambda _: None, keys=keys, threads=1)
    _assert_same_weights(final, trained[1])
    record = json.loads((tmp_path / "out" / "keyed" / RECORD_FILE).read_text())
    assert record["num_samples"] == 64 and record["keys"]["count"] == 64
    hashes = np.load(tmp_path / "out" / "keyed" / KEY_HASHES_FILE)
    assert hashes.dtype == KEY_HASH and hashes.tolist() == sorted(
        key_hash(f"p{i:07d}") for i in range(64)
    )
    # Another key list in the same run folder is another run.
    keys.write_text("".join(f"p{i:07d}\n" for i in range(32)))
    with pytest.raises(ValueError, match="different recipe"):
        train(TINY, source, None, tmp_path / "out", "keyed", keys=keys)


def test_key_list_files(tmp_path):
    txt = tmp_path / "keys.txt"
    txt.write_text("b\na\n\n")
    assert read_key_list(txt) == ["b", "a"]
    pq_file = tmp_path / "keys.parquet"
    pq.write_table(pa.table({"key": ["p1", "p2"]}), pq_file)
    assert read_key_list(pq_file) == ["p1", "p2"]
    pq.write_table(pa.table({"name": ["p1"]}), pq_file)
    with pytest.raises(ValueError, match="no 'key' column"):
        read_key_list(pq_file)
    txt.write_text("a\na\n")
    with pytest.raises(ValueError, match="repeats"):
        read_key_list(txt)
    txt.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_key_list(txt)
    with pytest.raises(ValueError, match=r"\.txt or \.parquet"):
        (tmp_path / "keys.csv").write_text("a\n")
        read_key_list(tmp_path / "keys.csv")
    with pytest.raises(FileNotFoundError, match="key list not found"):
        read_key_list(tmp_path / "nope.txt")


def test_sample_count_from_sizes_json(shards, tmp_path):
    assert count_samples(shards) == 64
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        count_samples(str(tmp_path / "{00000..00001}.tar"))


def test_entry_splits_its_own_option():
    assert split_own_options(["--simgap-keys", "/k.npy", "--model", "x"]) == (
        "/k.npy",
        ["--model", "x"],
    )
    assert split_own_options(["--model", "x"]) == (None, ["--model", "x"])
    assert split_own_options(["--", "--simgap-keys", "k", "--lr", "1"]) == ("k", ["--lr", "1"])


# --- checkpoints load with weights_only -----------------------------------------------------


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    check_resumable(tmp_path / "run")  # nothing to resume: fine
    good = {"epoch": 1, "state_dict": {"w": torch.ones(2)}, "optimizer": {"state": {}}}
    torch.save(good, ckpts / "epoch_latest.pt")
    check_resumable(tmp_path / "run")
    assert _weights_only_load(str(ckpts / "epoch_latest.pt"))["epoch"] == 1
    torch.save({**good, "hook": os.system}, ckpts / "epoch_latest.pt")
    with pytest.raises(ValueError, match=r"epoch_latest\.pt: refusing to resume.*weights_only"):
        check_resumable(tmp_path / "run")
    with pytest.raises(Exception, match="Weights only load failed"):
        _weights_only_load(str(ckpts / "epoch_latest.pt"))


def test_train_refuses_to_resume_a_pickled_callable(shards, tmp_path):
    prepare_run(TINY, shards, 64, tmp_path, "evil")
    ckpts = tmp_path / "evil" / "checkpoints"
    ckpts.mkdir()
    torch.save({"epoch": 1, "hook": os.system}, ckpts / "epoch_latest.pt")
    with pytest.raises(ValueError, match="refusing to resume"):
        train(TINY, shards, 64, tmp_path, "evil")


# --- launchers: quoting, and a real torchrun with one CPU process ---------------------------


def test_hostile_values_stay_literal_in_launch_commands(tmp_path):
    out = tmp_path / f"runs {HOSTILE}"
    keys = tmp_path / f"k {HOSTILE}.npy"
    recipe = Recipe(model="ViT-B-32", batch_size=64, precision="amp")
    cmd = torchrun_command(recipe, HOSTILE, 10, out, HOSTILE, 8, key_filter=keys)
    words = shlex.split(cmd)
    assert words[7:10] == ["--", "--simgap-keys", str(keys.absolute())]
    args = parse_args(words[10:])
    assert (args.train_data, args.name, args.logs) == (HOSTILE, HOSTILE, str(out.absolute()))
    script = slurm_script(
        recipe, HOSTILE, 10, out, HOSTILE, SlurmJob(python=f"/opt/py {HOSTILE}/python")
    )
    srun = shlex.split(script.splitlines()[-1])
    assert srun[3] == f"/opt/py {HOSTILE}/python"
    assert parse_args(srun[7:]).train_data == HOSTILE
    # Run through a real shell: echo each word back; nothing may be executed or expanded.
    echoed = subprocess.run(
        ["bash", "-c", cmd.replace(shlex.quote(sys.executable), "printf '%s\\n'", 1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert echoed == words[1:]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "z").exists()


def test_samples_seen_recipe(tmp_path):
    recipe = Recipe(epochs=32, samples_seen=12_800_000_000)
    args = parse_args(open_clip_argv(recipe, NASTY, 1000, tmp_path, "x"))
    assert args.train_num_samples == 400_000_000 and args.epochs == 32
    assert args.dataset_resampled


def test_torchrun_one_cpu_process_reproduces_the_local_run(trained, shards, tmp_path):
    """The generated torchrun command, run by bash with 1 CPU process (gloo): it parses, the
    per-rank batch is the global one, and the run equals the local run's weights bit for bit.
    (open_clip_train wraps the model in DDP only when WORLD_SIZE > 1.)"""
    out = tmp_path / "out dir $(touch pwned)"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = torchrun_command(TINY, shards, 64, out, "tr", 1, device="cpu", torchrun=torchrun)
    assert shlex.split(cmd)[0] == torchrun
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    params = (out / "tr" / "params.txt").read_text().splitlines()
    for line in ("dist_backend: gloo", "local_loss: True", "gather_with_grad: True"):
        assert line in params
    assert "batch_size: 16" in params and "device: cpu" in params
    _assert_same_weights(out / "tr" / "checkpoints" / "epoch_2.pt", trained[1])
    assert not (tmp_path / "pwned").exists()


def test_cli_writes_launch_scripts_for_the_papers_recipe(shards, tmp_path, capsys):
    from simgap.cli import main

    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"p{i:07d}\n" for i in range(0, 64, 2)))
    common = [shards, "--keys", str(keys), "-o", str(tmp_path / "runs"), "--model", "ViT-B-32"]
    common += ["--epochs", "32", "--batch-size", "33600", "--precision", "amp", "--workers", "2"]
    common += ["--grad-checkpointing", "--warmup", "10000"]
    assert main(["train", *common, "--name", "node", "--torchrun", "8"]) == 0
    script = tmp_path / "runs" / "node" / "torchrun.sh"
    words = shlex.split(script.read_text().splitlines()[-1])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert words[:8] == [*launcher, "--nproc_per_node=8", "-m", ENTRY_MODULE, "--"]
    key_filter = tmp_path / "runs" / "node" / KEY_HASHES_FILE
    assert words[8:10] == ["--simgap-keys", str(key_filter)] and key_filter.is_file()
    args = parse_args(words[10:])
    assert (args.batch_size, args.train_num_samples, args.epochs) == (4200, 32, 32)
    assert args.grad_checkpointing and args.warmup == 10000 and args.precision == "amp"
    assert os.access(script, os.X_OK)

    slurm = ["--slurm-nodes", "2", "--gpus-per-node", "4", "--partition", "a100"]
    assert main(["train", *common, "--name", "multi", *slurm]) == 0
    text = (tmp_path / "runs" / "multi" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --partition=a100" in text
    srun = shlex.split(text.splitlines()[-1])
    assert parse_args(srun[9:]).batch_size == 4200  # 33,600 over 2 x 4 GPUs
    assert capsys.readouterr().out.count("--simgap-keys") == 2
    # A global batch the GPUs cannot share evenly is refused, as one line.
    assert main(["train", *common, "--name", "odd", "--torchrun", "9"]) == 2
    assert "not divisible by 9" in capsys.readouterr().err


def test_key_filter_membership_and_pickling(tmp_path):
    import pickle

    from simgap._train_entry import KeyFilter
    from simgap.train import key_hashes

    np.save(tmp_path / "k.npy", key_hashes([f"p{i:07d}" for i in range(0, 100, 3)]))
    keep = KeyFilter(str(tmp_path / "k.npy"))
    kept = [i for i in range(100) if keep({"__key__": f"p{i:07d}"})]
    assert kept == list(range(0, 100, 3))
    clone = pickle.loads(pickle.dumps(keep))  # what a spawned dataloader worker receives
    assert clone._hashes is None and clone({"__key__": "p0000003"})
    assert not clone({"__key__": "p0000004"})
    np.save(tmp_path / "bad.npy", np.arange(3, dtype=np.int64))
    with pytest.raises(SystemExit, match="not a key filter"):
        KeyFilter(str(tmp_path / "bad.npy"))


def test_cached_tokenizer_returns_the_tokenizers_tokens():
    import open_clip

    from simgap._train_entry import CachedTokenizer

    plain = open_clip.get_tokenizer("RN50")
    cached = CachedTokenizer(plain, max_entries=2)
    captions = ["a photo of a cat", "a sketch of a dog", "a photo of a cat", "a third one"]
    for caption in captions * 2:
        assert torch.equal(cached(caption), plain(caption))
    assert len(cached._memo) == 2  # bounded: the third caption is tokenized each time
    first = cached("a photo of a cat")
    first.zero_()  # a caller's in-place change never reaches the memo
    assert torch.equal(cached("a photo of a cat"), plain("a photo of a cat"))
    assert torch.equal(cached(["x", "y"]), plain(["x", "y"]))  # batches pass through
    assert cached.context_length == plain.context_length
