"""The built-in world: reproducible bytes, readable formats, planted ground truth."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageFilter

from simgap.world import (
    BENCHMARKS,
    CLASSNAMES,
    DOMAINS,
    WorldConfig,
    generate_world,
    pool_ground_truth,
    render_image,
)

SMALL = WorldConfig(seed=0, scale=0.05, shard_size=80)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _signature(path: Path | bytes) -> np.ndarray:
    """Blurred, mean-free, unit-norm pixels: the dot product of two is their normalised
    cross-correlation, which a small shift or a brightness change barely moves (pixel MSE of thin
    sketch lines would)."""
    img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path).convert("RGB")
    x = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64).ravel()
    x = x - x.mean()
    return x / np.linalg.norm(x)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    messages: list[str] = []
    info = generate_world(SMALL, out, progress=messages.append)
    assert messages, "progress was never called"
    return out, info


def test_layout_and_counts(world: tuple[Path, dict]) -> None:
    root, info = world
    assert json.loads((root / "world.json").read_text()) == info
    names = (root / "classnames.txt").read_text().splitlines()
    assert names == list(CLASSNAMES[: SMALL.n_classes]) == info["classnames"]
    templates = (root / "templates.txt").read_text().splitlines()
    assert len(templates) >= 8 and all("{c}" in t for t in templates)

    ref = sorted((root / "reference").rglob("*.jpg"))
    assert len(ref) == info["counts"]["reference"] == 3 * SMALL.n_classes  # round(60 * 0.05)
    assert {p.parent.name for p in ref} == set(names)

    n_pool = info["counts"]["pool"]
    assert n_pool == 200 and info["counts"]["pool_shards"] == 3
    assert sorted(p.name for p in (root / "pool").iterdir()) == [
        f"{i:05d}.{ext}" for i in range(3) for ext in ("parquet", "tar")
    ]
    assert set(info["benchmarks"]) == set(BENCHMARKS) == set(DOMAINS)


def test_keys_unique_and_dot_free(world: tuple[Path, dict]) -> None:
    root, _ = world
    keys = [p.stem for p in (root / "reference").rglob("*.jpg")]
    keys += [p.stem for p in (root / "benchmarks").rglob("*.jpg")]
    keys += [
        k
        for p in sorted((root / "pool").glob("*.parquet"))
        for k in pq.read_table(p)["key"].to_pylist()
    ]
    assert len(keys) == len(set(keys))
    assert not any("." in k for k in keys)


def test_benchmark_class_subsets(world: tuple[Path, dict]) -> None:
    root, info = world
    names = info["classnames"]
    subsets = {}
    for bench in BENCHMARKS:
        folder = root / "benchmarks" / bench
        listed = (folder / "classnames.txt").read_text().splitlines()
        assert listed == sorted(listed, key=names.index), "subset not in global class order"
        assert listed == info["benchmarks"][bench]["classnames"]
        on_disk = {p.name for p in folder.iterdir() if p.is_dir()}
        assert on_disk == set(listed)
        for cls in listed:
            files = list((folder / cls).glob("*.jpg"))
            assert len(files) == info["benchmarks"][bench]["per_class"]
            assert all(f.stem.startswith(f"{bench}-") for f in files)
        subsets[bench] = listed
    assert len(subsets["rendition"]) == 7 and len(subsets["hard"]) == 7
    assert len(subsets["pose"]) == 8
    assert subsets["rendition"] != subsets["hard"]
    for full in ("photo", "photo-v2", "sketch"):
        assert subsets[full] == names


def test_images_decode_rgb_at_size(world: tuple[Path, dict]) -> None:
    root, _ = world
    for path in sorted(root.rglob("*.jpg"))[::7]:
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (SMALL.image_size, SMALL.image_size)


def test_pool_readable_by_webdataset(world: tuple[Path, dict]) -> None:
    root, _ = world
    for shard in sorted((root / "pool").glob("*.tar")):
        table = pq.read_table(shard.with_suffix(".parquet"))
        assert table.column_names == ["key", "caption", "domain", "label", "status"]
        rows = {r["key"]: r for r in table.to_pylist()}
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        assert [s["__key__"] for s in samples] == list(rows)
        for s in samples:
            assert {"jpg", "txt", "json"} <= set(s)
            meta = json.loads(s["json"])
            row = rows[s["__key__"]]
            assert s["txt"].decode("utf-8") == row["caption"] == meta["caption"]
            assert meta["key"] == row["key"] and meta["label"] == row["label"]
            assert meta["domain"] == row["domain"] and row["status"] == "success"
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])


def test_pool_mix_and_captions(world: tuple[Path, dict]) -> None:
    root, info = world
    rows = [
        r for p in sorted((root / "pool").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    domains = {r["domain"] for r in rows}
    assert set(DOMAINS) | {"distractor"} == domains
    assert all(r["label"] == -1 for r in rows if r["domain"] == "distractor")
    assert all(r["label"] >= 0 for r in rows if r["domain"] != "distractor")
    names = info["classnames"]
    own_word = sum(names[r["label"]] in r["caption"] for r in rows if r["label"] >= 0)
    assert 0.6 < own_word / sum(r["label"] >= 0 for r in rows) < 0.95  # noisy, not useless


def test_pool_ground_truth_says_what_each_pool_sample_is(world: tuple[Path, dict]) -> None:
    """ground_truth/pool.parquet: kind, domain, label and caption noise of every pool sample,
    the same as the samples written (what pruning removed is counted against it)."""
    root, info = world
    truth = pq.read_table(root / "ground_truth" / "pool.parquet").to_pylist()
    rows = [
        r for p in sorted((root / "pool").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    assert [t["key"] for t in truth] == [r["key"] for r in rows]
    assert all(
        (t["domain"], t["label"]) == (r["domain"], r["label"])
        for t, r in zip(truth, rows, strict=True)
    )
    near = pq.read_table(root / "ground_truth" / "near_duplicates.parquet").to_pylist()
    copies = {t["key"]: t["copy"] for t in truth if t["kind"] == "near-duplicate"}
    assert copies == {n["pool_key"]: n["test_key"] for n in near} and copies
    assert {t["kind"] for t in truth} == set(DOMAINS) | {"distractor", "near-duplicate"}
    names = info["classnames"]
    by_noise: dict[str, list[tuple[str, str]]] = {}
    for t, r in zip(truth, rows, strict=True):
        words = {n for n in names if n in r["caption"].lower()}
        by_noise.setdefault(t["caption"], []).append((names[t["label"]], words))
    assert set(by_noise) == {"clean", "no-class", "wrong-class", "distractor"}
    assert all(own in words for own, words in by_noise["clean"])
    assert all(not words for _, words in by_noise["no-class"] + by_noise["distractor"])
    assert all(words and own not in words for own, words in by_noise["wrong-class"])
    # Deterministic, and written into a world made before the file existed.
    assert pool_ground_truth(SMALL).equals(pq.read_table(root / "ground_truth" / "pool.parquet"))
    before = (root / "ground_truth" / "pool.parquet").read_bytes()
    (root / "ground_truth" / "pool.parquet").unlink()
    generate_world(SMALL, root)
    assert (root / "ground_truth" / "pool.parquet").read_bytes() == before


def test_tar_members_are_reproducible_metadata(world: tuple[Path, dict]) -> None:
    root, _ = world
    with tarfile.open(root / "pool" / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
    assert all(m.uname == "" and m.gname == "" for m in members)


def test_near_duplicates_are_similar(world: tuple[Path, dict]) -> None:
    root, info = world
    truth = pq.read_table(root / "ground_truth" / "near_duplicates.parquet").to_pylist()
    assert len(truth) == info["counts"]["near_duplicates"] == 4  # 2% of 200
    pool = {}
    for shard in sorted((root / "pool").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    pool[m.name[:-4]] = tar.extractfile(m).read()
    tests = {p.stem: p for p in (root / "benchmarks").rglob("*.jpg")}
    rng = np.random.default_rng(0)
    for row in truth:
        assert row["test_key"].startswith(row["benchmark"] + "-")
        dup = _signature(pool[row["pool_key"]])
        same = float(dup @ _signature(tests[row["test_key"]]))
        others = rng.choice(sorted(set(tests) - {row["test_key"]}), 20, replace=False)
        best_other = max(float(dup @ _signature(tests[k])) for k in others)
        assert same > 0.75 and same > best_other, (row, same, best_other)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, world: tuple[Path, dict]) -> None:
    root, _ = world
    again = generate_world(SMALL, tmp_path / "again")
    assert _hashes(tmp_path / "again") == _hashes(root)
    assert again == json.loads((root / "world.json").read_text())

    other = tmp_path / "other"
    generate_world(WorldConfig(seed=1, scale=0.05, shard_size=80), other)
    a, b = _hashes(root), _hashes(other)
    jpgs = [k for k in a if k.endswith((".jpg", ".tar")) and k in b]
    assert jpgs and all(a[k] != b[k] for k in jpgs)


def test_workers_do_not_change_bytes(tmp_path: Path) -> None:
    cfg = WorldConfig(seed=3, scale=0.02, n_classes=4, shard_size=40)
    generate_world(cfg, tmp_path / "one", workers=1)
    generate_world(cfg, tmp_path / "two", workers=2)
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")


def test_idempotent_and_config_mismatch(world: tuple[Path, dict]) -> None:
    root, info = world
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert generate_world(SMALL, root) == info
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match=str(root)):
        generate_world(WorldConfig(seed=1, scale=0.05, shard_size=80), root)


def test_interrupted_world_is_regenerated_and_foreign_folder_refused(tmp_path: Path) -> None:
    cfg = WorldConfig(seed=2, scale=0.02, n_classes=3, shard_size=50)
    partial = tmp_path / "partial"
    (partial / "pool").mkdir(parents=True)
    (partial / "pool" / "00009.tar").write_bytes(b"stale shard of a killed run")
    generate_world(cfg, partial)
    assert not (partial / "pool" / "00009.tar").exists()
    assert (partial / "world.json").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a world")
    with pytest.raises(ValueError, match="not a world"):
        generate_world(cfg, foreign)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorldConfig(n_classes=len(CLASSNAMES) + 1)
    with pytest.raises(ValueError):
        WorldConfig(scale=0)
    assert WorldConfig(n_classes=16).n_classes == 16


@pytest.mark.parametrize("domain", DOMAINS)
def test_renderers_are_pure_and_sized(domain: str) -> None:
    size = 48
    for label in range(len(CLASSNAMES)):
        a = render_image(domain, label, np.random.default_rng([5, label]), size)
        b = render_image(domain, label, np.random.default_rng([5, label]), size)
        assert a.mode == "RGB" and a.size == (size, size)
        assert a.tobytes() == b.tobytes()


def test_domains_look_different() -> None:
    """Cheap separability check: per-image colour statistics cluster by domain (nearest centroid
    on mean, std and saturation), so a small network has no trouble telling domains apart."""

    def features(img: Image.Image) -> np.ndarray:
        x = np.asarray(img, dtype=np.float32) / 255
        sat = x.max(axis=2) - x.min(axis=2)
        edges = np.abs(np.diff(x.mean(axis=2), axis=0)).mean()
        return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [sat.mean(), sat.std(), edges]])

    def sample(domain: str, seed: int) -> np.ndarray:
        return np.stack(
            [
                features(render_image(domain, i % 10, np.random.default_rng([seed, i]), 64))
                for i in range(40)
            ]
        )

    train = {d: sample(d, 1) for d in ("photo", "sketch", "rendition", "pose")}
    mean = np.concatenate(list(train.values())).mean(0)
    std = np.concatenate(list(train.values())).std(0) + 1e-6
    centroids = {d: ((f - mean) / std).mean(0) for d, f in train.items()}
    correct = total = 0
    for d in train:
        for f in (sample(d, 2) - mean) / std:
            guess = min(centroids, key=lambda c: float(((f - centroids[c]) ** 2).sum()))
            correct += guess == d
            total += 1
    assert correct / total > 0.8
