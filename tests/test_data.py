import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from simgap.data.images import decode_rgb
from simgap.data.sources import image_folder_items, shard_tasks
from simgap.data.tars import ShardError, expand_shards, iter_samples
from simgap.data.tarwrite import write_tar


def _jpeg(color=(200, 10, 10), size=(8, 8), mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


def _samples(n, prefix="k"):
    return [
        (f"{prefix}{i:04d}", {"jpg": _jpeg(), "txt": f"caption {i}".encode(), "json": b"{}"})
        for i in range(n)
    ]


def test_write_tar_is_reproducible_and_webdataset_reads_it(tmp_path):
    write_tar(tmp_path / "a.tar", _samples(5))
    write_tar(tmp_path / "b.tar", _samples(5))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    got = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"k{i:04d}" for i in range(5)]
    assert got[3]["txt"] == b"caption 3"


def test_iter_samples_groups_members(tmp_path):
    write_tar(tmp_path / "a.tar", _samples(3))
    got = list(iter_samples(str(tmp_path / "a.tar")))
    assert [k for k, _ in got] == ["k0000", "k0001", "k0002"]
    assert set(got[0][1]) == {"jpg", "txt", "json"}


def _raw_tar(path, entries):
    with tarfile.open(path, "w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _info(name, size=0, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def test_hostile_members_are_skipped_and_counted(tmp_path):
    ok = b"hello"
    _raw_tar(
        tmp_path / "h.tar",
        [
            (_info("../evil.txt", len(ok)), ok),
            (_info("/abs.txt", len(ok)), ok),
            (_info("link.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"), None),
            (_info("hard.txt", kind=tarfile.LNKTYPE, link="good.txt"), None),
            (_info("dev", kind=tarfile.CHRTYPE), None),
            (_info("good.txt", len(ok)), ok),
        ],
    )
    skipped = Counter()
    got = list(iter_samples(str(tmp_path / "h.tar"), skipped))
    assert got == [("good", {"txt": ok})]
    assert skipped["unsafe_member"] == 5


def test_truncated_tar_keeps_what_was_read(tmp_path):
    write_tar(tmp_path / "a.tar", _samples(20))
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    skipped = Counter()
    got = list(iter_samples(str(tmp_path / "cut.tar"), skipped))
    assert 0 < len(got) < 20
    assert skipped["truncated_shard"] == 1


def test_not_a_tar_and_empty_file_are_clear_errors(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match="x.tar: not a readable tar"):
        list(iter_samples(str(tmp_path / "x.tar")))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="empty.tar"):
        list(iter_samples(str(tmp_path / "empty.tar")))


def test_non_adjacent_members_refused(tmp_path):
    _raw_tar(
        tmp_path / "n.tar",
        [(_info("a.jpg", 1), b"x"), (_info("b.jpg", 1), b"y"), (_info("a.txt", 1), b"z")],
    )
    with pytest.raises(ShardError, match="not adjacent"):
        list(iter_samples(str(tmp_path / "n.tar")))


def test_expand_shards_forms(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", _samples(1, prefix=f"s{i}"))
    expected = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == expected
    assert expand_shards(tmp_path) == expected
    assert expand_shards("::".join(expected[:2])) == expected[:2]
    assert expand_shards(str(tmp_path / "*.tar")) == expected
    with pytest.raises(ShardError, match="00008.tar: no such shard"):
        expand_shards(str(tmp_path / "{00008..00009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="holds no .tar"):
        expand_shards(tmp_path / "empty")


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_image"),
        (None, "missing_image"),
        (b"\xff\xd8\xff\xe0garbage", "corrupt_image"),
    ],
)
def test_undecodable_images_counted(data, reason):
    skipped = Counter()
    assert decode_rgb(data, skipped) is None
    assert skipped == {reason: 1}


def test_truncated_jpeg_counted():
    skipped = Counter()
    assert decode_rgb(_jpeg(size=(64, 64))[:100], skipped) is None
    assert skipped["corrupt_image"] == 1


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_non_rgb_images_converted(mode):
    color = {
        "L": 128,
        "CMYK": (0, 0, 0, 0),
        "P": 3,
        "RGBA": (0, 0, 0, 0),
        "LA": (0, 0),
        "I;16": 40000,
    }[mode]
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    skipped = Counter()
    img = decode_rgb(_jpeg(color, mode=mode, fmt=fmt), skipped)
    assert img is not None and img.mode == "RGB" and not skipped
    if mode in ("RGBA", "LA"):  # fully transparent pixels composite to white, not black
        assert np.asarray(img).min() == 255


def test_decompression_bomb_counted(monkeypatch):
    import simgap.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    skipped = Counter()
    assert decode_rgb(_jpeg(size=(20, 20)), skipped) is None
    assert skipped["oversized_image"] == 1


def test_image_folder_with_class_subset(tmp_path):
    root = tmp_path / "bench"
    for cls in ["star", "circle", "unused"]:
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{cls}-{i}.jpg").write_bytes(_jpeg())
    (root / "classnames.txt").write_text("star\ncircle\n")
    items = image_folder_items(root)
    assert [(k, lbl) for k, _, lbl in items] == [
        ("star-0", 0),
        ("star-1", 0),
        ("circle-0", 1),
        ("circle-1", 1),
    ]
    tasks = shard_tasks(root, shard_size=3)
    assert [len(t.files) for t in tasks] == [3, 1]
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        image_folder_items(tmp_path / "missing")
    (root / "classnames.txt").write_text("star\nsquare\n")
    with pytest.raises(FileNotFoundError, match="square"):
        image_folder_items(root)


def test_repeated_member_is_refused_not_overwritten(tmp_path):
    # Two adjacent "a.jpg" members would otherwise silently keep only the second image.
    _raw_tar(tmp_path / "r.tar", [(_info("a.jpg", 1), b"x"), (_info("a.jpg", 1), b"y")])
    with pytest.raises(ShardError, match="r.tar: member a.jpg appears twice"):
        list(iter_samples(str(tmp_path / "r.tar")))
