"""Bad input to every command: one line naming the file and the problem, exit status 2."""

import subprocess
import sys

import pytest

from simgap.data.tars import write_tar


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
    from simgap.splits import write_split

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
    from simgap.splits import write_split

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
