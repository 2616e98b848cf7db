import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from simgap.data.tars import write_tar
from simgap.embed import embed
from simgap.models import ModelSpec, load_model
from simgap.parallel import Executor, LocalEngine, RayEngine
from simgap.store import open_store


def _png(color, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (12, 12), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    loaded = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    torch.save({"state_dict": loaded.model.state_dict()}, path)
    return ModelSpec("simgap-tiny", checkpoint=str(path))


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pool"
    for s in range(3):
        samples = []
        for i in range(5):
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            samples.append((f"p{s}{i:02d}", {"png": _png(color), "txt": f"cap {s} {i}".encode()}))
        write_tar(folder / f"{s:05d}.tar", samples)
    # Shard 1 also carries a corrupt image, an empty one and a grayscale one.
    bad = [
        ("p1x0", {"png": b"\x89PNG\r\n\x1a\nbroken", "txt": b"corrupt"}),
        ("p1x1", {"jpg": b"", "txt": b"empty"}),
        ("p1x2", {"png": _png(90, "L"), "txt": b"gray"}),
    ]
    samples = [
        (k, m)
        for k, m in sorted(
            [*((f"p1{i:02d}", {"png": _png((i * 40, 0, 0)), "txt": b"c"}) for i in range(5)), *bad]
        )
    ]
    write_tar(folder / "00001.tar", samples)
    return folder


def test_embed_tars_counts_skips_and_matches_direct_forward(tmp_path, shards, checkpoint):
    store = embed(shards, tmp_path / "store", checkpoint, batch_size=4)
    assert store.rows == 5 + 6 + 5
    assert store.shards[1].skipped == {"corrupt_image": 1, "empty_image": 1}
    assert store.model["checkpoint_sha256"]
    keys = store.read_keys("00001").to_pydict()
    assert "p1x2" in keys["key"] and keys["caption"][keys["key"].index("p1x2")] == "gray"
    # The stored vector equals the model's own normalised embedding of the decoded image.
    loaded = load_model(checkpoint)
    img = Image.open(io.BytesIO(_png((80, 0, 0)))).convert("RGB")
    with torch.inference_mode():
        direct = loaded.model.encode_image(loaded.preprocess(img)[None]).float().numpy()[0]
    direct /= np.linalg.norm(direct)
    got = store.read_emb("00001")[keys["key"].index("p102")].astype(np.float32)
    np.testing.assert_allclose(got, direct, atol=2e-3)
    store.verify()


def test_embed_resumes_with_same_bytes(tmp_path, shards, checkpoint):
    full = embed(shards, tmp_path / "a", checkpoint)
    embed(shards, tmp_path / "b", checkpoint)
    # Simulate a kill after shard 0: later shards and the manifest never got written.
    for rel in ["manifest.json", "emb/00001.npy", "done/00001.json", "done/00002.json"]:
        (tmp_path / "b" / rel).unlink()
    resumed = embed(shards, tmp_path / "b", checkpoint)
    assert resumed.manifest == full.manifest
    for rel in ["manifest.json", "emb/00000.npy", "emb/00001.npy", "keys/00002.parquet"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_changed_input_shard_is_redone(tmp_path, shards, checkpoint):
    embed(shards, tmp_path / "s", checkpoint)
    write_tar(shards / "00002.tar", [("p2new", {"png": _png((1, 2, 3)), "txt": b"new"})])
    store = embed(shards, tmp_path / "s", checkpoint)
    assert store.read_keys("00002").column("key").to_pylist() == ["p2new"]


def test_image_folder_source(tmp_path, checkpoint):
    root = tmp_path / "bench"
    for c, cls in enumerate(["star", "ring"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"b-{cls}-{i}.png").write_bytes(_png((c * 100, i * 50, 0)))
    store = embed(root, tmp_path / "store", checkpoint, shard_size=4)
    assert [s.rows for s in store.shards] == [4, 2]
    table = store.keys_table().to_pydict()
    assert table["label"] == [0, 0, 0, 1, 1, 1]


def test_duplicate_keys_across_shards_are_an_error(tmp_path, shards, checkpoint):
    shutil.copy(shards / "00000.tar", shards / "00003.tar")
    with pytest.raises(ValueError, match="duplicate key 'p000' in shards 00000 and 00003"):
        embed(shards, tmp_path / "s", checkpoint)


def test_process_pool_and_ray_equal_local_byte_for_byte(tmp_path, shards, checkpoint):
    import ray

    local = embed(shards, tmp_path / "local", checkpoint)
    pool = embed(shards, tmp_path / "pool", checkpoint, executor=Executor(LocalEngine(2)))
    # Tasks take one CPU of two: a task that takes every CPU starves Ray's own work.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = embed(shards, tmp_path / "ray", checkpoint, executor=Executor(RayEngine()))
    finally:
        ray.shutdown()
    for other in (pool, on_ray):
        assert other.manifest == local.manifest
        for s in local.shards:
            for rel in [f"emb/{s.name}.npy", f"keys/{s.name}.parquet"]:
                assert (local.path / rel).read_bytes() == (other.path / rel).read_bytes()
    assert open_store(tmp_path / "ray").rows == local.rows
