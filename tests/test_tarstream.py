"""simgap.train.tarstream.tar_file_iterator against webdataset's own, member for member."""

import functools
import gzip
import io
import tarfile

import pytest
from webdataset import tariterators

from simgap.train.tarstream import tar_file_iterator

OURS = functools.partial(tar_file_iterator, fallback=tariterators.tar_file_iterator)


def _tar(path, entries, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if data is not None else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "a.jpg"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


ENTRIES = [
    ("a.jpg", b"\xff\xd8" + bytes(range(256)) * 3, tarfile.REGTYPE),
    ("a.txt", "a caption, ünïcode".encode(), tarfile.REGTYPE),
    ("a.json", b"{}", tarfile.REGTYPE),
    ("__meta__", b"skipped by webdataset", tarfile.REGTYPE),
    ("dir/__meta__/x.txt", b"skipped by skip_meta", tarfile.REGTYPE),
    ("somedir", None, tarfile.DIRTYPE),
    ("link.jpg", None, tarfile.SYMTYPE),
    ("empty.txt", b"", tarfile.REGTYPE),
    ("deep/" + "d" * 120 + "/b.jpg", b"long ustar name (prefix field)", tarfile.REGTYPE),
    ("é" * 60 + ".txt", b"a name over 100 bytes in utf-8", tarfile.REGTYPE),
    ("c.jpg", bytes(1025), tarfile.REGTYPE),
]


def _read(reader, path, **kw):
    with open(path, "rb") as fh:
        return [(m["fname"], m["data"]) for m in reader(fh, **kw)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_webdataset(tmp_path, fmt):
    entries = ENTRIES if fmt != tarfile.USTAR_FORMAT else ENTRIES[:-2] + ENTRIES[-1:]
    path = _tar(tmp_path / "s.tar", entries, fmt)
    ours = _read(OURS, path)
    assert ours == _read(tariterators.tar_file_iterator, path)
    assert ("a.txt", "a caption, ünïcode".encode()) in ours and len(ours) >= 6
    kw = dict(rename_files=str.upper, select_files=lambda n: n.endswith(".JPG"))
    assert _read(OURS, path, **kw) == _read(tariterators.tar_file_iterator, path, **kw)


def test_world_shard_and_gzip_shard(tmp_path):
    path = _tar(tmp_path / "s.tar", ENTRIES[:3])
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert _read(OURS, gz) == _read(tariterators.tar_file_iterator, gz) == _read(OURS, path)


def test_a_stream_that_is_not_a_file_goes_to_webdataset(tmp_path):
    path = _tar(tmp_path / "s.tar", ENTRIES[:3])
    calls = []

    def fallback(fileobj, **kw):
        calls.append(kw)
        return tariterators.tar_file_iterator(fileobj, **kw)

    got = list(tar_file_iterator(io.BytesIO(path.read_bytes()), fallback=fallback))
    assert len(calls) == 1 and [m["fname"] for m in got] == ["a.jpg", "a.txt", "a.json"]


def _expand(reader, path, handler):
    """webdataset's expander (what open_clip_train calls) with ``reader`` as its member reader."""
    original = tariterators.tar_file_iterator
    tariterators.tar_file_iterator = reader
    try:
        with open(path, "rb") as fh:
            source = [{"url": str(path), "stream": fh}]
            got = tariterators.tar_file_expander(source, handler=handler)
            return [(m["fname"], m["data"]) for m in got]
    finally:
        tariterators.tar_file_iterator = original


def test_a_cut_shard_keeps_the_members_before_the_cut_and_tells_the_handler(tmp_path):
    path = _tar(tmp_path / "s.tar", ENTRIES[:3] + ENTRIES[-1:])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(bytes(1025)) + 300])  # inside c.jpg
    seen: list[Exception] = []
    ours = _expand(OURS, cut, lambda e: seen.append(e) or True)
    theirs_seen: list[Exception] = []
    theirs = _expand(tariterators.tar_file_iterator, cut, lambda e: theirs_seen.append(e) or True)
    assert ours == theirs == [(n, d) for n, d, _ in ENTRIES[:3]]
    # webdataset tells its handler twice (the member's read, then the next header); once here.
    assert len(seen) == 1 and len(theirs_seen) >= 1
    assert isinstance(seen[0], tarfile.ReadError) and str(cut) in str(seen[0])
    with pytest.raises(tarfile.ReadError, match="end of data"):
        _read(OURS, cut)


def test_not_a_tar_raises_into_the_handler(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(tarfile.ReadError):
        _read(OURS, bad)
    seen: list[Exception] = []
    assert _read(OURS, bad, handler=lambda e: seen.append(e) or True) == []
    assert len(seen) == 1


def test_open_clip_train_reads_through_it(tmp_path):
    """The patch that simgap._train_entry makes reaches webdataset's expander."""
    from simgap._train_entry import _fast_tar_members

    original = tariterators.tar_file_iterator
    try:
        _fast_tar_members()
        _fast_tar_members()  # twice: still one layer
        patched = tariterators.tar_file_iterator
        assert patched.func is tar_file_iterator and patched.keywords["fallback"] is original
        path = _tar(tmp_path / "s.tar", ENTRIES[:3])
        with open(path, "rb") as fh:
            got = list(tariterators.tar_file_expander([{"url": str(path), "stream": fh}]))
        assert [m["fname"] for m in got] == ["a.jpg", "a.txt", "a.json"]
        assert got[0]["__url__"] == str(path)
    finally:
        tariterators.tar_file_iterator = original
