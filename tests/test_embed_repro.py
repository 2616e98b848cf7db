"""Byte-identity of embed stores across the conditions that used to flip last bits: torch thread
count, an image's place in a full or a shard's partial last batch, in-process vs the CLI in a
subprocess. CPU conv/GEMM kernels choose their algorithm from the batch shape and the thread
count, so without fixed shapes and threads these stores differed in ~0.1% of fp16 values."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simgap.data.tarwrite import write_tar
from simgap.embed import embed
from simgap.embed.encode import forward_threads
from simgap.models import load_model

BATCH = 4


def _jpeg(rng: np.random.Generator) -> bytes:
    # Smooth random images, as photos: varied activations exercise every kernel path.
    low = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(low).resize((40, 40), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [(f"k{i:03d}", _jpeg(rng)) for i in range(2 * BATCH + 1)]


def _write(folder: Path, order: list[tuple[str, bytes]]) -> Path:
    write_tar(
        folder / "00000.tar", [(k, {"jpg": d, "txt": f"a photo {k}".encode()}) for k, d in order]
    )
    return folder


def _emb_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "emb").glob("*.npy"))}


def _by_key(store) -> dict[str, bytes]:
    keys = store.read_keys("00000").column("key").to_pylist()
    return {k: row.tobytes() for k, row in zip(keys, store.read_emb("00000"), strict=True)}


def _embed_with_threads(source, out, spec, threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return embed(source, out, spec, batch_size=BATCH, text=True)
    finally:
        torch.set_num_threads(before)


def test_thread_count_and_cli_subprocess_give_the_same_bytes(tmp_path, checkpoint, images):
    source = _write(tmp_path / "pool", images)  # batches of 4, 4 and a partial 1
    one = _embed_with_threads(source, tmp_path / "t1", checkpoint, 1)
    two = _embed_with_threads(source, tmp_path / "t2", checkpoint, 2)
    cli = tmp_path / "cli"
    cmd = [sys.executable, "-m", "simgap.cli", "embed", str(source), "-o", str(cli)]
    cmd += ["--model", "simgap-tiny", "--checkpoint", checkpoint.checkpoint, "--text"]
    cmd += ["--batch-size", str(BATCH)]
    subprocess.run(cmd, check=True, capture_output=True)  # torch's own default thread count
    reference = _emb_bytes(one.path)
    assert reference and one.rows == len(images)
    assert _emb_bytes(two.path) == reference
    assert _emb_bytes(cli) == reference
    text = (one.path / "text" / "00000.npy").read_bytes()
    assert (two.path / "text" / "00000.npy").read_bytes() == text
    assert (cli / "text" / "00000.npy").read_bytes() == text


@pytest.mark.parametrize("threads", [1, 2])
def test_an_image_has_the_same_bytes_in_a_full_or_a_partial_batch(
    tmp_path, checkpoint, images, threads
):
    # The same images, rotated: the last one sits alone in the partial last batch in the first
    # shard, first in a full batch in the second.
    rotated = images[-1:] + images[:-1]
    first = _embed_with_threads(
        _write(tmp_path / "a", images), tmp_path / "sa", checkpoint, threads
    )
    second = _embed_with_threads(
        _write(tmp_path / "b", rotated), tmp_path / "sb", checkpoint, threads
    )
    a, b = _by_key(first), _by_key(second)
    assert set(a) == {k for k, _ in images}
    assert a == b


def test_forward_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with forward_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), forward_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_forward_features_do_not_depend_on_threads_or_batch_fill(checkpoint):
    # float32, before the store's fp16 rounding hides most flips: for a random-init model at
    # these batch shapes, 1 vs 2 threads and a 5-row vs a 16-row batch flip last bits
    # without fixed threads and padding.
    from simgap.embed.encode import encode_batch

    loaded = load_model(checkpoint)
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        full = encode_batch(loaded, pixels, "cpu", rows=16)
        torch.set_num_threads(2)
        part = encode_batch(loaded, pixels[:5], "cpu", rows=16)
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    assert part.shape == (5, full.shape[1])
    assert part.tobytes() == full[:5].tobytes()
