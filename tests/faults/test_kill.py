"""Kill anywhere: SIGKILL each stage's CLI process group at seeded random points, rerun, and
demand the same bytes as an uninterrupted run, every output whole, no key lost or duplicated.

The default suite takes a few kill points per stage; ``-m extended`` takes 20 (5 to 10 for the
stages whose kill point costs a minute or more: ``SLOW_POINTS``).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgap.data.tarwrite import write_tar
from simgap.select.splitfile import write_split

from .faultlib import (
    assert_ok,
    assert_same_tree,
    assert_whole_files,
    move_aside,
    record,
    run_and_kill,
    run_cli,
    tar_keys,
    write_unit_store,
)

DEFAULT_POINTS = 2
EXTENDED_POINTS = 20
# Stages whose every kill point costs a minute or more on 2 cores (a CLI start with torch and a
# model, a training, a whole run) take fewer points, so that `-m extended` fits in an hour.
SLOW_POINTS = {"embed": 10, "train": 5, "audit": 10, "run": 5}


def _survive(
    stage: str, args: list, out: Path, reference: Path, points, ignore=(), check=None, timeout=600
):
    """For each kill point: start from nothing, kill (maybe twice), rerun to the end, compare.
    ``timeout``: a hang guard per CLI run (a whole ``simgap run`` needs more than one stage)."""
    for i, point in enumerate(points):
        shutil.rmtree(out, ignore_errors=True)
        kills = 0
        labels = []  # where each kill aimed (``label``: e.g. the stage a run was killed after)
        for kill in point:
            kill = dict(kill)
            labels.append(kill.pop("label", None))
            if run_and_kill(args, timeout=timeout, **kill):
                kills += 1
        assert_ok(run_cli(*args, timeout=timeout))
        outcome = "survived" if kills else "finished-before-kill"
        record("kill", stage, outcome, point=i, kills=kills, after=labels)
        assert_whole_files(out)
        assert_same_tree(reference, out, ignore)
        if check:
            check(out)


def _reference_run(args: list, out: Path, timeout: float = 600) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    assert_ok(run_cli(*args, timeout=timeout))
    assert_whole_files(out)
    return move_aside(out)


# ----------------------------------------------------------------------------------- embed


def _embed_points(n: int, shards: int, seed: int):
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        kills = []
        for _ in range(rng.choice([1, 1, 2])):
            k = rng.randrange(shards)
            # k = 0: anywhere in start-up (imports, model load) or the first shard.
            delay = rng.uniform(0, 12) if k == 0 else rng.uniform(0, 0.6)
            kills.append({"after_lines": k, "pattern": r"embed .*shards", "delay": delay})
        points.append(kills)
    return points


def _embed_case(workdir: Path, pool, checkpoint: Path, name: str, extra=()):
    folder, keys = pool
    out = workdir / name
    args = ["embed", folder, "-o", out, "--checkpoint", checkpoint, "--batch-size", "4", *extra]
    reference = _reference_run(args, out)

    def check(store: Path) -> None:
        got = [
            k
            for p in sorted((store / "keys").glob("*.parquet"))
            for k in pq.read_table(p)["key"].to_pylist()
        ]
        assert sorted(got) == sorted(keys) and len(got) == len(set(got))
        manifest = json.loads((store / "manifest.json").read_text())
        assert manifest["rows"] == len(keys)

    check(reference)
    return args, out, reference, check


# Extended only: its CLI start-up costs a minute here, and the default suite has the same
# stage's kill-and-resume test beside the stage (tests/test_embed.py, test_train.py).
@pytest.mark.extended
def test_embed_survives_kills(workdir, pool, checkpoint):
    # Default decode workers: the 6 shards run as one group (one DataLoader), a line per shard.
    args, out, reference, check = _embed_case(workdir, pool, checkpoint, "embed-kill")
    _survive("embed", args, out, reference, _embed_points(DEFAULT_POINTS, 6, seed=1), check=check)


@pytest.mark.extended
def test_embed_survives_many_kills(workdir, pool, checkpoint):
    # No decode workers: shard tasks one by one, killed after any of them.
    no_workers = ["--decode-workers", "0"]
    args, out, reference, check = _embed_case(workdir, pool, checkpoint, "embed-kill-x", no_workers)
    points = _embed_points(SLOW_POINTS["embed"], 6, seed=101)
    _survive("embed", args, out, reference, points, check=check)


# ------------------------------------------------------------------------------------ scan


@pytest.fixture(scope="module")
def scan_inputs(workdir):
    root = workdir / "scan-inputs"
    # 8 shards: each writes rows/<shard>.npy when it is done, the kill points' landmarks.
    base = write_unit_store(root / "base", 40_000, 32, seed=1, shard_rows=5_000)
    write_unit_store(root / "bench", 64, 32, seed=2)
    write_unit_store(root / "ref", 500, 32, seed=3)
    return root, base


def _file_points(n: int, seed: int, files: int, startup: float, step: float):
    """Kill ``delay`` after the k-th output file appears (k = 0: anywhere from start-up on)."""
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        kills = []
        for _ in range(rng.choice([1, 1, 2])):
            k = rng.randrange(files)
            delay = rng.uniform(0, startup) if k == 0 else rng.uniform(0, step)
            kills.append({"after_files": k, "delay": delay})
        points.append(kills)
    return points


def _watching(points, out: Path):
    return [[{**k, "watch": out} for k in p] for p in points]


def _scan_case(scan_inputs, name: str):
    root, base = scan_inputs
    out = root / name
    args = [
        "scan",
        root / "base",
        "--benchmarks",
        root / "bench",
        "--thresholds-from",
        root / "ref",
    ]
    args += ["--topk", "5", "-o", out]
    reference = _reference_run(args, out)

    def check(scan: Path) -> None:
        rows = sorted((scan / "rows").glob("*.npy"))
        assert [p.stem for p in rows] == [s.name for s in base.shards]
        assert sum(len(np.load(p)) for p in rows) == base.rows

    check(reference)
    return args, out, reference, check


def test_scan_survives_kills(scan_inputs):
    args, out, reference, check = _scan_case(scan_inputs, "scan-kill")
    points = _watching(_file_points(DEFAULT_POINTS + 1, 2, 9, startup=6, step=0.2), out)
    _survive("scan", args, out, reference, points, check=check)


@pytest.mark.extended
def test_scan_survives_many_kills(scan_inputs):
    args, out, reference, check = _scan_case(scan_inputs, "scan-kill-x")
    points = _watching(_file_points(EXTENDED_POINTS, 102, 9, startup=6, step=0.2), out)
    _survive("scan", args, out, reference, points, check=check)


# ----------------------------------------------------------------------------- materialize


@pytest.fixture(scope="module")
def materialize_inputs(workdir, pool):
    folder, keys = pool
    root = workdir / "materialize-inputs"
    kept = sorted(set(keys[::3] + keys[1::7]))
    write_split(root / "split", kept, {"name": "test", "policy": "test", "params": {}})
    ref = root / "reference"
    for c, colour in enumerate([(200, 0, 0), (0, 200, 0)]):
        (ref / f"class {c}").mkdir(parents=True)
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), colour).save(buf, "JPEG")
            (ref / f"class {c}" / f"r{c}{i:04d}.jpg").write_bytes(buf.getvalue())
    return root, folder, kept


def _materialize_case(materialize_inputs, name: str):
    root, folder, kept = materialize_inputs
    out = root / name
    args = ["materialize", root / "split", folder, "-o", out, "--reference", root / "reference"]
    reference = _reference_run(args, out)

    def check(shards: Path) -> None:
        got = tar_keys(sorted(shards.glob("*.tar")))
        assert len(got) == len(set(got)), "a key was written twice"
        assert sorted(got) == sorted(kept + [f"r{c}{i:04d}" for c in range(2) for i in range(3)])

    check(reference)
    return args, out, reference, check


def test_materialize_survives_kills(materialize_inputs):
    args, out, reference, check = _materialize_case(materialize_inputs, "mat-kill")
    points = _watching(_file_points(DEFAULT_POINTS + 1, 3, 12, startup=4, step=0.05), out)
    _survive("materialize", args, out, reference, points, check=check)


@pytest.mark.extended
def test_materialize_survives_many_kills(materialize_inputs):
    args, out, reference, check = _materialize_case(materialize_inputs, "mat-kill-x")
    points = _watching(_file_points(EXTENDED_POINTS, 103, 12, startup=4, step=0.05), out)
    _survive("materialize", args, out, reference, points, check=check)


# ----------------------------------------------------------------------------------- train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _colour_shards(folder: Path, n: int = 48, shards: int = 2) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    per = n // shards
    for s in range(shards):
        samples = []
        for i in range(s * per, (s + 1) * per):
            c = names[i % len(names)]
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), COLOURS[c]).save(buf, "JPEG")
            samples.append((f"p{i:07d}", {"jpg": buf.getvalue(), "txt": f"a {c} square".encode()}))
        write_tar(folder / f"{s:05d}.tar", samples)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def _train_points(n: int, seed: int):
    rng = random.Random(seed)
    # open_clip_train logs "Start epoch e" after saving epoch_latest.pt, and a "Train Epoch"
    # line per logged step: kill between any two of them, or during start-up.
    return [
        [{"after_lines": (k := rng.randrange(6)), "pattern": r"Start epoch|Train Epoch",
          "delay": rng.uniform(0, 8) if k == 0 else rng.uniform(0, 1.5)}]
        for _ in range(n)
    ]  # fmt: skip


def _train_case(workdir: Path, name: str):
    data = _colour_shards(workdir / "colour-pool")
    out = workdir / name
    args = ["train", data, "--samples", "48", "-o", out, "--name", "run", "--model"]
    args += ["simgap-tiny-vit", "--epochs", "3", "--batch-size", "16"]
    reference = _reference_run(args, out)
    return args, out, reference


# open_clip_train's logs and params.txt record times and are appended across resumes.
TRAIN_LOGS = (r"out\.log$", r"simgap-train\.log$", r"params\.txt$")


# Extended only: its CLI start-up costs a minute here, and the default suite has the same
# stage's kill-and-resume test beside the stage (tests/test_embed.py, test_train.py).
@pytest.mark.extended
def test_train_survives_a_kill(workdir):
    args, out, reference = _train_case(workdir, "train-kill")
    _survive("train", args, out, reference, _train_points(1, seed=4), ignore=TRAIN_LOGS)


@pytest.mark.extended
def test_train_survives_many_kills(workdir):
    args, out, reference = _train_case(workdir, "train-kill-x")
    points = _train_points(SLOW_POINTS["train"], 104)
    _survive("train", args, out, reference, points, ignore=TRAIN_LOGS)


# ------------------------------------------------------------------------ select and audit


def _select_case(scan_inputs, name: str, policy_args: list):
    root, base = scan_inputs
    out = root / name
    args = ["select", *policy_args, root / "base", "-o", out]
    reference = _reference_run(args, out)

    def check(split: Path) -> None:
        keys = (split / "keys.txt").read_text().splitlines()
        assert keys == sorted(set(keys)) and 0 < len(keys) <= base.rows
        assert pq.read_table(split / "keys.parquet")["key"].to_pylist() == keys

    check(reference)
    return args, out, reference, check


SEMDEDUP = ["semdedup", "--clusters", "8", "--eps", "0.5"]


def test_select_semdedup_survives_kills(scan_inputs):
    args, out, reference, check = _select_case(scan_inputs, "select-kill", SEMDEDUP)
    points = _watching(_file_points(DEFAULT_POINTS, 5, 3, startup=6, step=0.3), out)
    _survive("select", args, out, reference, points, check=check)


@pytest.mark.extended
def test_select_semdedup_survives_many_kills(scan_inputs):
    args, out, reference, check = _select_case(scan_inputs, "select-kill-x", SEMDEDUP)
    points = _watching(_file_points(EXTENDED_POINTS, 105, 3, startup=6, step=0.3), out)
    _survive("select", args, out, reference, points, check=check)


def _audit_case(scan_inputs, name: str):
    root, _ = scan_inputs
    out = root / name
    # Random unit stores have no images: the embedding-threshold audit (the paper's method).
    args = ["audit", root / "base", "--benchmarks", root / "bench", "--threshold", "0.5"]
    args += ["--verify", "none", "-o", out]
    return args, out, _reference_run(args, out)


# Extended only: a 40,000-row audit per kill point.
@pytest.mark.extended
def test_audit_survives_kills(scan_inputs):
    args, out, reference = _audit_case(scan_inputs, "audit-kill")
    points = _watching(_file_points(DEFAULT_POINTS, 6, 2, startup=6, step=0.2), out)
    _survive("audit", args, out, reference, points)


@pytest.mark.extended
def test_audit_survives_many_kills(scan_inputs):
    args, out, reference = _audit_case(scan_inputs, "audit-kill-x")
    points = _watching(_file_points(SLOW_POINTS["audit"], 106, 2, startup=6, step=0.2), out)
    _survive("audit", args, out, reference, points)


# ----------------------------------------------------------------------- run (whole pipeline)

TINY_RUN = """
name = "fault-run"
seed = 0
[sources]
kind = "world"
[sources.world]
seed = 5
scale = 0.05
n_classes = 4
[similarity.recipe]
epochs = 1
[train]
splits = ["full", "combined"]
parallel = 1
threads = 1
[train.recipe]
epochs = 1
"""
# Wall times and logs legitimately differ between a resumed and an uninterrupted run.
# Done and index records identify their inputs by size and mtime, and a killed run may have
# rewritten the world's files (same bytes, new mtimes): the records differ, the data does not.
RUN_VOLATILE = (
    r"(^|/)run\.json$", r"^stages/", r"\.log$", r"params\.txt$", r"^report/",
    r"^world/world\.json$", r"(^|/)\.?done/[^/]+\.json$", r"(^|/)\.index/",
)  # fmt: skip


# A hang guard for one whole run (39 stages, three trainings): a few minutes on 2 idle cores, and
# its similarity training alone took 4 minutes beside other work (600 s cut the run short).
RUN_TIMEOUT = 1800


def _run_stages(config: Path, out: Path) -> list[str]:
    """The plan's stage names in order (a dry run reads stage records, writes nothing)."""
    from simgap.experiment import config as config_mod
    from simgap.experiment import run_config

    plan = run_config(config_mod.load(config), out, log=lambda _: None, dry_run=True)
    return [row["stage"] for row in plan["plan"]]


def _run_points(n: int, seed: int, stages: list[str], out: Path):
    """Kill a random time after a stage starts (the runner writes ``stages/<stage>.started``
    before it runs a stage) or ends (its record ``stages/<stage>.json``), or anywhere in
    start-up: the console's lines go to stdout, one per stage, and the stages' own messages to
    ``<run>/logs``, so stage files are the landmarks. Points go to distinct kinds of stage
    (world, similarity-model, embed, scan, select, gaps, materialize, train, evaluate,
    analysis, start-up) before any kind gets a second: 39 stages, 15 of them selects, would
    otherwise draw mostly selects."""
    rng = random.Random(seed)
    kinds: dict[str | None, list[str]] = {None: [""]}
    for stage in stages[:-1]:
        kinds.setdefault(stage.split("-")[0], []).append(stage)
    order: list[str | None] = []
    while len(order) < n:
        order += rng.sample(sorted(kinds, key=str), len(kinds))
    points = []
    for kind in order[:n]:
        stage, when = rng.choice(kinds[kind]), rng.choice(["started", "json"])
        after = out / "stages" / f"{stage}.{when}" if kind else None
        label = f"{stage} {'started' if when == 'started' else 'done'}" if kind else "start-up"
        points.append([{"after_file": after, "delay": rng.uniform(0, 10), "label": label}])
    return points


@pytest.mark.extended
def test_run_survives_many_kills(workdir):
    config = workdir / "fault-run.toml"
    config.write_text(TINY_RUN)
    out = workdir / "run-kill-x"
    args = ["run", config, "--run-dir", out]
    stages = _run_stages(config, out)
    assert {"scan", "gaps", "train-full", "train-combined"} <= set(stages), stages
    reference = _reference_run(args, out, timeout=RUN_TIMEOUT)
    assert sorted(p.stem for p in (reference / "stages").glob("*.json")) == sorted(stages)
    n = int(os.environ.get("SIMGAP_RUN_KILLS", SLOW_POINTS["run"]))
    points = _run_points(n, 107, stages, out)
    _survive("run", args, out, reference, points, ignore=RUN_VOLATILE, timeout=RUN_TIMEOUT)
