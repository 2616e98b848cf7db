"""The contamination audit against brute force, with planted near-duplicates as ground truth;
the pixel verification against a numpy brute force on small synthetic images."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgap.audit import audit
from simgap.audit import pixels as vp
from simgap.audit.contamination import score_pairs
from simgap.cli import main as cli_main
from simgap.store import StoreWriter, normalize_fp16, write_store
from simgap.world.render import near_duplicate

MODEL = {"arch": "test", "checkpoint_sha256": "0"}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A base set with near-duplicates of some test points of two benchmarks."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(3)
    d = 32
    tests = {b: _unit(rng.standard_normal((20, d))) for b in ("sketch", "photo")}
    base = [_unit(rng.standard_normal((200, d)))]
    truth = []
    for b, t in tests.items():
        for i in range(0, 20, 4):  # every 4th test point has a near-duplicate in the base set
            truth.append((f"p{200 + len(truth):04d}", b, f"{b}-{i:03d}"))
            base.append(_unit(t[i : i + 1] + 0.05 * rng.standard_normal((1, d))))
    base_store = write_store(
        root / "pool", np.concatenate(base), [f"p{i:04d}" for i in range(210)], MODEL, 64
    )
    stores = {
        b: write_store(root / f"bench-{b}", t, [f"{b}-{i:03d}" for i in range(20)], MODEL)
        for b, t in tests.items()
    }
    gt = pa.table(
        {k: [r[i] for r in truth] for i, k in enumerate(("pool_key", "benchmark", "test_key"))}
    )
    pq.write_table(gt, root / "truth.parquet")
    return root, base_store, stores, gt


def test_audit_equals_brute_force_and_scores_ground_truth(planted, tmp_path):
    root, base, stores, gt = planted
    b = base.embeddings().astype(np.float32)
    bkeys = base.keys()
    for thr in (0.5, 0.9):
        report = audit(stores, base, thr, gt, tmp_path / str(thr), verify="none")
        pairs = pq.read_table(tmp_path / str(thr) / "pairs.parquet")
        want = []
        for name, store in stores.items():
            sims = store.embeddings().astype(np.float32) @ b.T
            tk = store.keys()
            hits = set()
            for t, r in zip(*np.nonzero(sims > np.float32(thr)), strict=True):
                want.append((name, tk[t], bkeys[r]))
                hits.add(t)
            r = report["benchmarks"][name]
            assert r["tests"] == 20 and r["contaminated"] == len(hits)
            assert r["fraction"] == len(hits) / 20
        got = list(
            zip(
                *(pairs.column(c).to_pylist() for c in ("benchmark", "test_key", "base_key")),
                strict=True,
            )
        )
        assert got == sorted(want) and report["pairs"] == len(want)
        assert (np.array(pairs.column("similarity")) > thr).all()
        on_disk = json.loads((tmp_path / str(thr) / "audit.json").read_text())
        assert on_disk == json.loads(json.dumps(report))
    # At 0.9 only the planted pairs remain: precision and recall 1; at 0.5 precision drops.
    g = audit(stores, base, 0.9, gt, verify="none")["ground_truth"]
    assert (g["tp"], g["fp"], g["fn"], g["precision"], g["recall"]) == (10, 0, 0, 1.0, 1.0)
    low = audit(stores, base, 0.5, gt, verify="none")["ground_truth"]
    assert low["recall"] == 1.0 and low["precision"] < 1.0 and low["fp"] > 0
    high = audit(stores, base, 0.9999, gt, verify="none")["ground_truth"]
    assert high["tp"] == 0 and high["fn"] == 10 and high["recall"] == 0.0


def test_audit_cli(planted, tmp_path, capsys):
    root, *_ = planted
    code = cli_main(
        [
            "audit",
            str(root / "pool"),
            "--benchmarks",
            str(root / "bench-sketch"),
            str(root / "bench-photo"),
            "--threshold",
            "0.9",
            "--verify",
            "none",
            "--ground-truth",
            str(root / "truth.parquet"),
            "-o",
            str(tmp_path / "a"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "sketch: 5/20 test points (25.00%)" in out and "precision 1.000, recall 1.000" in out
    bad = pa.table({"key": ["x"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    code = cli_main(
        [
            "audit",
            str(root / "pool"),
            "--benchmarks",
            str(root / "bench-sketch"),
            "--verify",
            "none",
            "--ground-truth",
            str(tmp_path / "bad.parquet"),
            "-o",
            str(tmp_path / "b"),
        ]
    )
    assert code == 2 and "lacks column" in capsys.readouterr().err
    # The default method verifies on pixels, which needs the samples' sources.
    code = cli_main(
        [
            "audit",
            str(root / "pool"),
            "--benchmarks",
            str(root / "bench-sketch"),
            "-o",
            str(tmp_path / "c"),
        ]
    )
    assert code == 2 and "no 'source' column" in capsys.readouterr().err


def test_score_pairs_counts_precision_and_recall():
    truth = pa.table(
        {
            "pool_key": ["p1", "p2", "p3", "p9"],
            "benchmark": ["a", "a", "b", "other"],
            "test_key": ["t1", "t2", "t3", "t9"],
        }
    )
    found = pa.table(
        {
            "benchmark": ["a", "a", "b"],
            "test_key": ["t1", "t2", "t3"],
            "base_key": ["p1", "p7", "p3"],
        }
    )
    g = score_pairs(found, truth, ["a", "b"])  # "other" is not audited, so not a miss
    assert (g["tp"], g["fp"], g["fn"]) == (2, 1, 1)
    assert g["precision"] == 2 / 3 and g["recall"] == 2 / 3
    empty = score_pairs(found.slice(0, 0), truth, ["a"])
    assert (empty["precision"], empty["recall"], empty["fn"]) == (1.0, 0.0, 2)


def _smooth_image(rng, side=32):
    """A random smooth colour picture (upsampled noise), unlike any other drawn from rng."""
    small = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _brute_match(test, base, max_crop):
    """match_score by loops: every crop side and offset of the test resized back, NCC in full."""
    h, w = test.shape[:2]
    b = vp.resample(base, h, w, blurred=True).astype(np.float64).ravel()
    b -= b.mean()
    best = -1.0
    for c in range(h - int(np.ceil(h * max_crop)), h + 1):
        for y in range(h - c + 1):
            for x in range(w - c + 1):
                crop = vp.resample(test[y : y + c, x : x + c], h, w, blurred=True)
                v = crop.astype(np.float64).ravel()
                v -= v.mean()
                best = max(best, float(v @ b / np.linalg.norm(v) / np.linalg.norm(b)))
    return best


def _brute_screen(test, base, max_crop):
    """screen_score by loops: the base shrunk to each crop side, slid over the test."""
    h, w = test.shape[:2]
    t = vp.resample(test, h, w, blurred=True)
    best = -1.0
    for c in range(h - int(np.ceil(h * max_crop)), h + 1):
        tm = vp.resample(base, c, c, blurred=True).astype(np.float64).ravel()
        tm -= tm.mean()
        for y in range(h - c + 1):
            for x in range(w - c + 1):
                win = t[y : y + c, x : x + c].astype(np.float64).ravel()
                win -= win.mean()
                best = max(best, float(win @ tm / np.linalg.norm(win) / np.linalg.norm(tm)))
    return best


def test_match_score_equals_brute_force_and_separates_copies():
    rng = np.random.default_rng(0)
    imgs = [_smooth_image(rng) for _ in range(4)]
    arr = [np.asarray(i, np.float32) for i in imgs]
    copy = np.asarray(_jpeg(near_duplicate(imgs[0], rng), 75), np.float32)
    for a, b in ((arr[0], copy), (arr[0], arr[1]), (arr[2], arr[3])):
        assert vp.match_score(a, b, 0.1) == pytest.approx(_brute_match(a, b, 0.1), abs=1e-5)
        assert vp.screen_score(a, b, 0.1) == pytest.approx(_brute_screen(a, b, 0.1), abs=1e-5)
        verifier = vp.Verifier([a, b], coarse=-1.0)  # no screening: the full score for both
        np.testing.assert_allclose(
            verifier.scores(b, [0, 1]), [vp.match_score(a, b), vp.match_score(b, b)], atol=1e-6
        )
    assert vp.match_score(arr[0], arr[0]) == pytest.approx(1.0, abs=1e-5)
    # A brightness gain and offset cancel; a copy clears the threshold, another picture does not.
    assert vp.match_score(arr[0], arr[0] * 0.9 + 7) == pytest.approx(1.0, abs=1e-5)
    assert vp.verify_score(arr[0], copy) >= vp.PIXEL_THRESHOLD
    assert max(vp.verify_score(arr[0], a) for a in arr[1:]) < vp.PIXEL_THRESHOLD


def test_resample_and_thumbnails_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (16, 24, 3)).astype(np.float32)
    np.testing.assert_allclose(vp.resample(x, 16, 24), x, atol=1e-4)  # same size: identity
    # Halving a side with the widened triangle filter averages neighbours only.
    m = vp.resample_matrix(16, 8)
    assert np.allclose(m.sum(1), 1) and (np.count_nonzero(m, axis=1) <= 4).all()
    np.testing.assert_allclose(vp.resample(np.full((16, 24, 3), 9.0), 5, 7), 9.0, atol=1e-4)
    img = rng.uniform(0, 255, (64, 64, 3)).astype(np.float32)
    want = img.mean(-1).reshape(8, 8, 8, 8).mean((1, 3)).ravel()
    want = (want - want.mean()) / np.linalg.norm(want - want.mean())
    np.testing.assert_allclose(vp.thumbnails([img])[0], want, atol=1e-4)


def _image_store(path, images, keys, emb, folder):
    """A store whose keys table points at image files (as an embedded image folder's does)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for k, im in zip(keys, images, strict=True):
        im.save(folder / f"{k}.jpg", quality=90)
        sources.append(str(folder / f"{k}.jpg"))
    writer = StoreWriter(path, MODEL, emb.shape[1], {"kind": "folder"})
    table = pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources)})
    return writer.finish([writer.write_shard("00000", normalize_fp16(emb), table)])


def test_pixel_audit_finds_planted_copies(tmp_path):
    """Embeddings here are noise: only the pixel stage can find the copies, which it must."""
    rng = np.random.default_rng(5)
    tests = [_smooth_image(rng) for _ in range(12)]
    pool = [_smooth_image(rng) for _ in range(30)]
    truth = []
    for i in (1, 4, 7, 10):
        truth.append((f"p{len(pool):03d}", "toy", f"toy-{i:02d}"))
        pool.append(_jpeg(near_duplicate(_jpeg(tests[i], 90), rng), int(rng.integers(70, 86))))
    d = 16
    tkeys = [f"toy-{i:02d}" for i in range(12)]
    bench = _image_store(
        tmp_path / "bench-toy", tests, tkeys, rng.standard_normal((12, d)), tmp_path / "img"
    )
    base = _image_store(
        tmp_path / "pool",
        pool,
        [f"p{i:03d}" for i in range(len(pool))],
        rng.standard_normal((len(pool), d)),
        tmp_path / "pimg",
    )
    gt = pa.table(
        {k: [r[i] for r in truth] for i, k in enumerate(("pool_key", "benchmark", "test_key"))}
    )
    report = audit(bench, base, ground_truth=gt, out_dir=tmp_path / "a", topk=3)
    g = report["ground_truth"]
    assert (g["tp"], g["fp"], g["fn"]) == (4, 0, 0)
    assert report["method"] == "pixels" and report["benchmarks"]["toy"]["contaminated"] == 4
    assert report["verify"]["candidates"]["pairs"] >= 12 * 3
    pairs = pq.read_table(tmp_path / "a" / "pairs.parquet")
    assert (np.array(pairs.column("pixel_score")) >= vp.PIXEL_THRESHOLD).all()
    assert pairs.column("test_key").to_pylist() == ["toy-01", "toy-04", "toy-07", "toy-10"]
    # The embedding-only method on noise embeddings finds nothing at the default threshold.
    assert audit(bench, base, ground_truth=gt, verify="none")["ground_truth"]["tp"] == 0
    with pytest.raises(ValueError, match="unknown audit verification"):
        audit(bench, base, verify="magic")
    (tmp_path / "pimg" / "p031.jpg").unlink()
    with pytest.raises(ValueError, match="1 samples not found again, e.g. 'p031'"):
        audit(bench, base, topk=3)
