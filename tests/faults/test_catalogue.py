"""The bad-input catalogue: every input of the issue's list gets a clear one-line error naming the
file (exit 2, ``simgap: error: ...``, no traceback) or a counted skip, never silent corruption.

The CLI's ``main`` runs in this process (the model stays loaded between cases); that it behaves
the same in a subprocess is checked by the kill tests and ``test_subprocess_error_is_one_line``.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgap.data.tarwrite import write_tar

from .faultlib import (
    jpeg,
    noise_png,
    one_line_error,
    png,
    record,
    run_cli,
    write_pool,
    write_unit_store,
)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(capsys, *args) -> Result:
    from simgap.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err)


# ------------------------------------------------------------------------- crafted images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def giant_png(side: int = 20_000) -> bytes:
    """A real, valid 1-bit PNG of side×side pixels (a decompression bomb: 400 Mpixel in a few
    hundred kB), compressed row block by row block so that writing it is cheap."""
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    )
    comp = zlib.compressobj(6)
    rows = (b"\0" + b"\x55" * ((side + 7) // 8)) * 500
    body = b"".join(comp.compress(rows) for _ in range(side // 500)) + comp.flush()
    return header + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def header_only_png(side: int = 20_000) -> bytes:
    """Only a PNG header claiming side×side pixels, no pixel data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def bad_crc_png() -> bytes:
    data = bytearray(png((10, 200, 30)))
    data[29] ^= 0xFF  # last byte of the IHDR chunk's CRC (8 signature + 4 len + 4 type + 13)
    return bytes(data)


def broken_header_jpeg() -> bytes:
    data = bytearray(jpeg((200, 100, 0)))
    data[2:24] = b"\x00" * 22  # SOI kept, the APP0/quantisation markers destroyed
    return bytes(data)


def sixteen_bit_png(value: int = 40_000) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 200, 200, 20)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def rgb_twin(data: bytes) -> bytes:
    """The image as PIL decodes it to RGB, saved as PNG: what the odd format should embed as."""
    img = Image.open(io.BytesIO(data))
    if img.mode.startswith("I;16"):
        img = img.point(lambda v: v / 256).convert("L")
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


# Per-sample catalogue: key -> (members, expected outcome). "kept" rows must be embedded.
@functools.cache
def sample_catalogue() -> dict[str, tuple[dict[str, bytes], str]]:
    rng = np.random.default_rng(7)
    ok = noise_png(rng)
    return {
        "c01-jpeg-broken-header": ({"jpg": broken_header_jpeg(), "txt": b"x"}, "skipped"),
        "c02-png-bad-crc": ({"png": bad_crc_png(), "txt": b"x"}, "skipped"),
        "c03-zero-byte-image": ({"jpg": b"", "txt": b"x"}, "skipped"),
        "c04-one-pixel": ({"png": png((1, 2, 3), size=1), "txt": b"x"}, "kept"),
        "c05-giant-20000px": ({"png": giant_png(), "txt": b"x"}, "skipped"),
        "c06-giant-header-only": ({"png": header_only_png(), "txt": b"x"}, "skipped"),
        "c07-sixteen-bit": ({"png": sixteen_bit_png(), "txt": b"x"}, "kept"),
        "c07-sixteen-bit-twin": ({"png": rgb_twin(sixteen_bit_png()), "txt": b"x"}, "kept"),
        "c08-cmyk": ({"jpg": cmyk_jpeg(), "txt": b"x"}, "kept"),
        "c08-cmyk-twin": ({"png": rgb_twin(cmyk_jpeg()), "txt": b"x"}, "kept"),
        "c09-caption-invalid-utf8": ({"png": ok, "txt": b"caf\xe9 \xff\xfe end"}, "kept"),
        "c10-caption-100kB": ({"png": ok, "txt": b"a" * 100_000}, "kept"),
        "c11-missing-caption": ({"png": ok}, "kept"),
        "c12-missing-image": ({"txt": b"only a caption"}, "skipped"),
    }


def _tar_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good_samples(prefix: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(f"{prefix}{i:03d}", {"png": noise_png(rng), "txt": b"fine"}) for i in range(n)]


@pytest.fixture(scope="module")
def bad_source(workdir) -> tuple[Path, dict]:
    """Shard 0 good, 1 the per-sample catalogue, 2 cut mid-member, 3 cut at a member boundary
    (no end-of-archive marker), 4 an empty tar (no members)."""
    root = workdir / "catalogue" / "source"
    root.mkdir(parents=True)
    write_tar(root / "00000.tar", _good_samples("g0-", 4, 0))
    write_tar(root / "00001.tar", sorted((k, m) for k, (m, _) in sample_catalogue().items()))
    cut = _tar_bytes(_good_samples("g2-", 6, 2))
    # Member g2-003.png starts at 512 * (1 + 2 * (2 + 2)) + ... : cut at 60%, inside some member.
    (root / "00002.tar").write_bytes(cut[: int(len(cut) * 0.6) // 512 * 512 + 100])
    whole = _tar_bytes(_good_samples("g3-", 4, 3))
    (root / "00003.tar").write_bytes(whole[: _member_boundary(whole, 2)])
    write_tar(root / "00004.tar", [])
    kept_before_cut = _keys_whole_in(root / "00002.tar")
    expected = {
        "kept": sorted(
            [f"g0-{i:03d}" for i in range(4)]
            + [k for k, (_, o) in sample_catalogue().items() if o == "kept"]
        ),
        # A cut shard keeps the samples before the damage; the one in progress at the cut may
        # be dropped (it could have had more members), counted.
        "cut": {"00002": kept_before_cut, "00003": ["g3-000", "g3-001"]},
        "skipped_1": sum(o == "skipped" for _, o in sample_catalogue().values()),
    }
    return root, expected


def _member_boundary(tar_bytes: bytes, n_samples: int) -> int:
    """Offset just after the ``n_samples``-th sample's last member."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        infos = tar.getmembers()
    last = infos[2 * n_samples - 1]
    return last.offset_data + (last.size + 511) // 512 * 512


def _keys_whole_in(path: Path) -> list[str]:
    """Samples of a cut tar whose members (png and txt) are all complete."""
    data = path.read_bytes()
    whole: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        try:
            for info in tar:
                if info.offset_data + info.size <= len(data):
                    key = info.name.split(".")[0]
                    whole[key] = whole.get(key, 0) + 1
        except (tarfile.ReadError, EOFError):
            pass
    return sorted(k for k, n in whole.items() if n == 2)


def test_bad_images_captions_and_shards_are_skipped_and_counted(
    capsys, workdir, bad_source, checkpoint
):
    root, expected = bad_source
    out = workdir / "catalogue" / "store"
    res = cli(capsys, "embed", root, "-o", out, "--checkpoint", checkpoint, "--batch-size", "8")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    shards = {s["name"]: s for s in manifest["shards"]}
    keys = pq.read_table(out / "keys" / "00001.parquet").to_pydict()
    got = sorted(
        k
        for p in sorted((out / "keys").glob("*.parquet"))
        for k in pq.read_table(p)["key"].to_pylist()
    )

    # Each per-sample item: embedded, or skipped and counted in the shard's manifest entry.
    for key, (_, outcome) in sample_catalogue().items():
        record("input", "embed", outcome, input=key)
        assert (key in got) == (outcome == "kept"), key
    assert sum(shards["00001"]["skipped"].values()) == expected["skipped_1"], shards["00001"]
    # The cut shards keep what came before the damage and count the damage.
    for name, what in [("00002", "tar cut mid-member"), ("00003", "tar without end marker")]:
        assert sum(shards[name]["skipped"].values()) >= 1, (name, shards[name])
        record("input", "embed", "counted-skip", input=what)
    assert shards["00004"]["rows"] == 0
    record("input", "embed", "empty-shard-0-rows", input="tar with no members")
    cut = {k for keys in expected["cut"].values() for k in keys}
    assert sorted(k for k in got if k not in cut) == expected["kept"]
    for name, whole in expected["cut"].items():
        kept = pq.read_table(out / "keys" / f"{name}.parquet")["key"].to_pylist()
        assert kept == whole[: len(kept)] and len(kept) >= len(whole) - 1, (name, kept, whole)
        assert sum(shards[name]["skipped"].values()) >= 1 + len(whole) - len(kept)

    # Captions: bad UTF-8 decoded with replacement characters, a long one kept whole, a missing
    # one null (not an empty string pretending to be a caption).
    caption = dict(zip(keys["key"], keys["caption"], strict=True))
    assert caption["c09-caption-invalid-utf8"].startswith("caf\ufffd")
    assert len(caption["c10-caption-100kB"]) == 100_000
    assert caption["c11-missing-caption"] in (None,)

    # Odd formats embed like their RGB decodings, not as garbage.
    emb = np.load(out / "emb" / "00001.npy").astype(np.float32)
    row = {k: i for i, k in enumerate(keys["key"])}
    for odd in ("c07-sixteen-bit", "c08-cmyk"):
        cos = float(emb[row[odd]] @ emb[row[f"{odd}-twin"]])
        assert cos > 0.999, (odd, cos)
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-2)


@pytest.mark.parametrize(
    "what, content",
    [
        ("zero-byte shard", b""),
        ("junk shard", b"this is not a tar archive" * 40),
        ("tar cut inside its first header", None),
    ],
)
def test_unreadable_shard_is_an_error_naming_it_or_a_counted_skip(
    capsys, workdir, checkpoint, what, content
):
    root = workdir / "catalogue" / f"unreadable-{what.replace(' ', '-')}"
    write_pool(root, shards=1, per_shard=2)
    bad = root / "00001.tar"
    bad.write_bytes(content if content is not None else _tar_bytes(_good_samples("u", 1, 0))[:300])
    out = root.parent / f"{root.name}-store"
    res = cli(capsys, "embed", root, "-o", out, "--checkpoint", checkpoint)
    if res.returncode == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        skipped = {s["name"]: s["skipped"] for s in manifest["shards"]}
        assert sum(skipped["00001"].values()) >= 1, skipped
        record("input", "embed", "counted-skip", input=what)
    else:
        one_line_error(res, str(bad))
        record("input", "embed", "error", input=what)


def test_duplicate_keys_across_shards_are_an_error(capsys, workdir, checkpoint):
    root = workdir / "catalogue" / "dup"
    write_tar(root / "00000.tar", _good_samples("d", 3, 0))
    write_tar(root / "00001.tar", _good_samples("d", 2, 1))  # d000, d001 again
    res = cli(capsys, "embed", root, "-o", root.parent / "dup-store", "--checkpoint", checkpoint)
    one_line_error(res, "duplicate", "d000")
    record("input", "embed", "error", input="duplicate keys across shards")


def test_subprocess_error_is_one_line(workdir):
    """The same contract in a real process: exit 2, one line, no traceback."""
    res = run_cli("scan", workdir / "no such store", "--benchmarks", workdir, "-o", workdir / "x")
    one_line_error(res, "no such store")
    record("input", "scan", "error", input="missing store folder")


# ------------------------------------------------------------------------- embedding stores

MODEL_A = {"arch": "test", "pretrained": None, "checkpoint_sha256": "a" * 64}
MODEL_B = {"arch": "test", "pretrained": None, "checkpoint_sha256": "b" * 64}


def _rewrite_shard(store: Path, array: np.ndarray, update_checksum: bool = True) -> Path:
    """Replace shard 00000's embeddings; with ``update_checksum`` the manifest agrees (the bad
    data came from the producer, not from the disk)."""
    from simgap.io import sha256_file

    path = store / "emb" / "00000.npy"
    np.save(path, array, allow_pickle=False)
    if update_checksum:
        manifest = json.loads((store / "manifest.json").read_text())
        manifest["shards"][0]["sha256"] = sha256_file(path)
        (store / "manifest.json").write_text(json.dumps(manifest))
    return path


def _base(root: Path, name: str) -> tuple[Path, np.ndarray]:
    path = root / name
    write_unit_store(path, 200, 16, seed=11, model=MODEL_A)
    return path, np.load(path / "emb" / "00000.npy")


def _nan(e):
    e = e.copy()
    e[5, 3] = np.nan
    return e


def _inf(e):
    e = e.copy()
    e[7, 0] = np.inf
    return e


def _unnormalised(e):
    return (e.astype(np.float32) * 3).astype(np.float16)


def _other_vectors(e):
    rng = np.random.default_rng(99)
    x = rng.standard_normal(e.shape).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


STORE_CASES = {
    # name: (make bad array from the good one, keep the manifest checksum in step)
    "NaN in embeddings": (_nan, True),
    "Inf in embeddings": (_inf, True),
    "wrong dim": (lambda e: np.zeros((len(e), 17), np.float16) + np.float16(0.25), True),
    "wrong dtype float32": (lambda e: e.astype(np.float32), True),
    "unnormalised rows": (_unnormalised, True),
    "checksum does not match manifest": (_other_vectors, False),
    "fewer rows than manifest": (lambda e: e[:150], True),
}


def _store_case(name: str):
    return pytest.param(name, id=name.replace(" ", "-"))


@pytest.mark.parametrize("case", [_store_case(n) for n in STORE_CASES])
def test_bad_store_is_refused_by_scan_naming_the_file(capsys, workdir, case):
    root = workdir / "catalogue" / "stores" / case.replace(" ", "-")
    bench = write_unit_store(root / "bench", 20, 16, seed=12, model=MODEL_A).path
    base, good = _base(root, "base")
    make, consistent = STORE_CASES[case]
    shard = _rewrite_shard(base, make(good), consistent)
    res = cli(capsys, "scan", base, "--benchmarks", bench, "-o", root / "scan")
    record(
        "input", "scan", "error" if res.returncode == 2 else f"exit {res.returncode}", input=case
    )
    one_line_error(res, str(base))
    assert not (root / "scan" / "scan.json").exists()
    assert shard.name in res.stderr or str(base / "manifest.json") in res.stderr


def test_truncated_npy_is_refused_naming_it(capsys, workdir):
    root = workdir / "catalogue" / "stores" / "truncated-npy"
    bench = write_unit_store(root / "bench", 20, 16, seed=12, model=MODEL_A).path
    base, _ = _base(root, "base")
    shard = base / "emb" / "00000.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    res = cli(capsys, "scan", base, "--benchmarks", bench, "-o", root / "scan")
    record("input", "scan", "error" if res.returncode == 2 else "other", input="truncated .npy")
    one_line_error(res, str(shard))


def test_stores_from_different_models_are_refused(capsys, workdir):
    root = workdir / "catalogue" / "stores" / "models"
    base = write_unit_store(root / "base", 50, 16, seed=1, model=MODEL_A).path
    bench = write_unit_store(root / "bench", 5, 16, seed=2, model=MODEL_B).path
    res = cli(capsys, "scan", base, "--benchmarks", bench, "-o", root / "scan")
    record("input", "scan", "error", input="stores from different models")
    one_line_error(res, "different similarity models", str(bench))


def test_manifest_that_is_not_json_is_refused(capsys, workdir):
    root = workdir / "catalogue" / "stores" / "manifest"
    base = write_unit_store(root / "base", 50, 16, seed=1, model=MODEL_A).path
    bench = write_unit_store(root / "bench", 5, 16, seed=2, model=MODEL_A).path
    (base / "manifest.json").write_text('{"format": "simgap-store/1", "shards": [')
    res = cli(capsys, "scan", base, "--benchmarks", bench, "-o", root / "scan")
    record("input", "scan", "error", input="manifest not JSON")
    one_line_error(res, str(base / "manifest.json"))


# ------------------------------------------------------------------------------- configs

CONFIG_CASES = {
    "unknown top-level key": ('name = "x"\nsurprise = 1\n', "surprise"),
    "unknown nested key": ("[train.recipe]\nepochs = 1\nepoch = 2\n", "epoch"),
    "wrong type (string for int)": ('[train.recipe]\nepochs = "five"\n', "epochs"),
    "wrong type (float for int)": ("[train.recipe]\nepochs = 2.5\n", "epochs"),
    "wrong type (bool for int)": ("[train.recipe]\nepochs = true\n", "epochs"),
    "wrong type (number for table)": ("train = 3\n", "train"),
    "value out of range": ("[splits.coreset]\nfraction = 1.5\n", "fraction"),
    "not TOML": ("[train\nepochs = 1\n", "TOML"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_config_is_one_line_naming_file_and_key(capsys, workdir, case):
    text, key = CONFIG_CASES[case]
    path = workdir / "catalogue" / "configs" / f"{case.replace(' ', '-')}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    run_dir = path.with_suffix(".run")
    res = cli(capsys, "run", path, "--run-dir", run_dir)
    record("input", "run", "error" if res.returncode == 2 else "other", input=f"config: {case}")
    one_line_error(res, path.name, key)
    assert not run_dir.exists() or not any(run_dir.iterdir()), "a bad config started a run"
