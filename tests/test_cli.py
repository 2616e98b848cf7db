"""Bad input to every command: one line naming the file and the problem, exit status 2."""

import subprocess
import sys

import pytest

from simgap.data.tarwrite import write_tar


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "simgap.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("simgap: error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    write_tar(tmp_path / "pool" / "00000.tar", [])
    (tmp_path / "nostore").mkdir()
    return tmp_path


def test_scan_missing_store(bad_inputs):
    _assert_one_line_error(
        run_cli(
            "scan",
            bad_inputs / "missing",
            "--benchmarks",
            bad_inputs / "nostore",
            "-o",
            bad_inputs / "out",
        ),
        "missing",
        "no such store",
    )


def test_scan_unfinished_store(bad_inputs):
    _assert_one_line_error(
        run_cli(
            "scan",
            bad_inputs / "nostore",
            "--benchmarks",
            bad_inputs / "nostore",
            "-o",
            bad_inputs / "out",
        ),
        "nostore",
        "manifest",
    )


def test_materialize_folder_without_shards(bad_inputs):
    from simgap.select.splitfile import write_split

    write_split(bad_inputs / "split", ["a"], {"name": "x"})
    _assert_one_line_error(
        run_cli("materialize", bad_inputs / "split", bad_inputs / "empty", "-o", bad_inputs / "o"),
        "empty",
        "no .tar",
    )


def test_materialize_missing_split(bad_inputs):
    _assert_one_line_error(
        run_cli("materialize", bad_inputs / "nosplit", bad_inputs / "pool", "-o", bad_inputs / "o"),
        "nosplit",
        "not found",
    )


def test_materialize_corrupt_shard(bad_inputs):
    from simgap.select.splitfile import write_split

    write_split(bad_inputs / "split", ["a"], {"name": "x"})
    _assert_one_line_error(
        run_cli(
            "materialize", bad_inputs / "split", bad_inputs / "junk.tar", "-o", bad_inputs / "o"
        ),
        "junk.tar",
        "not a readable tar",
    )


def test_report_missing_run(bad_inputs):
    _assert_one_line_error(run_cli("report", bad_inputs / "norun"), "norun")


def test_evaluate_missing_templates(bad_inputs):
    _assert_one_line_error(
        run_cli(
            "evaluate",
            bad_inputs / "empty",
            "--templates",
            bad_inputs / "t.txt",
            "--checkpoint",
            bad_inputs / "none.pt",
        ),
        "none.pt",
    )


def test_demo_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    _assert_one_line_error(
        run_cli("demo", tmp_path, "--scale", "0.01"), str(tmp_path), "not a simgap run"
    )
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_world_refuses_a_different_config(tmp_path):
    assert run_cli("world", tmp_path / "w", "--scale", "0.02").returncode == 0
    _assert_one_line_error(
        run_cli("world", tmp_path / "w", "--scale", "0.02", "--seed", "9"), str(tmp_path / "w")
    )


def test_embed_missing_source(tmp_path):
    _assert_one_line_error(
        run_cli(
            "embed", tmp_path / "nothing", "-o", tmp_path / "s", "--checkpoint", tmp_path / "c.pt"
        ),
        "nothing",
    )


# ----------------------------------------------------------------------------- summary lines


def _summary(capsys, *args, stream="out") -> str:
    """Run a command in this process; its last line on ``stream`` is the summary (stderr for the
    commands whose stdout is data: evaluate's JSON, train's launch script)."""
    from simgap.cli import main

    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    return getattr(captured, stream).splitlines()[-1]


def _jpeg(value):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def test_every_command_ends_with_a_summary_that_counts(tmp_path, capsys, checkpoint):
    import numpy as np

    from simgap.scan import iter_scan_rows
    from simgap.select.splitfile import read_split

    w, s = tmp_path / "world", tmp_path / "stores"
    line = _summary(capsys, "world", w, "--scale", "0.05")
    assert line.startswith("world: 10 classes, 200 pool samples in 1 shards (4 injected ")
    assert line.endswith(f"30 reference images, 104 test images in 6 benchmarks -> {w}")

    model = ["--checkpoint", checkpoint.checkpoint]
    for name, source in [("pool", w / "pool"), ("reference", w / "reference")]:
        line = _summary(capsys, "embed", source, "-o", s / name, *model)
    assert line == f"embed: 30 rows in 1 shards, 0 skipped -> {s / 'reference'}"
    line = _summary(capsys, "embed", w / "benchmarks" / "photo", "-o", s / "photo", *model)
    assert line == f"embed: 20 rows in 1 shards, 0 skipped -> {s / 'photo'}"
    bad = [("good", {"jpg": _jpeg(9)}), ("broken", {"jpg": b"\xff\xd8 not a jpeg"})]
    write_tar(tmp_path / "bad" / "00000.tar", [*bad, ("empty", {"jpg": b""})])
    line = _summary(capsys, "embed", tmp_path / "bad", "-o", s / "bad", *model)
    assert line == (
        f"embed: 1 rows in 1 shards, 2 skipped (1 corrupt_image, 1 empty_image) -> {s / 'bad'}"
    )

    scan = tmp_path / "scan"
    args = ["--benchmarks", s / "photo", "--thresholds-from", s / "reference", "-o", scan]
    line = _summary(capsys, "scan", s / "pool", *args)
    above = sum(int((rec["margin"] > 0).sum()) for _, _, rec in iter_scan_rows(scan))
    assert line == (
        f"scan: 20 tests from 1 benchmarks x 200 base rows, {above} rows above a threshold, "
        f"0 bad base rows skipped -> {scan}"
    )

    split = tmp_path / "split"
    args = ["--benchmarks", s / "photo", "--reference", s / "reference", "-o", split]
    line = _summary(capsys, "select", "gapmatch", s / "pool", *args)
    kept, _ = read_split(split)
    assert line == (
        f"select gapmatch: kept {len(kept)} of 200 pool rows ({200 - len(kept)} removed), "
        f"guarantee holds on 20 test points -> {split}"
    )
    assert above == 0 or len(kept) < 200

    shards = tmp_path / "shards"
    line = _summary(capsys, "materialize", split, w / "pool", "-o", shards)
    n = len(kept)
    assert line == (
        f"materialize: {n} samples in 1 shards ({n} kept, 0 reference), 0 missing, 0 corrupt, "
        f"0 duplicate, 0 skipped -> {shards}"
    )

    ev = tmp_path / "eval"
    args = ["--templates", w / "templates.txt", "-o", ev, *model]
    line = _summary(capsys, "evaluate", w / "benchmarks" / "photo", *args, stream="err")
    preds = _parquet_rows(ev / "predictions" / "photo.parquet")
    top1 = np.mean([r["label"] == r["pred"] for r in preds])
    assert line == (
        f"evaluate: 1 benchmarks, 20 test images, 0 skipped; top-1 photo {top1:.1%} -> {ev}"
    )

    audit = tmp_path / "audit"
    args = ["--benchmarks", s / "photo", "--verify", "none", "--threshold", "0.99", "-o", audit]
    line = _summary(capsys, "audit", s / "pool", *args)
    pairs = len(_parquet_rows(audit / "pairs.parquet"))
    assert line.startswith("audit: ") and "of 20 test points contaminated in 1 benchmarks" in line
    assert line.endswith(f"{pairs} pairs (--verify none) -> {audit}")

    out = tmp_path / "train"
    line = _summary(capsys, "train", shards / "00000.tar", "-o", out, "--name", "x",
                    "--samples", n, "--epochs", 2, "--batch-size", 8, "--torchrun", 2,
                    "--workers", 0, stream="err")  # fmt: skip
    assert line == (
        f"train: {n} samples x 2 epochs, script {out / 'x' / 'torchrun.sh'}, "
        "not launched (--launch runs it)"
    )


def _parquet_rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
