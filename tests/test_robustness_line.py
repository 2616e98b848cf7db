"""Effective robustness against the reference line (analysis.robustness_analysis): per OOD
benchmark, with intervals, through reference-only models or published points (points.csv);
and the similarity model's k-NN class separation against a brute force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simgap.analysis import Sampling, read_reference_points, robustness_analysis
from simgap.experiment import config
from simgap.robustness import effective_robustness, fit_line
from simgap.separation import knn_predict
from simgap.store import StoreWriter, open_store

BENCHES = ["photo", "sketch", "rendition"]
N = 400
# Reference-only models at three budgets, and two splits (two seeds each).
LINE = {
    "reference-e1-s0": {"photo": 0.30, "sketch": 0.10, "rendition": 0.12},
    "reference-e2-s0": {"photo": 0.45, "sketch": 0.17, "rendition": 0.20},
    "reference-e4-s0": {"photo": 0.60, "sketch": 0.26, "rendition": 0.31},
}
SPLITS = {
    "full": [
        {"photo": 0.55, "sketch": 0.40, "rendition": 0.42},
        {"photo": 0.57, "sketch": 0.38, "rendition": 0.40},
    ],
    "combined": [
        {"photo": 0.50, "sketch": 0.22, "rendition": 0.27},
        {"photo": 0.52, "sketch": 0.24, "rendition": 0.25},
    ],
}


def _predictions(folder: Path, model: str, accs: dict[str, float]) -> None:
    for bench, acc in accs.items():
        labels = np.arange(N) % 10
        hit = np.zeros(N, bool)
        hit[np.random.default_rng(len(model)).permutation(N)[: round(acc * N)]] = True
        path = folder / "predictions" / f"{model}-{bench}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {
            "key": [f"{bench}-{i:05d}" for i in range(N)],
            "label": labels,
            "pred": np.where(hit, labels, (labels + 1) % 10),
        }
        pq.write_table(pa.table(table), path)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    for name, accs in LINE.items():
        _predictions(tmp_path / "eval" / "reference-line", name, accs)
    for split, seeds in SPLITS.items():
        for k, accs in enumerate(seeds):
            _predictions(tmp_path / "eval", split if k == 0 else f"{split}@s{k}", accs)
    return tmp_path


# ID benchmark photo, two seeds per split, 400 bootstrap replicates, seed 0.
SAMPLING = Sampling(id_benchmark="photo", seeds=2, bootstrap=400, seed=0)


def test_effective_robustness_per_benchmark_against_the_reference_only_line(run):
    result = robustness_analysis(run, SAMPLING, list(SPLITS), BENCHES, list(LINE))
    assert result == {"computed": True, "reference_models": 3}
    doc = json.loads((run / "analysis" / "robustness.json").read_text())
    assert doc["line"]["reference_models"] == list(LINE) and doc["reference_models"] == 3
    ids = np.array([m["photo"] for m in LINE.values()])
    for bench in ("sketch", "rendition"):
        line = fit_line(ids, np.array([m[bench] for m in LINE.values()]))
        assert doc["lines"][bench]["slope"] == pytest.approx(line.slope)
        for split, seeds in SPLITS.items():
            id_acc = np.mean([s["photo"] for s in seeds])
            ood = np.mean([s[bench] for s in seeds])
            er = doc["effective_robustness"][split][bench]
            assert er["mean"] == pytest.approx(effective_robustness(line, id_acc, ood), abs=1e-9)
            assert er["lo"] < er["mean"] < er["hi"]
    # The full pool is far above the line on every shift (resolved); combined sits near it.
    for bench in ("sketch", "rendition", "mean-ood"):
        assert doc["effective_robustness"]["full"][bench]["lo"] > 0.05
        assert doc["effective_robustness"]["combined"][bench]["lo"] < 0.03
    refs = [p for p in doc["points"] if p["reference"]]
    assert [p["split"] for p in refs] == list(LINE)
    assert all(p["id_ci"][0] <= p["id_acc"] <= p["id_ci"][1] for p in doc["points"])


def test_published_points_give_the_same_line_held_fixed(run, tmp_path_factory):
    csv = tmp_path_factory.mktemp("points") / "points.csv"
    lines = ["model,photo,sketch,rendition"] + [
        f"{m},{100 * a['photo']:g},{100 * a['sketch']:g},{100 * a['rendition']:g}"
        for m, a in LINE.items()
    ]
    csv.write_text("\n".join(lines) + "\n")  # percent: read as fractions
    shutil.rmtree(run / "eval" / "reference-line")
    robustness_analysis(run, SAMPLING, list(SPLITS), BENCHES, [], reference_points=csv)
    doc = json.loads((run / "analysis" / "robustness.json").read_text())
    assert doc["line"]["source"] == str(csv) and doc["reference_models"] == 3
    ids = np.array([m["photo"] for m in LINE.values()])
    line = fit_line(ids, np.array([m["sketch"] for m in LINE.values()]))
    assert doc["lines"]["sketch"]["slope"] == pytest.approx(line.slope)
    # Fixed points: the interval is the split's sampling alone, narrower than with a
    # resampled line.
    full = doc["effective_robustness"]["full"]["sketch"]
    assert full["lo"] < full["mean"] < full["hi"]


def test_reference_points_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "points.csv"
    bad.write_text("model,photo,sketch\nresnet50,76.1,24.1\n")
    with pytest.raises(ValueError, match=r"missing columns \['rendition'\]"):
        read_reference_points(bad, "photo", ["sketch", "rendition"])
    bad.write_text("model,photo,sketch\nresnet50,76.1,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        read_reference_points(bad, "photo", ["sketch"])
    with pytest.raises(ValueError, match="no such file"):
        read_reference_points(tmp_path / "absent.csv", "photo", ["sketch"])
    shipped = Path(__file__).resolve().parent.parent / "docs" / "reference-points.example.csv"
    points = read_reference_points(
        shipped,
        "imagenet-val",
        ["imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet"],
    )
    assert len(points) >= 5 and all(0 < v < 1 for p in points.values() for v in p.values())


def _store(path: Path, emb: np.ndarray, sources: list[str], shards: int = 2) -> None:
    writer = StoreWriter(path, {"arch": "test"}, emb.shape[1], {"kind": "files"})
    records = []
    for i, rows in enumerate(np.array_split(np.arange(len(emb)), shards)):
        table = pa.table(
            {
                "key": [f"k{j:05d}" for j in rows],
                "label": [0] * len(rows),
                "source": [sources[j] for j in rows],
            }
        )
        records.append(writer.write_shard(f"{i:05d}", emb[rows].astype(np.float16), table))
    writer.finish(records)


def test_knn_prediction_equals_a_brute_force_vote(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8))
    labels = rng.integers(0, 4, 300)
    emb = centers[labels] + 0.8 * rng.standard_normal((300, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    classes = ["a", "b", "c", "d"]
    _store(tmp_path / "ref", emb, [f"/x/{classes[c]}/{i}.jpg" for i, c in enumerate(labels)])
    tests = centers[rng.integers(0, 4, 50)] + 0.8 * rng.standard_normal((50, 8))
    tests = (tests / np.linalg.norm(tests, axis=1, keepdims=True)).astype(np.float16)
    got = knn_predict(open_store(tmp_path / "ref"), labels, tests, k=7, chunk=64)
    ref = emb.astype(np.float16).astype(np.float32)
    sims = tests.astype(np.float32) @ ref.T
    for i in range(50):
        nearest = labels[np.argsort(-sims[i], kind="stable")[:7]]
        counts = np.bincount(nearest, minlength=4)
        tied = set(np.flatnonzero(counts == counts.max()))
        assert got[i] == next(c for c in nearest if c in tied)
    assert (got == labels[np.argmax(sims, axis=1)]).mean() > 0.5  # the clusters separate


def test_a_missing_points_file_stops_the_run_before_anything_runs(tmp_path):
    from simgap.experiment import run_config

    cfg = config.override(config.load("demo"), {"analysis.reference_points": "absent.csv"})
    with pytest.raises(FileNotFoundError, match="analysis.reference_points: .*absent.csv"):
        run_config(cfg, tmp_path / "run", lambda m: None)
    assert not (tmp_path / "run").exists()
