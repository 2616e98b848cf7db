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
from report_run import (
    AUDIT,
    BENCHMARKS,
    CONFIG,
    CONFIG_TEXT,
    SPLITS,
    TOP1,
    make_run,
    robustness_doc,
    write_json,
)

from simgap.experiment import make_plan
from simgap.parallel import Executor, LocalEngine
from simgap.report import build_report, summary_table
from simgap.report.blocks import FigureBlock, Note, Table
from simgap.report.gallery import gallery_section, pick_tests
from simgap.report.runfiles import load_run
from simgap.store import open_store


def test_the_test_runs_config_is_one_the_current_parser_plans(tmp_path) -> None:
    """The synthetic run's config text is in today's schema and makes the run's splits and
    trainings (report_run parses it with simgap.experiment.config at import; this plans it)."""
    plan = make_plan(CONFIG, tmp_path, lambda _: None, Executor(LocalEngine(1)))
    assert set(SPLITS) <= {s.name for s in plan.splits}
    assert plan.trained == list(TOP1) and plan.benchmarks == list(BENCHMARKS)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A full synthetic run, built once for the read-only tests (figures take ~1 s a build)."""
    run = make_run(tmp_path_factory.mktemp("report") / "run")
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


FIGURES = [
    "fig-accuracy-similarity.png",
    "fig-accuracy.png",
    "fig-composition.png",
    *(f"fig-gallery-{b}.png" for b in sorted(BENCHMARKS)),
    "fig-gaps.png",
    "fig-removed.png",
    "fig-robustness.png",
    "fig-size-curves.png",
]
EVALUATED = ["full", "sketch", "sketch-random"] + [
    f"{p}-{f}" for p in ("near", "far", "random") for f in (0.25, 0.5)
]


def test_full_report_is_self_contained_with_figures_and_tables(built) -> None:
    full_run, paths = built
    assert paths == {
        "html": full_run / "report" / "report.html",
        "markdown": full_run / "report" / "report.md",
        "findings": full_run / "report" / "findings.json",
    }
    html = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r'(src|href)\s*=\s*"?(https?:)?//', html)
    assert "<script" not in html
    assert "not computed in this run" not in html

    images = _images(html)
    assert len(images) == len(FIGURES)
    for image in images:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 150
        assert np.asarray(image.convert("L"), dtype=float).std() > 0

    # Accuracy: the predictions' top-1 (0.4321 of 300 photo points: 130, 43.3%) with its
    # interval; the control row and the paired difference are present.
    stats = json.loads((full_run / "analysis" / "statistics.json").read_text())
    accuracy = _table(html, "Zero-shot top-1")
    assert list(accuracy) == EVALUATED
    assert accuracy["sketch"][0] == "gapmatch"
    assert accuracy["sketch"][1].startswith("43.3 [")
    for cell, b in zip(accuracy["sketch"][1:], [*BENCHMARKS, "mean-ood"], strict=True):
        iv = stats["top1"]["sketch"][b]
        assert iv["lo"] < iv["mean"] < iv["hi"]
        assert cell == f"{100 * iv['mean']:.1f} [{100 * iv['lo']:.1f}, {100 * iv['hi']:.1f}]"
    controls = _table(html, "Each split against")
    assert controls["control: sketch-random"][0].startswith("41.0 [")
    delta = stats["differences"]["sketch - sketch-random"]
    # Whole test points: top-1 x n rounded, as tests/report_run.py writes the predictions.
    ns = {"photo": 300, "sketch": 350, "rendition": 400}
    expected = {
        b: (round(TOP1["sketch"][b] * n) - round(TOP1["sketch-random"][b] * n)) / n
        for b, n in ns.items()
    }
    expected["mean-ood"] = (expected["sketch"] + expected["rendition"]) / 2
    assert {b: d["mean"] for b, d in delta.items()} == pytest.approx(expected)
    mark = "*" if delta["mean-ood"]["resolved"] else ""
    assert controls["Δ sketch − control"][3].endswith("]" + mark)
    verdicts = _table(html, "Paired differences of mean OOD")
    assert verdicts["sketch − sketch-random"][1] == (
        "resolved" if delta["mean-ood"]["resolved"] else "not resolved"
    )
    assert "Not evaluated: combined." in html

    # Similarity structure: medians and the per-test gap from the gap files, largest first in
    # the computed sentence; the similarity model's k-NN class separation.
    structure = _table(html, "NN similarity of each benchmark")
    gaps = {b: pq.read_table(full_run / "gaps" / f"{b}.parquet").to_pydict() for b in BENCHMARKS}
    for b in BENCHMARKS:
        ref, pool = np.array(gaps[b]["reference"]), np.array(gaps[b]["pool"])
        assert structure[b][1:4] == [
            f"{np.median(ref):.3f}",
            f"{np.median(pool):.3f}",
            f"{np.median(pool - ref):+.3f}",
        ]
        assert structure[b][4] == f"{100 * np.mean(pool > ref):.1f}"
    order = sorted(
        BENCHMARKS, key=lambda b: -np.median(np.subtract(gaps[b]["pool"], gaps[b]["reference"]))
    )
    assert f"The pool is most ahead of the reference set on {order[0]}" in html
    assert "k-NN top-1 is 62.0 [56.5, 67.3]% against 10.0% chance (6.2× chance)" in html

    # Split sizes: kept, removed, fraction of pool, reference added, guarantee.
    sizes = _table(html, "Split sizes")
    assert set(sizes) == set(SPLITS)
    assert list(sizes)[:4] == ["full", "sketch", "sketch-random", "combined"]
    assert sizes["combined"][2:6] == ["8,400", "1,600", "84.0", "yes"]
    assert sizes["combined"][7] == "pass; tests=1050; violations=0"
    assert sizes["sketch-random"][6] == "sketch"

    # Gap check: the gap-matched splits leave no test point above the reference.
    checks = _rows(html, "Gap check")
    assert [r[:2] for r in checks] == [["sketch", "sketch"]] + [["combined", b] for b in BENCHMARKS]
    assert all(r[3] == "0" and r[4] == r[2] for r in checks)
    medians = _table(html, "Median NN similarity")
    assert list(medians) == ["reference", "pool", "sketch", "sketch-random", "combined"]

    # Near / far / random: fraction and size per split, smallest first within a policy.
    curves = _table(html, "Near / far / random")
    assert list(curves) == EVALUATED[3:]
    assert curves["far-0.25"][:3] == ["far", "0.25", "2,500"]
    assert [c.split(" [")[0] for c in curves["far-0.25"][3:]] == ["20.0", "14.9", "25.0", "19.9"]
    # Each near / far split against random at its fraction, paired, with a computed verdict.
    d = stats["differences"]["far-0.25 - random-0.25"]["mean-ood"]
    side = "above" if d["mean"] >= 0 else "below"
    verdict = "resolved" if d["resolved"] else "not resolved"
    assert (
        f"far-0.25 is {abs(100 * d['mean']):.1f} points {side} random-0.25 "
        f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}], {verdict}" in html
    )
    assert "Near-pruning removes the pool points most similar" in html

    # Effective robustness: the points as given, in percentage points.
    robust = _table(html, "Effective robustness")
    doc = robustness_doc()
    assert list(robust) == [p["split"] for p in doc["points"]]
    far = next(p for p in doc["points"] if p["split"] == "far-0.5")
    assert robust["far-0.5"][2] == f"{100 * far['effective_robustness']:+.1f}"
    assert robust["full"][3] == "yes" and robust["far-0.5"][3] == "no"

    # Accuracy against NN similarity: least vs most similar bin per split and benchmark.
    bins = _rows(html, "Top-1 (%) in the least")
    assert {(r[0], r[1]) for r in bins} == {(b, s) for b in BENCHMARKS for s in ("full", "sketch")}
    assert all(r[2] == "5" for r in bins)

    # Audit: counts per benchmark, ground truth, most similar pairs first.
    audit = _table(html, "Contaminated test points")
    assert audit["photo"] == ["300", "12", "4.00"]
    assert audit["rendition"] == ["400", "3", "0.75"]
    assert _rows(html, "Audit against")[0] == ["0.938", "1.000", "15", "1", "0"]
    pairs = _rows(html, "The 10 most similar of 15")
    assert pairs[0] == ["rendition", "rendition-00002", "p0000014", "0.999"]
    assert AUDIT["threshold"] == 0.95 and "similarity &gt; 0.95" in html

    # Provenance: timings total, the config file as given and the resolved config.
    assert _table(html, "Stage timings")["total"] == ["95.8", "100.0"]
    assert "[splits.near]" in html and CONFIG_TEXT.splitlines()[0] in html
    assert "&quot;scale&quot;: &quot;tiny&quot;" in html


def test_gallery_shows_the_brute_force_nearest_neighbours(built) -> None:
    # The gallery's nearest reference and pool images, recomputed from the stores' embeddings.
    run, paths = built
    html = paths["html"].read_text(encoding="utf-8")
    gallery = _rows(html, "Gallery test images")
    assert [r[0] for r in gallery] == [b for b in BENCHMARKS for _ in range(3)]
    reference, pool = (open_store(run / "stores" / n) for n in ("reference", "pool"))
    for bench in BENCHMARKS:
        tests = open_store(run / "stores" / f"bench-{bench}")
        t = tests.embeddings().astype(np.float32)
        sims = {
            name: t @ store.embeddings().astype(np.float32).T
            for name, store in (("reference", reference), ("pool", pool))
        }
        keys = {"reference": reference.keys(), "pool": pool.keys()}
        pool_nn = sims["pool"].max(axis=1)
        rows = [r for r in gallery if r[0] == bench]
        assert [r[1] for r in rows] == ["highest", "median", "lowest"]
        assert rows[0][2] == tests.keys()[int(np.argmax(pool_nn))]
        assert rows[2][2] == tests.keys()[int(np.argmin(pool_nn))]
        for row in rows:
            i = tests.keys().index(row[2])
            for name, col in (("reference", 3), ("pool", 5)):
                assert row[col] == keys[name][int(np.argmax(sims[name][i]))]
                assert float(row[col + 1]) == pytest.approx(sims[name][i].max(), abs=1e-3)
    # Every gallery thumbnail was found again: no "could not be found" note.
    assert "could not be found again" not in html


def test_pick_tests_is_highest_median_lowest() -> None:
    assert pick_tests(np.array([0.5, 0.9, 0.1, 0.7, 0.3])) == [
        ("highest", 1),
        ("median", 0),
        ("lowest", 2),
    ]
    assert pick_tests(np.array([0.4])) == [("highest", 0)]
    assert pick_tests(np.array([0.2, 0.2])) == [("highest", 0), ("median", 1)]


def test_markdown_references_existing_figures(built) -> None:
    md_path = built[1]["markdown"]
    md = md_path.read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == FIGURES
    for ref in refs:
        assert Image.open(md_path.parent / ref).format == "PNG"
    assert re.search(r"\| sketch \| gapmatch \| 43\.3 \[\d+\.\d, \d+\.\d\] \| 30\.0 \[", md)
    assert "```text\n" + CONFIG_TEXT in md


def test_same_run_gives_same_bytes(built) -> None:
    report = built[0] / "report"
    first = {p.name: p.read_bytes() for p in sorted(report.iterdir())}
    build_report(built[0])
    second = {p.name: p.read_bytes() for p in sorted(report.iterdir())}
    assert first == second
    assert sorted(first) == [*FIGURES, "findings.json", "report.html", "report.md"]


def test_partial_run_says_what_was_not_computed(built, tmp_path: Path) -> None:
    # A copy of the full run, report included, losing one stage's files after another: the
    # rebuilt report says which part was not computed and drops the figures those files fed.
    run = shutil.copytree(built[0], tmp_path / "partial")
    (run / "report" / "report.md").write_text("stale")
    shutil.rmtree(run / "analysis")
    shutil.rmtree(run / "audit")
    shutil.rmtree(run / "stores" / "bench-sketch")  # its gallery's test images
    shutil.rmtree(run / "eval")
    html = build_report(run)["html"].read_text(encoding="utf-8")
    for part in (
        "Findings",
        "Accuracy against NN similarity",
        "Effective robustness",
        "Contamination audit",
    ):
        assert f"{part}: not computed in this run" in html
    assert "Galleries not computed in this run for: sketch." in html
    report = sorted(p.name for p in (run / "report").iterdir())
    assert report == [
        "fig-gallery-photo.png",
        "fig-gallery-rendition.png",
        "fig-gaps.png",
        "fig-removed.png",
        "report.html",
        "report.md",
    ]
    assert "Evaluation: not computed in this run" in html
    assert "Evaluation of these splits: not computed in this run." in html
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "Evaluation: not computed in this run" in md
    text = summary_table(run)
    assert text.startswith("evaluation was not run")
    assert all(split in text for split in SPLITS)

    shutil.rmtree(run / "splits")
    shutil.rmtree(run / "scans")
    html = build_report(run)["html"].read_text(encoding="utf-8")
    assert "Split selection: not computed in this run" in html
    assert "Near / far / random splits: not computed in this run" in html
    assert "Nearest-neighbour galleries: not computed in this run" in html
    assert len(_images(html)) == 1
    assert sorted(p.name for p in (run / "report").iterdir()) == [
        "fig-gaps.png",
        "report.html",
        "report.md",
    ]
    assert summary_table(run) == "no splits in this run"


def test_gallery_images_lost_are_counted_not_fatal(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    for tar in (run / "images").glob("pool-*.tar"):
        tar.unlink()
    section = gallery_section(load_run(run))
    # 3 benchmarks x 3 test images x 3 pool neighbours, some shared: all lost, all counted;
    # the test and reference images are still found, and every gallery is drawn.
    pool_keys = {r[5] for r in next(b for b in section.blocks if isinstance(b, Table)).rows}
    [note] = [b.text for b in section.blocks if isinstance(b, Note)]
    lost, total, reasons = re.fullmatch(
        r"(\d+) of (\d+) gallery images could not be found again \(([^)]*)\)\.", note
    ).groups()
    assert reasons == f"source_unreadable: {lost}"
    assert len(pool_keys) <= int(lost) < int(total)
    assert sum(isinstance(b, FigureBlock) for b in section.blocks) == len(BENCHMARKS)


def test_run_json_only(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    why = {"computed": False, "why": "needs two trained splits and an OOD benchmark"}
    write_json(
        run / "run.json",
        {"config": {}, "world": None, "analysis": {"audit": None, "analysis-robustness": why}},
    )
    html = build_report(run)["html"].read_text(encoding="utf-8")
    assert (
        html.count("not computed in this run") == 12
    )  # composition, Findings, structure, separation
    assert (
        "Effective robustness: not computed in this run (no analysis/robustness.json; the run "
        "says: needs two trained splits and an OOD benchmark)." in html
    )
    assert "Contamination audit: not computed in this run (no audit/audit.json)." in html
    assert "<h3>World</h3>" not in html
    assert "No stage timings recorded" in html
    assert summary_table(run) == "no splits in this run"


def test_missing_run_json_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run.json"):
        build_report(tmp_path)


@pytest.mark.parametrize(
    ("path", "content", "message"),
    [
        ("analysis/robustness.json", {"points": []}, "robustness.json: 'line' must hold"),
        (
            "analysis/robustness.json",
            {"line": {"slope": 1, "intercept": 0}, "points": [{"split": "a"}]},
            r"points\[0\] lacks \['id_acc', 'ood_acc'\]",
        ),
        ("audit/audit.json", {"threshold": 0.9}, "audit.json: 'benchmarks' must map"),
        ("audit/audit.json", {"benchmarks": {"photo": {"tests": 3}}}, "benchmarks.photo lacks"),
    ],
)
def test_malformed_analysis_files_name_the_file(
    tmp_path: Path, path: str, content: dict, message: str
) -> None:
    write_json(tmp_path / "run.json", {"config": {}})
    write_json(tmp_path / path, content)
    with pytest.raises(ValueError, match=message):
        build_report(tmp_path)


def test_accuracy_by_similarity_needs_its_columns(tmp_path: Path) -> None:
    write_json(tmp_path / "run.json", {"config": {}})
    (tmp_path / "analysis").mkdir()
    pq.write_table(
        pa.table({"split": ["a"]}), tmp_path / "analysis" / "accuracy_by_similarity.parquet"
    )
    with pytest.raises(ValueError, match=r"accuracy_by_similarity.parquet: missing columns"):
        build_report(tmp_path)


def test_summary_table_names_every_split(built) -> None:
    text = summary_table(built[0])
    for split in SPLITS:
        assert split in text
    assert "43.3" in text  # 130 of 300 photo test points
    lines = text.splitlines()
    [delta] = [line for line in lines if "Δ" in line]
    # Per benchmark the paired difference's mean, then the mean OOD with its interval.
    stats = json.loads((built[0] / "analysis" / "statistics.json").read_text())
    d = stats["differences"]["sketch - sketch-random"]
    cells = [f"{100 * d[b]['mean']:+.1f}" + ("*" if d[b]["resolved"] else "") for b in BENCHMARKS]
    ood = d["mean-ood"]
    cells.append(f"{100 * ood['mean']:+.1f} [{100 * ood['lo']:+.1f}, {100 * ood['hi']:+.1f}]")
    assert delta.split()[-6:-3] == cells[:-1] and delta.endswith("  " + cells[-1])
    assert "not evaluated: combined" in lines
    # The findings' computed sentences follow the table.
    assert lines[-1] == "2. " + stats["claims"][1]["text"]


def test_similarity_structure_sentence_follows_the_sign_of_the_gap() -> None:
    from simgap.report.structure import _ranking

    rows = [
        {"benchmark": "photo", "gap": 0.01, "closer_to_pool": 0.55},
        {"benchmark": "sketch", "gap": 0.12, "closer_to_pool": 0.93},
    ]
    text = _ranking(rows)
    assert "largest first: sketch (+0.120), photo (+0.010)." in text
    assert "most ahead of the reference set on sketch, where 93% of test points" in text
    behind = [{**r, "gap": -r["gap"]} for r in rows]
    assert _ranking(behind).endswith("more similar than the reference set on no benchmark.")


def test_report_command_ends_with_its_summary(built, capsys) -> None:
    from simgap.cli import main

    run = built[0]
    assert main(["report", str(run)]) == 0
    figures = sorted((run / "report").glob("fig-*.png"))
    last = capsys.readouterr().out.splitlines()[-1]
    assert figures and last == (
        f"report: {len(figures)} figures -> {run / 'report' / 'report.html'} (and report.md)"
    )
