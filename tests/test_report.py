"""The report is built from a run directory's files alone: full run, partial run, determinism."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgap.report import build_report, summary_table

BENCHMARKS = ("photo", "sketch", "rendition")
POOL_SIZE = 10_000
# split -> (policy, benchmarks, size, control_of)
SPLITS = {
    "combined": ("gapmatch", list(BENCHMARKS), 8_400, None),
    "sketch": ("gapmatch", ["sketch"], 9_200, None),
    "sketch-random": ("random", [], 9_200, "sketch"),
}
# split -> benchmark -> top-1; "combined" is not evaluated in the full run either.
TOP1 = {
    "sketch": {"photo": 0.4321, "sketch": 0.3012, "rendition": 0.5550},
    "sketch-random": {"photo": 0.4100, "sketch": 0.3500, "rendition": 0.5000},
}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _write_gaps(run: Path, rng: np.random.Generator) -> None:
    for i, bench in enumerate(BENCHMARKS):
        n = 300 + 50 * i
        reference = rng.beta(5, 3, n).astype(np.float32)
        pool = np.minimum(reference + rng.uniform(0.02, 0.2, n), 1).astype(np.float32)
        columns = {
            "test_key": [f"{bench}-{j:05d}" for j in range(n)],
            "label": rng.integers(0, 10, n),
            "reference": reference,
            "pool": pool,
            # As the pipeline writes them: the reference set is part of every split, so a
            # gap-matched split's NN similarity equals the reference's on its benchmarks.
            "sketch": reference if bench == "sketch" else pool,
            "combined": reference,
            "sketch-random": np.maximum(pool - np.float32(0.01), reference),
        }
        (run / "gaps").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), run / "gaps" / f"{bench}.parquet")


def _write_splits(run: Path) -> None:
    for name, (policy, benches, size, control_of) in SPLITS.items():
        split = {
            "name": name,
            "policy": policy,
            "params": {"seed": 0} if policy == "random" else {},
            "benchmarks": benches,
            "size": size,
            "pool_size": POOL_SIZE,
            "reference_added": policy == "gapmatch",
            "control_of": control_of,
            "fingerprints": {},
        }
        if policy == "gapmatch":
            split["guarantee"] = {"holds": True, "tests": 1050, "violations": 0}
        _write_json(run / "splits" / name / "split.json", split)


def _write_evals(run: Path) -> None:
    for split, scores in TOP1.items():
        benchmarks = {
            b: {"top1": t, "top5": min(1.0, t + 0.2), "mean_per_class_recall": t, "n": 300}
            for b, t in scores.items()
        }
        _write_json(
            run / "eval" / f"{split}.json",
            {"split": split, "checkpoint": f"train/{split}/final.pt", "benchmarks": benchmarks},
        )


def _write_run_json(run: Path) -> None:
    _write_json(
        run / "run.json",
        {
            "config": {"seed": 0, "benchmarks": list(BENCHMARKS)},
            "versions": {"simgap": "0.1.0", "numpy": np.__version__},
            "timings": {"embed": 12.5, "scan": 3.25, "train": 80.0},
            "world": {"seed": 0, "scale": "tiny"},
        },
    )


def _make_full_run(run: Path) -> Path:
    _write_run_json(run)
    _write_gaps(run, np.random.default_rng(0))
    _write_splits(run)
    _write_evals(run)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A full synthetic run, built once for the read-only tests (figures take ~1 s a build)."""
    run = _make_full_run(tmp_path_factory.mktemp("report") / "run")
    return run, build_report(run)


def _images(html: str) -> list[Image.Image]:
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(s))) for s in sources]


def _rows(html: str, caption: str) -> list[list[str]]:
    """Body rows of the HTML table whose caption starts with `caption`."""
    [body] = re.findall(rf"<table><caption>{re.escape(caption)}.*?</table>", html)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]
    return [r for r in rows if r]


def _table(html: str, caption: str) -> dict[str, list[str]]:
    """The same rows keyed by their first cell."""
    return {r[0]: r[1:] for r in _rows(html, caption)}


def test_full_report_is_self_contained_with_figures_and_tables(built) -> None:
    full_run, paths = built
    assert paths == {
        "html": full_run / "report" / "report.html",
        "markdown": full_run / "report" / "report.md",
    }
    html = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r'(src|href)\s*=\s*"?(https?:)?//', html)
    assert "<script" not in html

    images = _images(html)
    assert len(images) == 3  # gaps, accuracy, removed counts
    for image in images:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 150
        assert np.asarray(image.convert("L"), dtype=float).std() > 0

    # Accuracy: 0.4321 is shown as 43.2; the control row and the difference are present.
    accuracy = _table(html, "Top-1")
    assert list(accuracy) == ["sketch", "sketch-random"]
    assert accuracy["sketch"] == ["gapmatch", "43.2", "30.1", "55.5", "42.9"]
    controls = _table(html, "Each split against")
    assert controls["control: sketch-random"] == ["41.0", "35.0", "50.0", "42.0"]
    mean_diff = ((0.4321 + 0.3012 + 0.555) - (0.41 + 0.35 + 0.5)) / 3
    assert controls["Δ sketch − control"] == ["+2.2", "-4.9", "+5.5", f"{100 * mean_diff:+.1f}"]
    assert "Not evaluated: combined." in html

    # Split sizes: kept, removed, fraction of pool, reference added, guarantee.
    sizes = _table(html, "Split sizes")
    assert list(sizes) == ["sketch", "sketch-random", "combined"]
    assert sizes["combined"][2:6] == ["8,400", "1,600", "84.0", "yes"]
    assert sizes["combined"][7] == "pass; tests=1050; violations=0"
    assert sizes["sketch-random"][6] == "sketch"

    # Gap check: the gap-matched splits leave no test point above the reference.
    checks = _rows(html, "Gap check")
    assert [r[:2] for r in checks] == [["sketch", "sketch"]] + [["combined", b] for b in BENCHMARKS]
    assert all(r[3] == "0" and r[4] == r[2] for r in checks)
    medians = _table(html, "Median NN similarity")
    assert list(medians) == ["reference", "pool", "sketch", "sketch-random", "combined"]

    # Provenance: timings total and config text.
    assert _table(html, "Stage timings")["total"] == ["95.8", "100.0"]
    assert "&quot;scale&quot;: &quot;tiny&quot;" in html


def test_markdown_references_existing_figures(built) -> None:
    md_path = built[1]["markdown"]
    md = md_path.read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == ["fig-accuracy.png", "fig-gaps.png", "fig-removed.png"]
    for ref in refs:
        assert Image.open(md_path.parent / ref).format == "PNG"
    assert "| sketch | gapmatch | 43.2 | 30.1 | 55.5 | 42.9 |" in md


def test_same_run_gives_same_bytes(built) -> None:
    report = built[0] / "report"
    first = {p.name: p.read_bytes() for p in sorted(report.iterdir())}
    build_report(built[0])
    second = {p.name: p.read_bytes() for p in sorted(report.iterdir())}
    assert first == second
    assert sorted(first) == [
        "fig-accuracy.png",
        "fig-gaps.png",
        "fig-removed.png",
        "report.html",
        "report.md",
    ]


def test_partial_run_builds_with_not_run_notes(built, tmp_path: Path) -> None:
    # A copy of the full run, report included, with evaluation and then selection taken away:
    # the rebuilt report says so and drops the figures those stages fed.
    run = shutil.copytree(built[0], tmp_path / "partial")
    shutil.rmtree(run / "eval")
    (run / "report" / "report.md").write_text("stale")
    html = build_report(run)["html"].read_text(encoding="utf-8")
    assert "Evaluation was not run" in html
    assert len(_images(html)) == 2
    report = sorted(p.name for p in (run / "report").iterdir())
    assert report == ["fig-gaps.png", "fig-removed.png", "report.html", "report.md"]
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "Evaluation was not run" in md
    text = summary_table(run)
    assert text.startswith("evaluation was not run")
    assert all(split in text for split in SPLITS)

    shutil.rmtree(run / "splits")
    html = build_report(run)["html"].read_text(encoding="utf-8")
    assert "Split selection was not run" in html
    assert len(_images(html)) == 1
    assert not (run / "report" / "fig-removed.png").exists()
    assert summary_table(run) == "no splits in this run"


def test_run_json_only(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    _write_json(run / "run.json", {"config": {}})
    html = build_report(run)["html"].read_text(encoding="utf-8")
    assert "Similarity gaps were not run" in html
    assert summary_table(run) == "no splits in this run"


def test_missing_run_json_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run.json"):
        build_report(tmp_path)


def test_summary_table_names_every_split(built) -> None:
    text = summary_table(built[0])
    for split in SPLITS:
        assert split in text
    assert "43.2" in text
    lines = text.splitlines()
    [delta] = [line for line in lines if "Δ" in line]
    assert delta.split()[-4:] == ["+2.2", "-4.9", "+5.5", "+0.9"]
    assert lines[-1] == "not evaluated: combined"
