"""clip-retrieval's layout read in place as a store."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simgap.embed import embed
from simgap.models import ModelSpec
from simgap.scan import ScanOptions, scan_store
from simgap.store import (
    UNKNOWN_MODEL,
    ClipRetrievalStore,
    StoreError,
    check_compatible,
    open_store,
    write_store,
)


def _unit(n, d, seed, dtype=np.float16):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _write_folder(root, sizes, d=8, dtype=np.float16, text=False, key_column=True):
    """What clip-retrieval's inference writes: img_emb_{i}.npy, metadata_{i}.parquet (+text)."""
    for sub in ("img_emb", "metadata", "text_emb"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    embs = []
    for i, n in enumerate(sizes):
        emb = _unit(n, d, seed=i, dtype=dtype)
        embs.append(emb)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", emb)
        if text:
            np.save(root / "text_emb" / f"text_emb_{i}.npy", _unit(n, d, seed=100 + i, dtype=dtype))
        columns = {
            "image_path": [f"{i:05d}{r:04d}" for r in range(n)],
            "caption": [f"caption {i} {r}" for r in range(n)],
            "url": [f"http://x/{i}/{r}.jpg" for r in range(n)],
        }
        if key_column:
            columns["key"] = [f"k{i}_{r}" for r in range(n)]
        pq.write_table(pa.table(columns), root / "metadata" / f"metadata_{i}.parquet")
    return embs


def test_reads_in_place_without_copying(tmp_path):
    # Shard 10 sorts after shard 2 by index, not by name.
    embs = _write_folder(tmp_path / "cr", [5, 3, 4], text=True)
    os.rename(tmp_path / "cr/img_emb/img_emb_2.npy", tmp_path / "cr/img_emb/img_emb_10.npy")
    os.rename(
        tmp_path / "cr/metadata/metadata_2.parquet", tmp_path / "cr/metadata/metadata_10.parquet"
    )
    os.rename(tmp_path / "cr/text_emb/text_emb_2.npy", tmp_path / "cr/text_emb/text_emb_10.npy")
    before = sorted(p.name for p in (tmp_path / "cr").rglob("*"))
    store = open_store(tmp_path / "cr")
    assert isinstance(store, ClipRetrievalStore)
    assert [s.name for s in store.shards] == ["00000", "00001", "00010"]
    assert [s.offset for s in store.shards] == [0, 5, 8] and store.rows == 12 and store.dim == 8
    assert store.model == UNKNOWN_MODEL
    emb = store.read_emb("00001")
    assert isinstance(emb, np.memmap)  # float16 files are memory-mapped, not copied
    np.testing.assert_array_equal(store.embeddings(), np.concatenate(embs))
    keys = store.read_keys("00010").to_pydict()
    assert keys["key"] == [f"k2_{r}" for r in range(4)] and keys["caption"][1] == "caption 2 1"
    assert store.has_text and store.read_text_emb("00000").shape == (5, 8)
    store.verify()
    assert sorted(p.name for p in (tmp_path / "cr").rglob("*")) == before  # nothing written


def test_fp32_files_are_cast_and_keys_fall_back(tmp_path):
    embs = _write_folder(tmp_path / "cr", [4, 2], dtype=np.float32, key_column=False)
    store = open_store(tmp_path / "cr")
    got = store.read_emb("00001")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, embs[1].astype(np.float16))
    assert store.read_keys("00001").column("key").to_pylist() == ["000010000", "000010001"]
    assert store.manifest["source_dtype"] == ["float32"]


def test_unnormalised_rows_and_mismatched_metadata_are_reported(tmp_path):
    _write_folder(tmp_path / "cr", [4, 3])
    bad = np.load(tmp_path / "cr/img_emb/img_emb_1.npy")
    bad[2] *= 3
    np.save(tmp_path / "cr/img_emb/img_emb_1.npy", bad)
    with pytest.raises(StoreError, match=r"img_emb_1.npy: 1 row\(s\) not L2-normalised \(row 2"):
        open_store(tmp_path / "cr")
    _write_folder(tmp_path / "cr2", [4, 3])
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "cr2/metadata/metadata_1.parquet")
    with pytest.raises(
        StoreError, match=r"img_emb_1.npy has 3 rows but .*metadata_1.parquet has 1"
    ):
        open_store(tmp_path / "cr2")
    (tmp_path / "cr2/metadata/metadata_1.parquet").unlink()
    with pytest.raises(StoreError, match="metadata_1.parquet: missing"):
        open_store(tmp_path / "cr2")


def test_link_records_the_model_and_scan_reads_it(tmp_path):
    _write_folder(tmp_path / "cr", [6, 5], d=16)
    checkpoint = tmp_path / "w.pt"
    checkpoint.write_bytes(b"stand-in weights: only hashed, never loaded, for a link")
    spec = ModelSpec("simgap-tiny", checkpoint=str(checkpoint))
    link = embed(tmp_path / "cr", tmp_path / "link", spec)
    assert json.loads((tmp_path / "link/manifest.json").read_text())["path"] == str(tmp_path / "cr")
    reopened = open_store(tmp_path / "link")
    assert reopened.model == link.model and reopened.model["checkpoint_sha256"]
    assert not (tmp_path / "link" / "emb").exists()  # linked, not copied
    tests = _unit(3, 16, seed=7).astype(np.float32)
    bench = write_store(tmp_path / "bench", tests, ["t0", "t1", "t2"], reopened.model)
    check_compatible(reopened, bench)
    with pytest.raises(StoreError, match="model that made these embeddings is unknown"):
        check_compatible(open_store(tmp_path / "cr"), bench)
    # The exact scan over the linked folder equals numpy brute force.
    result = scan_store(reopened, tests, options=ScanOptions(topk=2))
    sims = tests @ reopened.embeddings().astype(np.float32).T
    np.testing.assert_allclose(result.topk_sim[:, 0], sims.max(axis=1), atol=1e-2)
