"""The shared tar header walk (TarWalk) against tarfile, and iter_samples on top of it."""

import gzip
import io
import random
import tarfile
from collections import Counter

import pytest

from simgap.data.tars import TarWalk, _checksum_ok, iter_samples
from simgap.data.tarwrite import write_tar


def _info(name, size=0, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = size, kind, link, 1_700_000_000
    info.uname, info.uid = "someone", 1000
    return info


def _tar_bytes(entries, fmt=tarfile.USTAR_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _walk(data, **kw):
    walk = TarWalk(io.BytesIO(data), len(data), **kw)
    return list(walk), walk.end


def _tarfile_view(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [
            (
                m.name,
                m.isreg(),
                m.offset_data,
                m.size,
                tar.extractfile(m).read() if m.isreg() else None,
            )
            for m in tar.getmembers()
        ]


def _mixed_entries():
    rng = random.Random(0)
    blobs = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (0, 1, 511, 512, 513, 3000)]
    entries = [(_info(f"k{i:03d}.bin", len(b)), b) for i, b in enumerate(blobs)]
    entries += [
        (_info("dir", kind=tarfile.DIRTYPE), None),
        (_info("link.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"), None),
        (_info("hard.txt", kind=tarfile.LNKTYPE, link="k000.bin"), None),
        (_info("fifo", kind=tarfile.FIFOTYPE), None),
        (_info("ünïcødé/数据.txt", 3), b"abc"),
        (_info("deep/" * 25 + "x.jpg", 5), b"hello"),  # 130 bytes: a ustar prefix
    ]
    return entries


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_walk_gives_what_tarfile_gives(fmt):
    entries = _mixed_entries()
    if fmt != tarfile.USTAR_FORMAT:  # names ustar cannot hold: pax / GNU long-name headers
        entries.append((_info("long" * 60 + ".txt", 2), b"ok"))
    data = _tar_bytes(entries, fmt)
    got, end = _walk(data, read_data=True)
    assert [tuple(e) for e in got] == _tarfile_view(data)
    assert end == "complete"
    headers_only, _ = _walk(data)
    assert [e[:4] for e in headers_only] == [e[:4] for e in got]
    assert all(e.data is None for e in headers_only)


def test_checksum_fast_path_agrees_with_tarfile():
    rng = random.Random(1)
    for trial in range(3000):
        h = bytearray(_tar_bytes([(_info(f"k{trial}.jpg", trial), bytes(trial))])[:512])
        if trial % 3 == 1:  # non-ASCII bytes somewhere: the slow path
            h[rng.randrange(265, 512)] = rng.randrange(128, 256)
        if trial % 5 == 2:  # any byte changed
            h[rng.randrange(512)] ^= 1 << rng.randrange(8)
        true = tarfile.calc_chksums(bytes(h))[0]
        if trial % 7 == 3:  # a stored sum off by adler32's modulus: must not pass
            h[148:156] = b"%06o\x00 " % (true + 65521)
        try:
            expected = tarfile.nti(bytes(h[148:156])) in tarfile.calc_chksums(bytes(h))
        except tarfile.InvalidHeaderError:
            with pytest.raises(ValueError):
                _checksum_ok(bytes(h))
            continue
        assert _checksum_ok(bytes(h)) == expected, trial


def _samples(n):
    return [
        (f"s{i:03d}", {"jpg": bytes([i]) * (300 + i), "txt": f"c{i}".encode()}) for i in range(n)
    ]


@pytest.fixture
def good(tmp_path):
    write_tar(tmp_path / "g.tar", _samples(6))
    return (tmp_path / "g.tar").read_bytes()


def test_walk_names_how_an_archive_ends(good):
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        members = tar.getmembers()
    last = members[-1]
    end_of_data = last.offset_data + 512 * -(-last.size // 512)
    cases = {
        "complete": good,
        "cut": good[: members[4].offset_data + 7],  # inside a member's data
        "cut ": good[: members[5].offset + 100],  # inside a header
        "no_marker": good[:end_of_data],
        "no_marker ": good[: end_of_data + 512],  # one zero block only
        "bad_header": good[: members[4].offset] + b"\x07" * 512 + good[members[4].offset + 512 :],
        "trailing_data": good + b"junk" + bytes(508),
    }
    for want, data in cases.items():
        got, end = _walk(data, read_data=True)
        assert end == want.strip(), want
        whole = [e for e in got if e.data is not None]
        assert (
            whole
            == [e for e in _walk(good, read_data=True)[0] if e.offset < len(data)][: len(whole)]
        )
        if want.strip() == "cut" and got and got[-1].offset + got[-1].size > len(data):
            assert got[-1].data is None


def test_walk_refuses_a_non_tar_and_hands_compressed_tars_to_tarfile(good):
    for junk in (b"", b"not a tar" * 100, gzip.compress(good)):
        with pytest.raises(tarfile.ReadError):
            _walk(junk)
    got, end = _walk(gzip.compress(good), read_data=True, compressed=True)
    assert [e.data for e in got] == [e.data for e in _walk(good, read_data=True)[0]]
    assert end == "complete"


def test_iter_samples_reads_compressed_and_long_named_tars(tmp_path, good):
    (tmp_path / "g.tar.gz").write_bytes(gzip.compress(good))
    assert list(iter_samples(str(tmp_path / "g.tar.gz"))) == _samples(6)
    long_key = "long" * 40
    data = _tar_bytes(
        [
            (_info("a.jpg", 1), b"x"),
            (_info(f"{long_key}.jpg", 1), b"y"),
            (_info(f"{long_key}.txt", 1), b"z"),
        ],
        tarfile.GNU_FORMAT,
    )
    (tmp_path / "l.tar").write_bytes(data)
    assert list(iter_samples(str(tmp_path / "l.tar"))) == [
        ("a", {"jpg": b"x"}),
        (long_key, {"jpg": b"y", "txt": b"z"}),
    ]


def test_iter_samples_counts_damage_and_drops_the_sample_at_it(tmp_path, good):
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        members = tar.getmembers()
    at = members[5].offset  # s002.txt: sample s002 is in progress there
    cases = {
        "bad_header": (good[:at] + b"\x07" * 512 + good[at + 512 :], "damaged_tail"),
        "no_marker": (good[: members[-1].offset_data + 512], "truncated_shard"),
        "cut": (good[: at + 200], "truncated_shard"),
    }
    for what, (data, counter) in cases.items():
        (tmp_path / "d.tar").write_bytes(data)
        skipped = Counter()
        got = list(iter_samples(str(tmp_path / "d.tar"), skipped))
        n = 2 if what != "no_marker" else 5
        assert got == _samples(6)[:n], what
        assert skipped == {counter: 1, "truncated_sample": 1}, what
    (tmp_path / "t.tar").write_bytes(good + b"junk" + bytes(508))
    skipped = Counter()
    assert list(iter_samples(str(tmp_path / "t.tar"), skipped)) == _samples(6)
    assert skipped == {"damaged_tail": 1}


def test_iter_samples_reads_what_tarfile_reads(tmp_path):
    write_tar(tmp_path / "a.tar", _samples(40))
    with tarfile.open(tmp_path / "a.tar") as tar:
        want: dict[str, dict[str, bytes]] = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            want.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert list(iter_samples(str(tmp_path / "a.tar"))) == list(want.items())


def _tarfile_reference(members):
    """What tarfile writes for these members with the writer's fixed mode, owner and mtime."""
    entries = []
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        entries.append((info, data))
    return _tar_bytes(entries)


def test_the_tar_writer_writes_tarfiles_bytes(tmp_path):
    """data.tarwrite builds headers from a template; the bytes must stay tarfile's (reruns and
    materialize's copies by offset are compared byte for byte)."""
    from simgap.data.tarwrite import tar_bytes

    rng = random.Random(0)
    samples = [
        (f"k{i:03d}", {"jpg": rng.randbytes(rng.randint(0, 2000)), "txt": f"c{i}".encode()})
        for i in range(20)
    ]
    samples += [
        ("d" * 60 + "/" + "x" * 60, {"jpg": b"a name in the ustar prefix field"}),
        ("ünï", {"": b"no extension", "txt": b"non-ASCII key"}),
        ("empty", {"jpg": b""}),
        ("big", {"bin": bytes((4 << 20) + 3)}),  # larger than the writer's buffer
    ]
    members = [(f"{k}.{e}" if e else k, m[e]) for k, m in samples for e in sorted(m)]
    want = _tarfile_reference(members)
    write_tar(tmp_path / "a.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == want
    assert tar_bytes(members) == want
    write_tar(tmp_path / "e.tar", [])
    assert (tmp_path / "e.tar").read_bytes() == _tarfile_reference([])
