import json

import numpy as np
import pyarrow as pa
import pytest

import simgap.store.writer as store_writer
from simgap.store import (
    StoreError,
    StoreWriter,
    check_compatible,
    normalize_fp16,
    open_store,
    write_store,
)

MODEL = {"arch": "simgap-tiny", "checkpoint_sha256": "abc"}


def _random(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_round_trip_normalised_fp16(tmp_path):
    emb = _random(250, 16)
    keys = [f"k{i:04d}" for i in range(250)]
    store = write_store(tmp_path / "s", emb, keys, MODEL, shard_rows=100)
    again = open_store(tmp_path / "s")
    assert again.rows == 250 and len(again.shards) == 3 and again.dim == 16
    assert [s.offset for s in again.shards] == [0, 100, 200]
    got = again.embeddings()
    assert got.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1, atol=2e-3)
    expected = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=1e-3)
    assert again.keys() == keys
    store.verify()
    blocks = list(again.iter_blocks())
    assert [b[0] for b in blocks] == [0, 100, 200]


def test_same_input_same_bytes(tmp_path):
    emb, keys = _random(50, 8), [f"k{i}" for i in range(50)]
    write_store(tmp_path / "a", emb, keys, MODEL, shard_rows=20)
    write_store(tmp_path / "b", emb, keys, MODEL, shard_rows=20)
    for rel in ["manifest.json", "emb/00001.npy", "keys/00002.parquet"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_checksum_mismatch_detected(tmp_path):
    store = write_store(tmp_path / "s", _random(10, 4), [f"k{i}" for i in range(10)], MODEL)
    path = tmp_path / "s" / "emb" / "00000.npy"
    arr = np.load(path)
    arr[0, 0] = 0.5
    np.save(path, arr)
    with pytest.raises(StoreError, match="checksum"):
        store.verify()


def test_missing_and_unfinished_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="no manifest"):
        open_store(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="unknown store format"):
        open_store(tmp_path / "half")


def test_wrong_dtype_shard_is_refused(tmp_path):
    write_store(tmp_path / "s", _random(10, 4), [f"k{i}" for i in range(10)], MODEL)
    np.save(tmp_path / "s" / "emb" / "00000.npy", _random(10, 4))
    with pytest.raises(StoreError, match="float16"):
        open_store(tmp_path / "s").read_emb("00000")


def test_duplicate_keys_across_shards_named(tmp_path):
    writer = StoreWriter(tmp_path / "s", MODEL, 4, {})
    emb = normalize_fp16(_random(2, 4))
    r1 = writer.write_shard("00000", emb, pa.table({"key": ["a", "b"]}))
    r2 = writer.write_shard("00001", emb, pa.table({"key": ["c", "a"]}))
    with pytest.raises(StoreError, match="duplicate key 'a' in shards 00000 and 00001"):
        writer.finish([r1, r2])


@pytest.mark.parametrize("bucket_rows", [3, 1 << 22])
def test_duplicate_key_check_in_buckets_matches_brute_force(tmp_path, monkeypatch, bucket_rows):
    """Bounded-memory check: with tiny buckets every bucket and shard slice is exercised."""
    monkeypatch.setattr(store_writer, "BUCKET_ROWS", bucket_rows)
    rng = np.random.default_rng(3)
    shards = [[f"k{rng.integers(1 << 40)}" for _ in range(40)] for _ in range(5)]
    keys_of = dict(zip("abcde", shards, strict=True)).__getitem__
    repeated = store_writer._repeated_hashes(list("abcde"), keys_of, tmp_path)
    assert repeated == set()
    assert list(tmp_path.iterdir()) == []  # the spill is removed
    (tmp_path / ".keycheck-killed").mkdir()  # a killed run's spill goes too
    (tmp_path / ".keycheck-killed" / "0.npy").write_bytes(b"x")
    store_writer._repeated_hashes(list("ab"), keys_of, tmp_path)
    assert list(tmp_path.iterdir()) == []
    shards[4][17] = shards[1][30]
    shards[3][2] = shards[3][9]
    repeated = store_writer._repeated_hashes(list("abcde"), keys_of, tmp_path)
    assert repeated == {hash(shards[1][30]), hash(shards[3][9])}

    writer = StoreWriter(tmp_path / "s", MODEL, 4, {})
    records = [
        writer.write_shard(f"{i:05d}", normalize_fp16(_random(40, 4, i)), pa.table({"key": k}))
        for i, k in enumerate(shards[:3] + [shards[4]])
    ]
    with pytest.raises(
        StoreError, match=f"duplicate key '{shards[1][30]}' in shards 00001 and 00003"
    ):
        writer.finish(records)


def test_nan_and_zero_rows_refused():
    bad = _random(3, 4)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        normalize_fp16(bad)
    with pytest.raises(ValueError, match="zero vector"):
        normalize_fp16(np.zeros((1, 4), np.float32))


def test_stores_from_different_models_refused(tmp_path):
    a = write_store(tmp_path / "a", _random(5, 4), list("abcde"), MODEL)
    b = write_store(
        tmp_path / "b", _random(5, 4), list("abcde"), {**MODEL, "checkpoint_sha256": "x"}
    )
    c = write_store(tmp_path / "c", _random(5, 8), list("abcde"), MODEL)
    check_compatible(a, a)
    with pytest.raises(StoreError, match="different similarity models"):
        check_compatible(a, b)
    with pytest.raises(StoreError, match="dim"):
        check_compatible(a, c)


def test_done_record_requires_same_fingerprint(tmp_path):
    writer = StoreWriter(tmp_path / "s", MODEL, 4, {})
    writer.write_shard("00000", normalize_fp16(_random(2, 4)), pa.table({"key": ["a", "b"]}), "f1")
    assert writer.done_record("00000", "f1")["rows"] == 2
    assert writer.done_record("00000", "f2") is None
    assert writer.done_record("00001", "f1") is None
