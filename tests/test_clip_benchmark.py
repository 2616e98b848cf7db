"""simgap.data.clip_benchmark: CLIP_benchmark's local wds layout, read and written."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pytest
from PIL import Image

from simgap.data.clip_benchmark import (
    is_wds_benchmark,
    iter_wds,
    read_wds_classnames,
    read_wds_templates,
    wds_shards,
    write_wds,
)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_write_then_read_round_trip(tmp_path):
    samples = [(f"s{i:07d}", "png", _png((i * 40, 0, 0)), i % 3) for i in range(5)]
    paths = write_wds(tmp_path, ["cat", "dog", "bird"], ["a photo of a {c}."], samples, n_shards=2)
    assert is_wds_benchmark(tmp_path)
    assert (tmp_path / "test" / "nshards.txt").read_text() == "2\n"
    assert wds_shards(tmp_path) == paths == [str(tmp_path / "test" / f"{i}.tar") for i in (0, 1)]
    assert read_wds_classnames(tmp_path) == ["cat", "dog", "bird"]
    assert read_wds_templates(tmp_path) == ["a photo of a {c}."]
    got = list(iter_wds(tmp_path))
    assert [(k, img, label) for k, _, img, label in samples] == got


def test_image_member_preference_and_skips_counted(tmp_path):
    root = tmp_path / "b"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("a\nb\n")
    (root / "test" / "nshards.txt").write_text("1")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        _add(tar, "k0.cls", b"1")
        _add(tar, "k0.jpg", b"JPG")
        _add(tar, "k0.webp", b"WEBP")  # webp is CLIP_benchmark's first choice
        _add(tar, "k1.cls", b"0")  # no image
        _add(tar, "k2.png", b"PNG")  # no label
        _add(tar, "k3.cls", b"x")
        _add(tar, "k3.png", b"PNG")
        _add(tar, "k4.cls", b" 0\n")
        _add(tar, "k4.jpeg", b"JPEG")
    skipped: Counter[str] = Counter()
    assert list(iter_wds(root, skipped=skipped)) == [("k0", b"WEBP", 1), ("k4", b"JPEG", 0)]
    assert skipped == Counter(missing_image=1, missing_label=1, bad_label=1)


def test_bad_layouts_name_the_file(tmp_path):
    assert not is_wds_benchmark(tmp_path)
    (tmp_path / "classnames.txt").write_text("a\n\nb\n")
    assert not is_wds_benchmark(tmp_path)  # no split folder with nshards.txt
    with pytest.raises(FileNotFoundError, match="nshards.txt"):
        wds_shards(tmp_path)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("two")
    assert is_wds_benchmark(tmp_path)
    with pytest.raises(ValueError, match="shard count"):
        wds_shards(tmp_path)
    (tmp_path / "test" / "nshards.txt").write_text("3")
    with pytest.raises(FileNotFoundError, match=r"0\.tar: shard missing \(3 of 3"):
        wds_shards(tmp_path)
    with pytest.raises(ValueError, match="line 2 is blank"):
        read_wds_classnames(tmp_path)
    with pytest.raises(FileNotFoundError, match="zeroshot_classification_templates.txt"):
        read_wds_templates(tmp_path)
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {}\n")
    with pytest.raises(ValueError, match="without"):
        read_wds_templates(tmp_path)
