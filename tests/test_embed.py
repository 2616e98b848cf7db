import io
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simgap.data.tarwrite import write_tar
from simgap.embed import embed
from simgap.embed.encode import autocast_dtype
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
    # The error names both shards and both source files.
    with pytest.raises(
        ValueError,
        match=r"duplicate key 'p000' in shards 00000 and 00003 \(.*00000.tar and .*00003.tar",
    ):
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


def _bomb_png(width=20000, height=20000):
    """A real PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(_png((0, 0, 0)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _encoded(mode, color, fmt, **save):
    buf = io.BytesIO()
    Image.new(mode, (12, 12), color).save(buf, fmt, **save)
    return buf.getvalue()


def test_corrupt_image_catalogue_is_converted_or_skipped_and_counted(tmp_path, checkpoint):
    good = _png((10, 200, 30))
    catalogue = {
        "a-corrupt": {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg"},
        "b-truncated": {"jpg": _encoded("RGB", (1, 2, 3), "JPEG")[:60]},
        "c-zero-size": {"png": b""},
        "d-gray": {"jpg": _encoded("L", 90, "JPEG")},
        "e-cmyk": {"jpg": _encoded("CMYK", (0, 50, 100, 0), "JPEG")},
        "f-palette": {"png": _encoded("P", 3, "PNG")},
        "g-alpha": {"png": _encoded("RGBA", (9, 9, 9, 0), "PNG")},
        "h-bomb": {"png": _bomb_png()},
        "i-no-image": {"txt": b"caption only"},
        "j-good": {"png": good},
    }
    write_tar(tmp_path / "pool" / "00000.tar", sorted(catalogue.items()))
    store = embed(tmp_path / "pool", tmp_path / "store", checkpoint)
    assert store.manifest["shards"][0]["skipped"] == {
        "corrupt_image": 2,
        "empty_image": 1,
        "missing_image": 1,
        "oversized_image": 1,
    }
    assert store.keys() == ["d-gray", "e-cmyk", "f-palette", "g-alpha", "j-good"]
    emb = store.embeddings().astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    # Transparent pixels composite on white: the alpha image embeds as a white image does.
    white = embed_one(checkpoint, Image.new("RGB", (12, 12), (255, 255, 255)))
    np.testing.assert_allclose(emb[3], white, atol=2e-3)


def embed_one(spec, image):
    loaded = load_model(spec)
    with torch.inference_mode():
        v = loaded.model.encode_image(loaded.preprocess(image)[None]).float().numpy()[0]
    return v / np.linalg.norm(v)


def test_decode_workers_and_text_keep_the_bytes(tmp_path, shards, checkpoint):
    plain = embed(shards, tmp_path / "a", checkpoint, batch_size=4, text=True, decode_workers=0)
    threaded = embed(shards, tmp_path / "b", checkpoint, batch_size=4, text=True, decode_workers=2)
    assert threaded.manifest == plain.manifest and plain.has_text
    for rel in ["emb/00001.npy", "text/00001.npy", "keys/00001.parquet"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    # Caption embeddings are the model's normalised text embeddings, row-aligned with the keys.
    loaded = load_model(checkpoint)
    keys = plain.read_keys("00002").to_pydict()
    with torch.inference_mode():
        direct = loaded.model.encode_text(loaded.tokenizer([keys["caption"][3]])).numpy()[0]
    direct /= np.linalg.norm(direct)
    np.testing.assert_allclose(
        plain.read_text_emb("00002")[3].astype(np.float32), direct, atol=2e-3
    )
    plain.verify()


def test_another_model_redoes_every_shard(tmp_path, shards, checkpoint):
    first = embed(shards, tmp_path / "s", checkpoint)
    before = first.embeddings()  # a copy: the store's files are about to be replaced
    state = torch.load(checkpoint.checkpoint, weights_only=True)["state_dict"]
    other = tmp_path / "other.pt"
    gen = torch.Generator().manual_seed(5)
    noisy = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in state.items()
    }
    torch.save(noisy, other)
    second = embed(shards, tmp_path / "s", ModelSpec("simgap-tiny", checkpoint=str(other)))
    assert second.model != first.model
    assert not np.array_equal(second.embeddings(), before)
    fresh = embed(shards, tmp_path / "t", ModelSpec("simgap-tiny", checkpoint=str(other)))
    np.testing.assert_array_equal(second.embeddings(), fresh.embeddings())


def test_resume_fingerprint_holds_the_resolved_numerics(checkpoint):
    """ "auto" is float32 on CPU: a resume with fp32 reuses its shards, one with bf16 does not."""
    from simgap.embed.shard import EmbedShard

    def fingerprint(precision):
        return EmbedShard("s", checkpoint, 64, "cpu", precision=precision).fingerprint("task")

    assert fingerprint("auto") == fingerprint("fp32")
    assert fingerprint("bf16") != fingerprint("auto")


def test_precision_choices():
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        autocast_dtype("cpu", "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype("cpu", "int8")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _kill_when(cmd: list[str], ready) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not ready():
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill point: {err[-500:]}"


def _kill_points(out: Path, which: list[str]):
    points = {
        "started": lambda: (out / "emb").is_dir(),  # model loaded, nothing written yet
        "mid-run": lambda: (out / "done" / "00001.json").exists(),
        "late": lambda: (out / "done" / "00003.json").exists(),  # after a resume
    }
    return [points[w] for w in which]


def _kill_resume_compare(tmp_path, checkpoint, which: list[str]) -> None:
    rng = np.random.default_rng(1)
    for s in range(6):
        samples = [
            (f"q{s}{i:02d}", {"png": _png(tuple(int(c) for c in rng.integers(0, 255, 3)))})
            for i in range(6)
        ]
        write_tar(tmp_path / "pool" / f"{s:05d}.tar", samples)
    flags = ["--checkpoint", checkpoint.checkpoint, "--batch-size", "4"]
    reference = embed(tmp_path / "pool", tmp_path / "ref", checkpoint, batch_size=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "simgap.cli", "embed", str(tmp_path / "pool"), "-o", str(out)]
    for ready in _kill_points(out, which):
        _kill_when(cmd + flags, ready)
        assert not (out / "manifest.json").exists()
        # No shard is half-written under its final name: each done record's shard is whole.
        for done in (out / "done").glob("*.json"):
            record = json.loads(done.read_text())
            emb = np.load(out / "emb" / f"{record['name']}.npy")
            assert emb.dtype == np.float16 and len(emb) == record["rows"] == 6
    assert 2 <= len(list((out / "done").glob("*.json"))) < 6
    resumed = embed(tmp_path / "pool", out, checkpoint, batch_size=4)
    assert resumed.manifest == reference.manifest
    assert _tree(out) == _tree(tmp_path / "ref")  # same files, same bytes, no temporaries left


def test_sigkill_at_several_points_then_rerun_gives_the_same_bytes(tmp_path, checkpoint):
    # Each point is a fresh `simgap embed` process (torch import + model load), ~30 s in all.
    _kill_resume_compare(tmp_path, checkpoint, ["started", "mid-run", "late"])


def test_split_transform_is_bitwise_the_model_transform(checkpoint):
    from simgap.data.transforms import split_transform

    loaded = load_model(checkpoint)
    split = split_transform(loaded.preprocess)
    assert split.normalize is not None  # open_clip's eval transform is split at ToTensor
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(64, 64), (50, 90), (33, 31)]
    ]
    images.append(Image.new("L", (40, 40), 100))
    whole = torch.stack([loaded.preprocess(im) for im in images])
    batch = split.batch([split.per_image(im) for im in images])
    assert torch.equal(batch, whole) and batch.is_contiguous()
    # A transform that is not a Compose ending in ToTensor + Normalize is kept whole.
    kept = split_transform(lambda im: torch.zeros(3, 2, 2))
    assert kept.normalize is None and kept.batch([kept.per_image(None)] * 2).shape == (2, 3, 2, 2)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7])
def test_marked_chunks_mark_only_the_last_chunk_after_the_records_end(n):
    from simgap.embed.batches import marked_chunks

    ended = []

    def records():
        yield from ((f"k{i}", b"", {}) for i in range(n))
        ended.append(True)

    chunks = []
    for chunk, last in marked_chunks(records(), 3):
        assert ended or not last  # marked last only once the reader is exhausted
        chunks.append(([k for k, _, _ in chunk], last))
    expected = [[f"k{i}" for i in range(s, min(s + 3, n))] for s in range(0, n, 3)] or [[]]
    assert [c for c, _ in chunks] == expected
    assert [last for _, last in chunks] == [False] * (len(expected) - 1) + [True]


@pytest.mark.parametrize("batch_size", [4, 8])
def test_prepared_batches_are_the_same_with_any_number_of_workers(shards, checkpoint, batch_size):
    # With workers, this process prepares the first batch and the workers the rest; the sequence
    # (order, shard marks, skip counts, pixels) must be the in-process one. With 8 rows a batch,
    # the first shard's only batch is also its last, so its read skips travel with batch 0.
    from simgap.data.sources import shard_tasks
    from simgap.data.transforms import split_transform
    from simgap.embed.batches import prepared_batches

    tasks = tuple(shard_tasks(str(shards)))
    transform = split_transform(load_model(checkpoint).preprocess)

    def run(workers):
        got = []
        for b in prepared_batches(tasks, transform, batch_size, workers):
            got.append((b.shard, b.last, b.keys, dict(b.skipped), b.pixels.clone()))
        return got

    plain = run(0)
    assert [(s, last) for s, last, *_ in plain if last] == [(0, True), (1, True), (2, True)]
    assert sum(len(k) for _, _, k, _, _ in plain) == 16
    for workers in (1, 2):
        other = run(workers)
        assert [b[:4] for b in other] == [b[:4] for b in plain]
        assert all(torch.equal(a[4], b[4]) for a, b in zip(other, plain, strict=True))


def test_a_group_of_shards_logs_a_progress_line_per_shard(tmp_path, shards, checkpoint):
    # With a decode worker the three shards run as one group in this process; the log still
    # gets a line per shard, on a first run and on a resume that finds them all done.
    for _ in range(2):
        lines = []
        embed(
            shards,
            tmp_path / "s",
            checkpoint,
            batch_size=4,
            decode_workers=1,
            progress=lines.append,
        )
        assert [line.split(",")[0] for line in lines] == [
            f"embed s: {i}/3 shards" for i in (1, 2, 3)
        ]
        assert ", 16 rows," in lines[-1]
