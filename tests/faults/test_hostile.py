"""Hostile input: archive members that try to escape, checkpoints that carry code, config values
that try to become shell, odd names. Nothing is written outside the output folder, no code runs,
every launch-script argument reaches the program as the one argument it was."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import tarfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simgap.select.splitfile import write_split
from simgap.train import Recipe, SlurmJob, slurm_script, torchrun_command

from .faultlib import (
    assert_ok,
    noise_png,
    one_line_error,
    read_tar_whole,
    record,
    run_cli,
)

ESCAPE = f"simgap-escape-{uuid.uuid4().hex[:8]}"


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def hostile_pool(workdir) -> tuple[Path, list[str], Path]:
    """One shard: good samples (one with a space and non-ASCII in its key) around members that
    are absolute, climb with ``..``, are symlinks, hard links, devices or FIFOs."""
    import numpy as np

    rng = np.random.default_rng(5)
    root = workdir / "hostile"
    (root / "pool").mkdir(parents=True)
    outside = Path("/tmp") / ESCAPE
    good = ["a-good", "b ключ ü", "z-good"]
    with tarfile.open(root / "pool" / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, f"{good[0]}.png", noise_png(rng))
        _add(tar, f"{good[0]}.txt", b"fine")
        _add(tar, f"../../{ESCAPE}-dotdot.png", noise_png(rng))
        _add(tar, f"{outside}-absolute.png", noise_png(rng))
        _add(tar, "sym.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "sym.txt", kind=tarfile.SYMTYPE, link=f"../../{ESCAPE}-symlink")
        _add(tar, "hard.png", kind=tarfile.LNKTYPE, link=f"{good[0]}.png")
        _add(tar, "hard2.png", kind=tarfile.LNKTYPE, link="/etc/passwd")
        _add(tar, "dev.png", kind=tarfile.CHRTYPE)
        _add(tar, "blk.png", kind=tarfile.BLKTYPE)
        _add(tar, "fifo.png", kind=tarfile.FIFOTYPE)
        _add(tar, f"{good[1]}.png", noise_png(rng))
        _add(tar, f"{good[1]}.txt", "ünïcødé caption".encode())
        _add(tar, f"sub/../../{ESCAPE}-nested.png", noise_png(rng))
        _add(tar, f"{good[2]}.png", noise_png(rng))
        _add(tar, f"{good[2]}.txt", b"fine")
    return root, good, outside


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _no_escape(outside: Path) -> None:
    escaped = sorted(p.name for p in Path("/tmp").glob(f"{ESCAPE}*"))
    escaped += sorted(p.name for p in outside.parent.parent.glob(f"*{ESCAPE}*"))
    assert not escaped, f"written outside the output folder: {escaped}"


def test_embed_reads_only_safe_members(workdir, hostile_pool, checkpoint):
    root, good, outside = hostile_pool
    before = _tree(root)
    out = root / "store"
    assert_ok(run_cli("embed", root / "pool", "-o", out, "--checkpoint", checkpoint))
    assert {p for p in _tree(root) - before if not p.startswith("store")} == set()
    _no_escape(outside)
    table = pq.read_table(out / "keys" / "00000.parquet").to_pydict()
    assert table["key"] == good
    import json

    skipped = json.loads((out / "manifest.json").read_text())["shards"][0]["skipped"]
    # 10 unsafe members (absolute, 2 climbing, 2 symlinks, 2 hard links, 2 devices, a FIFO).
    assert sum(skipped.values()) >= 10, skipped
    record("hostile", "embed", "skipped+counted", input="../ abs symlink hardlink dev fifo")


def test_materialize_writes_only_inside_its_folder(workdir, hostile_pool):
    root, good, outside = hostile_pool
    wanted = [*good, f"../../{ESCAPE}-dotdot", f"{outside}-absolute", "sym", "hard", "dev"]
    write_split(root / "split", wanted, {"name": "hostile", "policy": "test", "params": {}})
    before = _tree(root)
    out = root / "shards"
    assert_ok(run_cli("materialize", root / "split", root / "pool", "-o", out))
    assert {p for p in _tree(root) - before if not p.startswith("shards")} == set()
    _no_escape(outside)
    names = [n for t in sorted(out.glob("*.tar")) for n in read_tar_whole(t)]
    assert sorted({n.split(".")[0] for n in names}) == sorted(good)
    for n in names:
        assert not n.startswith("/") and ".." not in n.split("/"), n
    with tarfile.open(sorted(out.glob("*.tar"))[0]) as tar:
        assert all(m.isreg() for m in tar.getmembers())
    record("hostile", "materialize", "skipped+counted", input="../ abs symlink hardlink dev")


# ------------------------------------------------------------------------------ checkpoints


class _Payload:
    """Unpickling this runs ``touch marker``: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    from simgap.models import ModelSpec, load_model

    state = load_model(ModelSpec("simgap-tiny"), allow_random=True).model.state_dict()
    torch.save({"state_dict": state, "epoch": _Payload(marker)}, path)
    return path


# Extended only (80 s of CLI start-ups); tests/test_train.py refuses such a checkpoint by default.
@pytest.mark.extended
def test_checkpoint_carrying_code_is_refused_not_run(workdir, hostile_pool):
    root, _, _ = hostile_pool
    marker = root / "PWNED-embed"
    evil = _evil_checkpoint(root / "evil.pt", marker)
    res = run_cli("embed", root / "pool", "-o", root / "evil-store", "--checkpoint", evil)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    one_line_error(res, "evil.pt")
    record("hostile", "embed", "refused", input="checkpoint with pickled code")

    marker2 = root / "PWNED-eval"
    bench = root / "bench" / "red"
    bench.mkdir(parents=True)
    (root / "bench" / "red" / "r1.png").write_bytes(
        noise_png(__import__("numpy").random.default_rng(1))
    )
    (root / "templates.txt").write_text("a photo of a {c}\n")
    evil2 = _evil_checkpoint(root / "evil2.pt", marker2)
    res = run_cli(
        "evaluate", root / "bench", "--templates", root / "templates.txt", "--checkpoint", evil2
    )
    assert not marker2.exists(), "unpickling the checkpoint ran code"
    one_line_error(res, "evil2.pt")
    record("hostile", "evaluate", "refused", input="checkpoint with pickled code")


# ---------------------------------------------------------------------------- launch scripts

NASTY_DATA = "/data/my shards/$(touch {m});`touch {m}`&'q'\"d\"/{{00000..00003}}.tar"
NASTY_OUT = "/runs/out $(touch {m}) 'x' \\ ; touch {m}"


def _bash_argv(script: str, workdir: Path, fake: str) -> list[str]:
    """Run ``script`` in bash with ``fake`` (torchrun / srun) replaced by a function that
    records its arguments NUL-separated; return them."""
    args_file = workdir / f"argv-{uuid.uuid4().hex[:6]}"
    prelude = (
        f'{fake}() {{ printf "%s\\0" "$@" > {shlex.quote(str(args_file))}; }}\n'
        "scontrol() { echo node-1; }\n"
        f"export -f {fake} scontrol\n"
    )
    env = {**os.environ, "SLURM_JOB_NODELIST": "node-1"}
    proc = subprocess.run(
        ["bash", "-c", prelude + script], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return args_file.read_bytes().decode().split("\0")[:-1]


def test_torchrun_command_keeps_hostile_values_as_single_arguments(workdir):
    marker = workdir / "PWNED-torchrun"
    m = shlex.quote(str(marker))
    data, out = NASTY_DATA.format(m=m), NASTY_OUT.format(m=m)
    recipe = Recipe(batch_size=64)
    # An explicit launcher name, so that bash calls the recording function: the default launcher
    # is this interpreter's path (`python -m torch.distributed.run`), which would really train.
    cmd = torchrun_command(
        recipe, data, 100, Path(out), "run-1", nproc_per_node=2, torchrun="torchrun"
    )
    argv = _bash_argv(cmd, workdir, "torchrun")
    assert not marker.exists(), "shell in a value ran"
    assert argv == shlex.split(cmd)[1:]
    assert data in argv and str(Path(out).absolute()) in argv
    record("hostile", "train", "quoted", input="shell in torchrun values")


def test_slurm_script_keeps_hostile_values_quoted_and_refuses_bad_directives(workdir):
    marker = workdir / "PWNED-slurm"
    m = shlex.quote(str(marker))
    data, out = NASTY_DATA.format(m=m), NASTY_OUT.format(m=m)
    python = f"/opt/my env/bin/python $(touch {m})"
    script = slurm_script(Recipe(batch_size=64), data, 100, Path(out), "run-1",
                          SlurmJob(nodes=2, gpus_per_node=4, python=python))  # fmt: skip
    argv = _bash_argv(script, workdir, "srun")
    assert not marker.exists(), "shell in a value ran"
    assert python in argv and data in argv and str(Path(out).absolute()) in argv
    for bad in ["gpu;touch x", "a b", "$(id)", "x\n#SBATCH --wrap=id"]:
        with pytest.raises(ValueError):
            slurm_script(Recipe(batch_size=64), data, 100, Path(out), "r", SlurmJob(partition=bad))
    with pytest.raises(ValueError):
        slurm_script(
            Recipe(batch_size=64), data, 100, Path(out), "r", SlurmJob(job_name="j\nrm -rf /")
        )
    record("hostile", "train", "quoted", input="shell in slurm values")
    record("hostile", "train", "refused", input="shell in #SBATCH directives")


def test_run_name_cannot_escape_the_output_folder(workdir):
    from simgap.train import open_clip_argv

    for bad in ["../elsewhere", "a/b", "..", "", "/abs"]:
        with pytest.raises(ValueError):
            open_clip_argv(Recipe(), "x.tar", 1, workdir, bad)
    record("hostile", "train", "refused", input="run names climbing out")
