"""Webdataset tar shards (img2dataset layout), read safely; written by :mod:`simgap.data.tarwrite`.

Reading streams members in order and groups them by key (the part of the basename before the
first dot, as webdataset does). Only regular files with a plain relative name are read: absolute
names, ``..`` components, links and devices are skipped and counted, never followed or extracted.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

from braceexpand import braceexpand

Sample = tuple[str, dict[str, bytes]]  # key -> {extension: bytes}


class ShardError(ValueError):
    """A shard or shard list cannot be read."""


def is_url(path: str) -> bool:
    return "://" in path


def _url_fs(url: str):  # -> (fsspec filesystem, path inside it)
    import fsspec

    return fsspec.core.url_to_fs(url)


def _expand_url(spec: str) -> list[str]:
    fs, inner = _url_fs(spec)
    if any(c in inner for c in "*?["):
        pattern = inner
    elif "{" not in inner and fs.isdir(inner):
        pattern = inner.rstrip("/") + "/*.tar"
    else:
        return list(braceexpand(spec))  # listing a bucket per shard would cost a request each
    found = sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern))
    if not found:
        raise ShardError(f"{spec}: matches no .tar shards")
    return found


def shard_stat(path: str) -> str:
    """Size and modification stamp of a shard, local or fsspec URL (what a fingerprint hashes)."""
    if not is_url(path):
        st = Path(path).stat()
        return f"{st.st_size}\0{st.st_mtime_ns}"
    fs, inner = _url_fs(path)
    info = fs.info(inner)
    stamp = next((info[k] for k in ("mtime", "ETag", "LastModified", "created") if k in info), "")
    return f"{info.get('size')}\0{stamp}"


def expand_shards(spec: str | Path | list[str]) -> list[str]:
    """Brace pattern (``pool/{00000..00127}.tar``), '::'-joined list, folder or glob → tar paths;
    each may be an fsspec URL (``s3://bucket/pool/{00000..00127}.tar``, ``file://``)."""
    if isinstance(spec, list):
        return [p for s in spec for p in expand_shards(s)]
    spec = str(spec)
    if "::" in spec:
        return expand_shards(spec.split("::"))
    if is_url(spec):
        return _expand_url(spec)
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise ShardError(f"{path}: folder holds no .tar shards")
        return found
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise ShardError(f"{spec}: pattern matches no files")
        return found
    expanded = list(braceexpand(spec))
    missing = [p for p in expanded if not Path(p).exists()]
    if missing:
        raise ShardError(f"{missing[0]}: no such shard ({len(missing)} of {len(expanded)} missing)")
    return expanded


def safe_member_name(name: str) -> bool:
    """A relative name without ``..`` components or backslashes (never written outside a folder)."""
    if name and name[0] != "/" and ".." not in name and "\\" not in name:
        return True  # the common case, without building a path (~10x cheaper)
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def sample_key(name: str) -> str:
    """The key rule: keys never contain dots. A tar member's key is its basename up to the first
    dot (webdataset's rule too), so a key ``a.b`` written as ``a.b.jpg`` would come back as key
    ``a`` with extension ``b.jpg``. Keys taken from file names or table columns map each dot to
    ``_``; a clash this makes (``a.b.jpg`` beside ``a_b.jpg``) is a duplicate key, an error."""
    return name.replace(".", "_")


def image_key(path: str | Path) -> str:
    """An image file's sample key: its name without the extension, under :func:`sample_key`."""
    return sample_key(Path(path).stem)


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.jpg`` → (``dir/abc``, ``jpg``); keys never contain dots."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext if dot else "")


# ----------------------------------------------------------------------------- header walk

BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(BLOCK)
_HANDOVER = frozenset(b"xgLKS")  # pax, GNU long names and sparse files: left to tarfile
_NO_DATA = frozenset(b"123456")  # links, devices, directories, fifos: tarfile skips no data
_NO_DATA_TYPES = tuple(bytes([k]) for k in _NO_DATA)
_REGULAR = frozenset(b"07\0")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


class TarEntry(NamedTuple):
    """One archive member as its header describes it."""

    name: str
    regular: bool  # a regular file (not a link, device, directory or fifo)
    offset: int  # where its data starts in the file
    size: int
    data: bytes | None  # its bytes when the walk reads data; None otherwise, and when cut


class _Blocks:
    """Byte ranges of a file at increasing offsets, read sequentially in large chunks (a header
    walk by seeking is ~10x slower from a cold cache) into one reused buffer (a fresh 4 MiB
    object per chunk costs a page fault per 4 KiB); what lies before the asked range is
    dropped, so skipped member data streams through without being kept."""

    def __init__(self, fh: IO[bytes], base: int = 0, chunk: int = 1 << 22):
        self.fh, self.base = fh, base
        self.buf = bytearray(chunk)
        self.view = memoryview(self.buf)
        self.len = 0  # bytes of buf that hold the file from base on

    def get(self, pos: int, n: int) -> bytes:
        """The ``n`` bytes at ``pos`` (fewer at the end of the file)."""
        i = pos - self.base
        if i + n > self.len:
            self._fill(pos, n)  # the buffer then starts at pos
            return bytes(self.view[: min(n, self.len)])
        return bytes(self.view[i : i + n])

    def _fill(self, pos: int, n: int) -> None:
        held = self.base + self.len - pos  # bytes from pos on already in the buffer
        if held > 0:
            self.buf[:held] = self.view[pos - self.base : self.len]
        else:
            held = 0
            self.base += self.len
            while self.base < pos:  # read and drop what lies before pos
                got = self._read(0, min(pos - self.base, len(self.buf)))
                if not got:
                    self.base, self.len = pos, 0
                    return
                self.base += got
        if n > len(self.buf):  # a member larger than the buffer
            self.view.release()
            self.buf.extend(bytes(n - len(self.buf)))
            self.view = memoryview(self.buf)
        self.base = pos
        while held < n:
            got = self._read(held, len(self.buf))
            if not got:
                break
            held += got
        self.len = held

    def _read(self, start: int, stop: int) -> int:
        return self.fh.readinto(self.view[start:stop]) or 0


def _checksum_ok(h: bytes) -> bool:
    """The header's checksum field matches its bytes; ValueError when it is not a number."""
    stored = int(h[148:156].partition(b"\0")[0].strip() or b"0", 8)
    field = sum(h[148:156])  # the checksum counts its own field as spaces (8 * 32)
    if h.isascii():
        # Below 65521 (512 bytes < 128 each), adler32's low half is 1 + the byte sum: ~10x
        # faster than sum() on 512 bytes, which would cost more than the rest of a header.
        return stored == (zlib.adler32(h) & 0xFFFF) - 1 - field + 256
    if stored == sum(h) - field + 256:
        return True
    return stored == sum(struct.unpack_from("148b8x356b", h)) + 256  # old tars sum signed bytes


class TarWalk:
    """The members of a tar, in order, in one sequential pass: plain ustar/v7 headers are parsed
    here (tarfile's stream reader costs ~50 us a member); pax, GNU long-name and sparse headers,
    and with ``compressed`` a gzip/bzip2/xz tar, are handed to tarfile from that header on.

    Iterating yields a :class:`TarEntry` per member (its data when ``read_data``, for regular
    files). A file whose first header is not a tar header raises ``tarfile.ReadError``. Damage
    after that ends the walk and is named in ``end``:

    ``complete`` the end-of-archive marker, then only zeros; ``cut`` the file ends inside a header
    or a member's data (that member is the last entry, with ``data`` None); ``no_marker`` it ends
    at a header boundary without the marker; ``bad_header`` a header that fails its checksum
    (tarfile would stop there silently); ``trailing_data`` non-zero bytes after the marker.
    A compressed tar's end is ``complete`` unless its stream is cut.
    """

    def __init__(self, fh: IO[bytes], size: int, read_data: bool = False, compressed: bool = False):
        self.fh, self.size, self.read_data, self.compressed = fh, size, read_data, compressed
        self.end: str | None = None

    def __iter__(self) -> Iterator[TarEntry]:
        return self._fast()

    def _fast(self) -> Iterator[TarEntry]:
        # One loop, few calls: per member this is the whole cost of reading a shard.
        blocks, size, read_data = _Blocks(self.fh), self.size, self.read_data
        pos = 0
        while True:
            h = blocks.get(pos, BLOCK)
            if len(h) < BLOCK:
                if pos == 0:
                    yield from self._not_a_tar(h)
                    return
                self.end = "cut" if h else "no_marker"
                return
            if h == _ZEROS:
                self.end = self._tail(blocks, pos)
                return
            try:
                if not _checksum_ok(h):
                    raise ValueError("bad checksum")
                kind = h[156]
                if kind in _HANDOVER or h[124] & 0x80:  # base-256 size: a member over 8 GiB
                    yield from self._tarfile(pos)
                    return
                n = int(h[124:136].partition(b"\0")[0].strip() or b"0", 8)
            except ValueError:
                if pos == 0:
                    yield from self._not_a_tar(h)
                    return
                self.end = "bad_header"
                return
            name = h[:100].partition(b"\0")[0]
            regular = kind in _REGULAR and not (kind == 0 and name.endswith(b"/"))
            if kind == 0x35 or (kind == 0 and not regular):
                name = name.rstrip(b"/")  # a directory, named as tarfile names it
            if h[345]:  # ustar splits long names: prefix "/" name
                name = h[345:500].partition(b"\0")[0] + b"/" + name
            text = name.decode("utf-8", "surrogateescape")
            data = pos + BLOCK
            if not regular and (kind in _NO_DATA or kind == 0):
                yield TarEntry(text, False, data, n, None)
                pos = data
                continue
            body = None
            if data + n <= size and read_data and regular:
                body = blocks.get(data, n)
            if data + n > size or (body is not None and len(body) < n):
                self.end = "cut"
                yield TarEntry(text, regular, data, n, None)
                return
            yield TarEntry(text, regular, data, n, body)
            pos = data + -(-n // BLOCK) * BLOCK

    def _not_a_tar(self, head: bytes) -> Iterator[TarEntry]:
        if not (self.compressed or not head):
            raise tarfile.ReadError("no valid tar header at the start")
        # tarfile reads the compressed stream, or names the problem.
        yield from self._tarfile(0)

    def _tail(self, blocks: _Blocks, pos: int) -> str:
        """How a walk that met zeros (or stopped) at ``pos`` ends."""
        if pos + 2 * BLOCK > self.size:
            return "no_marker"
        if blocks.get(pos, BLOCK) != _ZEROS:
            return "bad_header"
        pos += BLOCK
        while block := blocks.get(pos, 1 << 20):
            if block.count(0) != len(block):
                return "trailing_data"
            pos += len(block)
        return "complete"

    def _tarfile(self, start: int) -> Iterator[TarEntry]:
        self.fh.seek(start)
        plain = not (start == 0 and self.fh.read(6).startswith(_COMPRESSED))
        self.fh.seek(start)
        mode = "r|*" if start == 0 and self.compressed else "r|"
        first = True
        with tarfile.open(fileobj=self.fh, mode=mode, bufsize=1 << 20) as tar:
            while True:
                try:
                    info = tar.next()
                    if info is None:
                        break
                    offset, regular = start + info.offset_data, info.isreg()
                    data, cut = None, False
                    if self.read_data and regular:
                        f = tar.extractfile(info)
                        data = f.read() if f is not None else b""
                        cut = len(data) != info.size  # tarfile returns short data at a cut
                    elif plain and (regular or info.type not in _NO_DATA_TYPES):
                        cut = offset + info.size > self.size
                except (tarfile.ReadError, EOFError, OSError):
                    if first and start == 0:
                        raise
                    self.end = "cut"
                    return
                first = False
                if cut:
                    self.end = "cut"
                    yield TarEntry(info.name, regular, offset, info.size, None)
                    return
                yield TarEntry(info.name, regular, offset, info.size, data)
            end = start + tar.offset
        if not plain:
            self.end = "complete"
            return
        self.fh.seek(end)
        self.end = self._tail(_Blocks(self.fh, end), end)


# ----------------------------------------------------------------------------- samples


def iter_samples(path: str, skipped: Counter[str] | None = None) -> Iterator[Sample]:
    """Yield (key, {ext: bytes}) from a tar; unsafe members and a cut shard's tail are counted in
    ``skipped``.

    A key whose members are not adjacent (``a.jpg b.jpg a.txt``) is split by webdataset into two
    samples; here it raises, because it would silently pair the wrong caption with an image. A cut
    shard (or one without its end-of-archive marker, or with a damaged header) keeps the samples
    before the damage; the sample in progress there is dropped and counted.
    """
    skipped = skipped if skipped is not None else Counter()
    current: str | None = None
    members: dict[str, bytes] = {}
    finished: set[str] = set()
    end: str | None = "cut"
    try:
        with _open_shard(path) as (fh, size):
            walk = TarWalk(fh, size, read_data=True, compressed=True)
            for entry in walk:
                if entry.data is None and entry.regular:
                    break  # the cut member: walk.end says so
                if not entry.regular or not safe_member_name(entry.name):
                    skipped["unsafe_member"] += 1
                    continue
                key, ext = split_name(entry.name)
                if key != current:
                    if current is not None:
                        yield current, members
                        finished.add(current)
                    if key in finished:
                        raise ShardError(f"{path}: members of key {key!r} are not adjacent")
                    current, members = key, {}
                if ext in members:
                    raise ShardError(f"{path}: member {entry.name} appears twice")
                members[ext] = entry.data
            end = walk.end
    except (tarfile.ReadError, EOFError, OSError) as e:
        if current is None and not finished:
            raise ShardError(f"{path}: not a readable tar ({e})") from None
    if end in ("cut", "no_marker", "bad_header"):
        if current is None and not finished:
            raise ShardError(f"{path}: not a readable tar ({end.replace('_', ' ')})")
        # A damaged shard keeps the samples before the damage; the sample at the damage may lack
        # members, so it is dropped and counted.
        skipped["truncated_shard" if end != "bad_header" else "damaged_tail"] += 1
        skipped["truncated_sample"] += 1
        return
    if end == "trailing_data":
        skipped["damaged_tail"] += 1
    if current is not None:
        yield current, members


@contextlib.contextmanager
def _open_shard(path: str) -> Iterator[tuple[IO[bytes], int]]:
    if not is_url(path):
        with open(path, "rb") as fh:
            yield fh, os.fstat(fh.fileno()).st_size
        return
    fs, inner = _url_fs(path)
    with fs.open(inner, "rb") as fh:
        yield fh, fs.size(inner)
