"""The one tar writer: reproducible ustar archives for the world, materialize and the reference set.

Every member gets mode 644, owner 0 and mtime 0, and members are written in the order given, so
the same members give the same bytes on any machine (webdataset's ``TarWriter`` fixes ``mtime``
for the same reason). The bytes are those ``tarfile`` writes for such members in USTAR format;
headers are built from a template because the tarfile path costs more per member than copying
a 40 KB image.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from simgap.data.tars import BLOCK, Sample, ShardError
from simgap.io import write_atomic


def _header_template() -> tuple[bytes, int]:
    h = bytearray(BLOCK)
    h[100:124] = b"0000644\x000000000\x000000000\x00"
    h[136:148] = b"00000000000\x00"  # mtime 0
    h[148:156] = b"        "  # the checksum counts its own field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _header_template()
_MODE_IDS, _MTIME, _TYPE_ON = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]


def tar_header(name: str, size: int) -> bytes:
    """The ustar header of a regular member (mode 644, owner 0, mtime 0)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        return _tarfile_header(name, size)  # a prefix field to fill, or tarfile's error
    field = b"%011o\x00" % size
    checksum = b"%06o\x00 " % (_TEMPLATE_SUM + sum(raw) + sum(field))
    return b"".join((raw.ljust(100, b"\0"), _MODE_IDS, field, _MTIME, checksum, _TYPE_ON))


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def tar_end(written: int) -> bytes:
    """End of archive after ``written`` bytes: two zero blocks, padded to a full record as
    tarfile pads it."""
    return bytes(2 * BLOCK + -(written + 2 * BLOCK) % tarfile.RECORDSIZE)


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A whole archive in memory, members (name, data) in the order given."""
    parts = []
    for name, data in members:
        parts += [tar_header(name, len(data)), data, bytes(-len(data) % BLOCK)]
    body = b"".join(parts)
    return body + tar_end(len(body))


def write_tar(path: Path, samples: Iterable[Sample]) -> None:
    """Write samples as a reproducible tar, each sample's members sorted by extension, under a
    temporary name renamed at the end. ``samples`` may be a generator: one sample is held at a
    time."""

    def write(f: io.BufferedIOBase) -> None:
        f.flush()
        writer = TarWriter(f.fileno())
        try:
            for key, members in samples:
                if "." in key.rpartition("/")[2]:
                    raise ValueError(f"{path}: sample key {key!r} contains a dot (see sample_key)")
                for ext in sorted(members):
                    writer.add(f"{key}.{ext}" if ext else key, members[ext])
            writer.finish()
        finally:
            writer.close()

    write_atomic(path, write)


_CHUNK = 4 << 20  # output written this much at a time (one write call per ~100 images)
_WRITEBACK = 8 << 20  # bytes between writeback starts: large enough for sequential disk writes
_PREADV = hasattr(os, "preadv")
_ZERO_PAD = memoryview(bytes(BLOCK))


class TarWriter:
    """An output tar written to a file descriptor through one reused buffer, with disk writeback
    started behind the writes. Members come from memory (:meth:`add`) or are read by offset from
    another file (:meth:`copy`: one pread per member into the buffer costs ~30% less than a
    header write plus a copy_file_range per member, and a fresh buffer per chunk would cost a
    page fault per 4 KiB)."""

    def __init__(self, out: int):
        self.out, self.buf = out, bytearray(_CHUNK)
        self.view = memoryview(self.buf)
        self.fill = self.written = self.flushed = 0

    def add(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append a member whose bytes are in memory."""
        size = len(data)
        at = self._reserve(size)
        if at is None:  # larger than the buffer
            _write_all(self.out, tar_header(name, size))
            _write_all(self.out, data)
            self._pad_direct(size)
            return
        self.view[at : at + BLOCK] = tar_header(name, size)
        self.view[at + BLOCK : at + BLOCK + size] = data
        self._pad(at + BLOCK + size, size)

    def copy(self, name: str, src: int, offset: int, size: int, source: str) -> None:
        """Append a member whose ``size`` bytes lie at ``offset`` of file descriptor ``src``
        (``source`` names that file in errors)."""
        at = self._reserve(size)
        if at is None:  # larger than the buffer: copied in the kernel
            _write_all(self.out, tar_header(name, size))
            _copy_range(src, self.out, offset, size, source)
            self._pad_direct(size)
            return
        self.view[at : at + BLOCK] = tar_header(name, size)
        data = self.view[at + BLOCK : at + BLOCK + size]
        if not _PREADV or os.preadv(src, [data], offset) != size:
            _read_into(src, data, offset, source)  # a short read: again, to the end or the error
        self._pad(at + BLOCK + size, size)

    def _reserve(self, size: int) -> int | None:
        """Where a member of ``size`` bytes starts in the buffer, or None when it cannot fit."""
        need = BLOCK + size + -size % BLOCK
        if self.fill + need > len(self.buf):
            self.flush()
        return None if need > len(self.buf) else self.fill

    def _pad(self, at: int, size: int) -> None:
        pad = -size % BLOCK
        self.view[at : at + pad] = _ZERO_PAD[:pad]  # the buffer is reused: padding must be written
        self.fill = at + pad

    def _pad_direct(self, size: int) -> None:
        pad = -size % BLOCK
        _write_all(self.out, bytes(pad))
        self.written += BLOCK + size + pad

    def flush(self) -> None:
        _write_all(self.out, self.view[: self.fill])
        self.written += self.fill
        self.fill = 0
        if self.written - self.flushed >= _WRITEBACK:
            _start_writeback(self.out, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def finish(self) -> None:
        """Write the end of the archive."""
        self.flush()
        _write_all(self.out, tar_end(self.written))

    def close(self) -> None:
        self.view.release()


def _copy_range(src: int, dst: int, offset: int, size: int, source: str) -> None:
    """Copy ``size`` bytes at ``offset`` of ``src`` to ``dst``'s position, in the kernel where
    it can (copy_file_range), else through a buffer."""
    while size:
        try:
            n = os.copy_file_range(src, dst, size, offset)
        except OSError:  # other filesystem on an old kernel, or not supported: copy by hand
            data = os.pread(src, size, offset)
            n = len(data) and os.write(dst, data)
        if n == 0:
            raise ShardError(f"{source}: member at {offset} cut ({size} bytes missing)")
        offset, size = offset + n, size - n


def _read_into(fd: int, view: memoryview, offset: int, source: str) -> None:
    while view:
        if _PREADV:
            n = os.preadv(fd, [view], offset)
        else:
            data = os.pread(fd, len(view), offset)
            n = len(data)
            view[:n] = data
        if n == 0:
            raise ShardError(f"{source}: member at {offset} cut ({len(view)} bytes missing)")
        view, offset = view[n:], offset + n


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing a finished range to disk now, without waiting: the final fsync (a done
    record must never point at data a power cut could lose) then waits only for the tail,
    instead of for the whole shard after the copy. On Linux, POSIX_FADV_DONTNEED starts
    writeback of dirty pages (and drops them from the cache once clean: nothing rereads them)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write may write less than asked (signals, some file systems); a short tar is corrupt."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
