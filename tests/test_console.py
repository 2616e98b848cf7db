"""The run's console: one line per stage, every stage's log in its own file, tails on failure."""

import io

import pytest

from simgap.console import RunConsole
from simgap.experiment.runner import Runner, Stage, execute


def _stages(log, fail: str | None = None):
    """Two chains side by side (as the runner runs trainings), each logging trainer chatter."""

    def body(name):
        def fn(results):
            for i in range(40):
                log(f"[{name}] 2026 | INFO | Train Epoch: 0 [{i + 1:>3}/40 (x%)] Loss: {i}")
            if name == fail:
                log(f"[{name}] RuntimeError: out of memory")
                raise RuntimeError(f"training {name} failed")
            return name

        return fn

    stages = [Stage("world", {}, lambda r: log("world: 3/3 shards, 30 rows") or 1)]
    for split in ("a", "b"):
        stages.append(Stage(f"train-{split}", {"s": split}, body(split), chain=split))
        stages.append(Stage(f"evaluate-{split}", {}, lambda r: 0.5, chain=split))
    return stages


def _run(tmp_path, verbose=False, live=False, fail=None):
    out = io.StringIO()
    names = [s.name for s in _stages(print)]
    console = RunConsole(tmp_path, names, verbose=verbose, out=out, live=live)
    with console:
        runner = Runner(tmp_path, _stages(console, fail), console)
        execute(runner, parallel=2)
    return out.getvalue().splitlines()


def test_one_line_per_stage_and_each_stage_log_holds_only_its_own_lines(tmp_path):
    lines = _run(tmp_path)
    assert len(lines) == 5, lines
    assert lines[0].startswith("[1/5] world ")
    assert sorted(ln.split()[1] for ln in lines) == sorted(
        ["world", "train-a", "train-b", "evaluate-a", "evaluate-b"]
    )
    assert not [ln for ln in lines if "Train Epoch" in ln]
    a = (tmp_path / "logs" / "train-a.log").read_text()
    assert a.count("Train Epoch") == 40 and "[b]" not in a
    b = (tmp_path / "logs" / "train-b.log").read_text()
    assert b.count("Train Epoch") == 40 and "[a]" not in b
    assert "world: 3/3 shards" in (tmp_path / "logs" / "world.log").read_text()

    rerun = _run(tmp_path)
    assert [ln.split()[-1] for ln in rerun] == ["cached"] * 5


def test_verbose_streams_the_logs(tmp_path):
    lines = _run(tmp_path, verbose=True)
    assert sum("Train Epoch" in ln for ln in lines) == 80


def test_a_failed_stage_shows_its_log_tail(tmp_path):
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="training b failed"):
        with RunConsole(tmp_path, [s.name for s in _stages(print)], out=out) as console:
            execute(Runner(tmp_path, _stages(console, fail="b"), console), parallel=2)
    text = out.getvalue()
    assert f"stage train-b failed; its log: {tmp_path / 'logs' / 'train-b.log'}" in text
    assert "  | [b] RuntimeError: out of memory" in text
    assert "stage train-a failed" not in text


def test_live_display_keeps_the_stage_lines(tmp_path):
    lines = _run(tmp_path, live=True)
    text = "\n".join(lines)
    for stage in ("world", "train-a", "train-b", "evaluate-a", "evaluate-b"):
        assert f" {stage} " in text
    assert (tmp_path / "logs" / "train-a.log").read_text().count("Train Epoch") == 40
