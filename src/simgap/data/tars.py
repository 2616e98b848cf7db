"""Webdataset tar shards (img2dataset layout), read and written safely and reproducibly.

Reading streams members in order and groups them by key (the part of the basename before the
first dot, as webdataset does). Only regular files with a plain relative name are read: absolute
names, ``..`` components, links and devices are skipped and counted, never followed or extracted.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from braceexpand import braceexpand

from simgap.io import write_atomic

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
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.jpg`` → (``dir/abc``, ``jpg``); keys never contain dots."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext if dot else "")


def iter_samples(path: str, skipped: Counter[str] | None = None) -> Iterator[Sample]:
    """Yield (key, {ext: bytes}) from a tar; unsafe members and a cut shard's tail are counted in
    ``skipped``.

    A key whose members are not adjacent (``a.jpg b.jpg a.txt``) is split by webdataset into two
    samples; here it raises, because it would silently pair the wrong caption with an image.
    """
    skipped = skipped if skipped is not None else Counter()
    current: str | None = None
    members: dict[str, bytes] = {}
    finished: set[str] = set()
    try:
        with _open_shard(path) as (fh, size), tarfile.open(fileobj=fh, mode="r|*") as tar:
            for info in tar:
                if not info.isreg() or not safe_member_name(info.name):
                    skipped["unsafe_member"] += 1
                    continue
                key, ext = split_name(info.name)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    # tarfile returns short data at a cut instead of raising.
                    raise EOFError(f"member {info.name} cut at {len(data)} of {info.size} bytes")
                if key != current:
                    if current is not None:
                        yield current, members
                        finished.add(current)
                    if key in finished:
                        raise ShardError(f"{path}: members of key {key!r} are not adjacent")
                    current, members = key, {}
                if ext in members:
                    raise ShardError(f"{path}: member {info.name} appears twice")
                members[ext] = data
            # tarfile takes a missing end-of-archive marker for the end: check it is there.
            if path.endswith(".tar") and size < tar.offset + 1024:
                raise EOFError("no end-of-archive marker")
    except (tarfile.ReadError, EOFError, OSError) as e:
        if current is None and not finished:
            raise ShardError(f"{path}: not a readable tar ({e})") from None
        # A cut shard keeps the samples before the damage; the sample at the cut may lack members.
        skipped["truncated_shard"] += 1
        skipped["truncated_sample"] += 1
        return
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


def write_tar(path: Path, samples: list[Sample]) -> None:
    """Write samples as a reproducible tar: sorted members, fixed mtime and owner."""

    def write(f: io.BufferedIOBase) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for ext in sorted(members):
                    data = members[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))

    write_atomic(path, write)
