"""What pruning removed (issue 14, section 3): kept against removed pool points by what they are."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgap.data.tarwrite import write_tar
from simgap.io import write_json
from simgap.report import build_report
from simgap.scan import ScanOptions, scan_store
from simgap.select.build import SelectConfig, select, split_rows
from simgap.select.composition import QUANTILES, composition, pick_removed, scan_scores
from simgap.store import write_store
from simgap.world import DOMAINS, WorldConfig, generate_world

MODEL = {"arch": "test", "pretrained": None, "checkpoint_sha256": None}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny world's pool, embedded so that each kind of pool sample lies near its own direction:
    a benchmark made of sketch-like test points then finds the sketch samples most similar."""
    root = tmp_path_factory.mktemp("comp")
    generate_world(WorldConfig(scale=0.05, shard_size=80), root / "world")
    truth = pq.read_table(root / "world" / "ground_truth" / "pool.parquet")
    kinds = truth.column("kind").to_pylist()
    names = sorted(set(kinds))
    rng = np.random.default_rng(0)
    axes = np.eye(len(names), 16, dtype=np.float32)
    emb = np.stack([axes[names.index(k)] for k in kinds]) + 0.35 * rng.standard_normal(
        (len(kinds), 16)
    ).astype(np.float32)
    pool = write_store(root / "pool", emb, truth.column("key").to_pylist(), MODEL, 64)
    tests = axes[names.index("sketch")] + 0.35 * rng.standard_normal((20, 16)).astype(np.float32)
    bench = write_store(root / "bench-sketch", tests, [f"t{i:03d}" for i in range(20)], MODEL)
    # The reference set: far from every pool point, so its similarities are the thresholds.
    ref = rng.standard_normal((30, 16)).astype(np.float32)
    ref_store = write_store(root / "reference", ref, [f"r{i:03d}" for i in range(30)], MODEL)
    tests_f = bench.embeddings()
    thr = scan_store(ref_store, tests_f, options=ScanOptions(topk=1)).topk_sim[:, 0].copy()
    scan_store(pool, tests_f, thr, ScanOptions(topk=2, out_dir=root / "scans" / "pool-sketch"))
    for name, policy, size in (("sketch", "gapmatch", None), ("near-0.5", "near", 0.5)):
        select(
            SelectConfig(
                policy,
                root / "pool",
                root / "splits" / name,
                benchmarks=(root / "bench-sketch",),
                scans=(root / "scans" / "pool-sketch",),
                reference=root / "reference",
                size=size,
                check=False,
            )
        )
    splits = {
        "sketch": ("gapmatch", ("sketch",), split_rows(pool, root / "splits" / "sketch")),
        "near-0.5": ("near", ("sketch",), split_rows(pool, root / "splits" / "near-0.5")),
        "full": ("full", (), np.ones(pool.rows, bool)),
    }
    out = composition(pool, splits, scan_scores(root / "scans" / "pool-sketch"), truth)
    return out, truth, splits


def test_counts_add_up_to_the_ground_truth(pruned):
    out, truth, splits = pruned
    kinds = np.array(truth.column("kind").to_pylist())
    noise = np.array(truth.column("caption").to_pylist())
    assert out["ground_truth"] and out["pool"] == len(kinds)
    assert set(out["groups"]["kind"]) == set(DOMAINS) | {"distractor", "near-duplicate"}
    assert out["groups"]["caption"] == ["clean", "distractor", "no-class", "wrong-class"]
    for name, (_, _, kept) in splits.items():
        entry = out["splits"][name]
        assert entry["kept"] == kept.sum() and entry["removed"] == (~kept).sum()
        for group, values in (("kind", kinds), ("caption", noise)):
            for category, (k, r) in entry["counts"][group].items():
                assert k == (kept & (values == category)).sum()
                assert r == (~kept & (values == category)).sum()
    assert out["splits"]["full"]["removed"] == 0 and out["splits"]["full"]["examples"] == []
    json.dumps(out)  # plain JSON data


def test_pruning_against_sketch_removes_sketch_samples_and_shows_them(pruned):
    out, _, _ = pruned
    for name in ("sketch", "near-0.5"):
        entry = out["splits"][name]
        share = {c: r / (k + r) for c, (k, r) in entry["counts"]["kind"].items()}
        assert entry["removed"] > 0 and share["sketch"] > 0.9
        assert max(share, key=share.get) == "sketch"
        examples = entry["examples"]
        assert [e["quantile"] for e in examples] == list(QUANTILES)[: len(examples)]
        scores = [e["score"] for e in examples]
        assert scores == sorted(scores, reverse=True)
        assert all(e["key"].startswith("p") and e["kind"] for e in examples)
    assert out["splits"]["sketch"]["score"] == "margin"
    assert all(e["score"] > 0 for e in out["splits"]["sketch"]["examples"])  # removed: above
    assert out["splits"]["near-0.5"]["score"] == "similarity"


def test_pick_removed_without_a_score_spreads_over_the_removed_rows():
    kept = np.array([True, False, False, True, False, False, False])
    assert pick_removed(kept, None) == [(1.0, 1), (0.75, 2), (0.5, 4), (0.25, 5), (0.0, 6)]
    score = np.array([0, 5, 1, 0, 1, 3, 2], np.float32)
    assert pick_removed(kept, score) == [(1.0, 1), (0.75, 5), (0.5, 6), (0.25, 2), (0.0, 4)]
    assert pick_removed(np.ones(3, bool), None) == []


def _report(run, comp):
    write_json(run / "run.json", {"config": {}, "world": None, "analysis": {}})
    write_json(run / "analysis" / "composition.json", comp)
    return build_report(run)["markdown"].read_text(encoding="utf-8")


def test_report_shows_the_composition_with_computed_sentences(pruned, tmp_path):
    out, _, _ = pruned
    control = {**out["splits"]["near-0.5"], "policy": "random", "benchmarks": []}
    md = _report(tmp_path / "run", {**out, "splits": {**out["splits"], "x-random": control}})
    section = md[md.index("What pruning removed") :]
    assert (tmp_path / "run" / "report" / "fig-composition.png").stat().st_size > 5000
    assert "fig-composition.png" in section
    counts = out["splits"]["sketch"]["counts"]["kind"]
    removed = sum(r for _, r in counts.values())
    share = 100 * counts["sketch"][1] / removed
    kept_share = 100 * counts["sketch"][0] / sum(k for k, _ in counts.values())
    assert (
        f"sketch removed {removed:,} of 200 pool points ({removed / 2:.1f}%): {share:.1f}% of "
        f"the removed are sketch samples against {kept_share:.1f}% of the kept;"
    ) in section
    assert "full removed" not in section  # removed nothing: not shown
    assert "| x-random |" in section and "x-random removed" not in section  # no kind chosen


def test_report_on_real_data_shows_removed_images_with_captions(tmp_path):
    tar = tmp_path / "pool" / "00000.tar"
    samples = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(buf, format="JPEG")
        samples.append((f"k{i}", {"jpg": buf.getvalue(), "txt": b"x"}))
    write_tar(tar, samples)
    examples = [
        {
            "key": f"k{i}",
            "source": str(tar),
            "caption": f"a photo number {i}",
            "quantile": q,
            "score": s,
        }
        for i, (q, s) in enumerate(((1.0, 0.2), (0.5, 0.1), (0.0, 0.01)))
    ]
    comp = {
        "pool": 10,
        "ground_truth": False,
        "splits": {
            "imagenet-sketch": {
                "policy": "gapmatch",
                "benchmarks": ["imagenet-sketch"],
                "score": "margin",
                "kept": 7,
                "removed": 3,
                "examples": examples,
            },
            "full": {
                "policy": "full",
                "benchmarks": [],
                "score": None,
                "kept": 10,
                "removed": 0,
                "examples": [],
            },
        },
    }
    md = _report(tmp_path / "run", comp)
    section = md[md.index("What pruning removed") :]
    assert (tmp_path / "run" / "report" / "fig-removed-imagenet-sketch.png").is_file()
    assert "a photo number 1" in section and "0.100" in section
    assert "not found again" not in section
    assert not (tmp_path / "run" / "report" / "fig-removed-full.png").exists()


def test_the_sentence_names_what_was_removed_what_was_kept_and_the_control():
    from simgap.report.composition import removed_sentence

    split = {
        "removed": 60,
        "counts": {
            "kind": {"photo": [36, 14], "sketch": [0, 40], "distractor": [4, 6]},
            "caption": {"clean": [38, 50], "no-class": [2, 10]},
        },
    }
    control = {"counts": {"kind": {"photo": [20, 30], "sketch": [16, 24], "distractor": [4, 6]}}}
    assert removed_sentence("combined", split, 100, ("combined-random", control)) == (
        "combined removed 60 of 100 pool points (60.0%): 66.7% of the removed are sketch samples "
        "against 0.0% of the kept; 90.0% of the kept are photo samples against 23.3% of the "
        "removed; 16.7% of the removed have a no-class caption against 5.0% of the kept. "
        "Its size-matched control combined-random keeps 50.0% photo samples."
    )


def test_without_ground_truth_only_counts_and_examples(pruned, tmp_path):
    """Real data: no ground truth, so no per-kind counts; the removed examples still come."""
    out, truth, splits = pruned
    pool = write_store(
        tmp_path / "pool",
        np.eye(1, 16, dtype=np.float32).repeat(truth.num_rows, 0),
        truth.column("key").to_pylist(),
        MODEL,
    )
    real = composition(
        pool, {"sketch": splits["sketch"]}, lambda kind, b: np.arange(pool.rows), None
    )
    entry = real["splits"]["sketch"]
    assert not real["ground_truth"] and "groups" not in real and "counts" not in entry
    assert entry["removed"] == out["splits"]["sketch"]["removed"]
    removed_rows = np.flatnonzero(~splits["sketch"][2])
    assert entry["examples"][0]["score"] == removed_rows.max()  # the highest score first
    assert "kind" not in entry["examples"][0]
