"""Split files, key lists, and materializing a split into training shards.

A split folder holds ``keys.parquet`` (column ``key``, sorted), ``keys.txt`` (the same keys, one
per line, UTF-8) and ``split.json`` (how it was made). A key list (folder, ``.txt`` or
``.parquet``) is all a loader needs to apply a split on the fly to the source shards.

Materialize runs in two parallel phases through the executor:

1. index, one task per input shard: read the tar's headers only, note where each member of a
   kept sample lies (offset, size); unsafe members (absolute, ``..``, links, devices) are skipped
   and counted, a cut or damaged tar keeps what precedes the damage and counts the rest;
2. write, one task per output shard: copy the kept members' bytes by offset into a reproducible
   tar, one sample at a time. Output shards hold ``shard_size`` samples each (resharded across
   input boundaries), or mirror the input shards when ``shard_size`` is None.

Each task leaves a done record tied to its inputs, so a killed run resumes where it stopped.
Archive members are never extracted: the only files written are the output folder's own.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from simgap.data.keylist import read_key_list
from simgap.data.sources import image_folder_items, read_classnames
from simgap.data.tars import ShardError, expand_shards, safe_member_name, split_name, write_tar
from simgap.io import read_json, sha256_bytes, write_atomic, write_bytes, write_json, write_parquet
from simgap.parallel import Executor, LocalEngine, Progress

Member = tuple[str, int, int]  # extension, data offset in the tar, size


# ----------------------------------------------------------------------------- split files


def write_split(folder: Path, keys: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Write keys.parquet, keys.txt and split.json (last: a split is complete iff it exists)."""
    keys = sorted(keys)
    folder = Path(folder)
    write_parquet(folder / "keys.parquet", pa.table({"key": pa.array(keys, pa.string())}))
    write_bytes(folder / "keys.txt", "".join(f"{k}\n" for k in keys).encode())
    meta = {**meta, "size": len(keys), "keys_sha256": sha256_bytes("\n".join(keys).encode())}
    write_json(folder / "split.json", meta)
    return meta


def read_split(folder: Path) -> tuple[set[str], dict[str, Any]]:
    folder = Path(folder)
    meta = read_json(folder / "split.json")
    return set(read_key_list(folder, allow_empty=True)), meta


@functools.lru_cache(maxsize=2)
def _key_set(path: str, _mtime_ns: int) -> frozenset[str]:
    # Cached per process: every index task of a worker reads the same list.
    return frozenset(read_key_list(path, allow_empty=True))


def _refuse_broken(split: Path) -> None:
    """A gap-matched split whose guarantee check failed must not become training data."""
    meta_path = split / "split.json"
    if split.is_dir() and meta_path.is_file():
        guarantee = read_json(meta_path).get("guarantee") or {}
        if guarantee.get("holds") is False:
            raise ValueError(
                f"{meta_path}: the gap-matching guarantee does not hold "
                f"({guarantee.get('violations')} violations); refusing to materialize it"
            )


def _keys_path(split: Path | str) -> Path:
    path = Path(split)
    return path / "keys.parquet" if path.is_dir() else path


# ----------------------------------------------------------------------------- phase 1: index


def _file_fingerprint(path: str) -> str:
    st = os.stat(path)
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


def _tail_is_zeros(fh: io.BufferedReader, offset: int) -> bool:
    """A tar ends with zero blocks; tarfile stops silently at a bad header mid-file, so
    anything but zeros after the last member means members were lost."""
    fh.seek(offset)
    while block := fh.read(1 << 20):
        if block.count(0) != len(block):
            return False
    return True


Entry = tuple[str, bool, int, int]  # member name, regular file, data offset, size
_BLOCK = tarfile.BLOCKSIZE
_REGULAR = (b"0", b"\0", b"7")
_ZEROS = bytes(_BLOCK)


class _NeedTarfile(Exception):
    """A header kind the fast walk leaves to tarfile (pax, GNU long names, sparse, base-256)."""


class _Sequential:
    """Blocks of a file at increasing offsets, read sequentially in large chunks (a header walk
    by seeking is ~10x slower from a cold cache). Skipped member data streams through."""

    def __init__(self, fh: io.BufferedReader, chunk: int = 1 << 22):
        self.fh, self.chunk = fh, chunk
        self.buf, self.base = b"", 0

    def block(self, pos: int) -> bytes:
        """The 512 bytes at ``pos`` (fewer at the end of the file)."""
        while pos + _BLOCK > self.base + len(self.buf):
            drop = min(max(0, pos - self.base), len(self.buf))
            self.base += drop
            self.buf = self.buf[drop:]
            more = self.fh.read(self.chunk)
            if not more:
                break
            self.buf += more
        i = pos - self.base
        return self.buf[i : i + _BLOCK]

    def rest_is_zeros(self, pos: int) -> bool:
        while block := self.block(pos):
            if block != _ZEROS[: len(block)]:
                return False
            pos += len(block)
        return True


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _NeedTarfile("base-256 number")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _fast_entries(fh: io.BufferedReader, size: int, skipped: Counter[str]) -> list[Entry]:
    """Walk plain ustar/v7 headers; a cut or a bad header ends the walk and is counted."""
    reader, pos, out = _Sequential(fh), 0, []
    while True:
        h = reader.block(pos)
        if len(h) < _BLOCK:
            if not out:
                raise tarfile.ReadError("no tar header")
            skipped["truncated_shard" if h else "damaged_tail"] += 1
            return out
        if h == _ZEROS:
            if pos + 2 * _BLOCK > size or not reader.rest_is_zeros(pos):
                skipped["damaged_tail"] += 1
            return out
        try:
            chksum = _octal(h[148:156])
        except ValueError:
            chksum = -1
        if chksum != sum(h[:148]) + 256 + sum(h[156:]):
            if not out:
                raise tarfile.ReadError("invalid header")
            skipped["damaged_tail"] += 1  # a bad header: tarfile would stop here silently
            return out
        kind = h[156:157]
        if kind in (b"x", b"g", b"L", b"K", b"S"):
            raise _NeedTarfile(kind.decode())
        name = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345:346] != b"\0":
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        n = _octal(h[124:136])
        data = pos + _BLOCK
        out.append((name.decode("utf-8", "surrogateescape"), kind in _REGULAR, data, n))
        if data + n > size:
            skipped["truncated_shard"] += 1
            return out
        pos = data + -(-n // _BLOCK) * _BLOCK


def _tarfile_entries(fh: io.BufferedReader, size: int, skipped: Counter[str]) -> list[Entry]:
    """The same walk through tarfile, for the header kinds the fast walk does not parse."""
    fh.seek(0)
    out: list[Entry] = []
    with tarfile.open(fileobj=fh, mode="r|", bufsize=1 << 20) as tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.ReadError, EOFError):
                if not out:
                    raise
                skipped["truncated_shard"] += 1
                return out
            if info is None:
                break
            out.append((info.name, info.isreg(), info.offset_data, info.size))
            if info.offset_data + info.size > size:
                skipped["truncated_shard"] += 1
                return out
        end = tar.offset
    if size < end + 2 * _BLOCK or not _tail_is_zeros(fh, end):
        skipped["damaged_tail"] += 1
    return out


def index_tar(path: str, keep: frozenset[str] | set[str]) -> dict[str, Any]:
    """Where the kept samples' members lie in one tar, without reading their bytes."""
    skipped: Counter[str] = Counter()
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            try:
                entries = _fast_entries(fh, size, skipped)
            except _NeedTarfile:
                skipped.clear()
                entries = _tarfile_entries(fh, size, skipped)
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise ShardError(f"{path}: not a readable tar ({e})") from None
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    bad: set[str] = set()
    for name, regular, offset, n in entries:
        # The plain check first: a name with no "/" prefix, "..", or "\\" is safe.
        plain = name and name[0] != "/" and ".." not in name and "\\" not in name
        if not regular or not (plain or safe_member_name(name)):
            skipped["unsafe_member"] += 1
            continue
        key, ext = split_name(name)
        if key not in keep:
            continue
        if offset + n > size:
            bad.add(key)  # a member cut by a truncated file
            continue
        if ext in samples.setdefault(key, {}):
            bad.add(key)
            skipped["duplicate_member"] += 1
        samples[key][ext] = (offset, n)
    kept = [
        [k, [[ext, off, n] for ext, (off, n) in sorted(m.items())]]
        for k, m in samples.items()
        if k not in bad
    ]
    return {"samples": kept, "corrupt": len(bad), "skipped": dict(sorted(skipped.items()))}


@dataclass(frozen=True)
class IndexShard:
    """Phase 1 worker: index one input shard (reused when its inputs are unchanged)."""

    keys: str  # key list file
    out: str

    def __call__(self, task: tuple[str, str]) -> dict[str, Any]:
        name, tar = task
        keys_path = Path(self.keys)
        fingerprint = sha256_bytes(
            f"{_file_fingerprint(tar)}\0{_file_fingerprint(str(keys_path))}".encode()
        )
        done = Path(self.out) / ".index" / f"{name}.json"
        if done.exists():
            record = read_json(done)
            if record.get("fingerprint") == fingerprint:
                return record
        keep = _key_set(str(keys_path), keys_path.stat().st_mtime_ns)
        record = {"name": name, "source": tar, "fingerprint": fingerprint, **index_tar(tar, keep)}
        record["rows"] = len(record["samples"])
        # Compact: an index record lists every kept member of the shard.
        write_bytes(done, json.dumps(record, separators=(",", ":")).encode())
        return record


# ----------------------------------------------------------------------------- phase 2: write


def _header_template() -> tuple[bytes, int]:
    h = bytearray(_BLOCK)
    h[100:124] = b"0000644\x000000000\x000000000\x00"
    h[136:148] = b"00000000000\x00"  # mtime 0
    h[148:156] = b"        "  # the checksum counts its own field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def _tar_header(name: str, size: int) -> bytes:
    """The ustar header ``write_tar`` writes (mode 644, owner 0, mtime 0), built from a template:
    the tarfile path costs more per member than copying a 40 KB image."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        return _tarfile_header(name, size)
    h = bytearray(_TEMPLATE)
    h[: len(raw)] = raw
    field = b"%011o\x00" % size
    h[124:136] = field
    h[148:156] = b"%06o\x00 " % (_TEMPLATE_SUM + sum(raw) + sum(field))
    return bytes(h)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)

    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


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


def write_plan_tar(path: Path, plan: list[tuple[str, str, list[Member]]]) -> None:
    """Copy (source tar, key, members) into ``path`` as a reproducible tar (the same bytes as
    ``write_tar`` would give): headers written here, member bytes copied by offset."""

    def write(f: io.BufferedIOBase) -> None:
        f.flush()
        out = f.fileno()
        fds: dict[str, int] = {}
        pending = bytearray()  # padding and headers, written just before the next copy
        written = 0
        try:
            for source, key, members in plan:
                if source not in fds:
                    fds[source] = os.open(source, os.O_RDONLY)
                for ext, offset, size in members:
                    pending += _tar_header(f"{key}.{ext}" if ext else key, size)
                    _write_all(out, pending)
                    written += len(pending) + size
                    _copy_range(fds[source], out, offset, size, source)
                    pending = bytearray(-size % _BLOCK)
            # End of archive: two zero blocks, padded to a full record like tarfile does.
            end = written + len(pending) + 2 * _BLOCK
            pending += bytes(2 * _BLOCK + -end % tarfile.RECORDSIZE)
            _write_all(out, pending)
        finally:
            for fd in fds.values():
                os.close(fd)

    write_atomic(path, write)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """os.write may write less than asked (signals, some file systems); a short tar is corrupt."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True)
class WriteShard:
    """Phase 2 worker: write one output shard from its plan (reused when the plan is unchanged)."""

    out: str

    def __call__(self, task: tuple[str, str, list[tuple[str, str, list[Member]]]]) -> dict:
        name, fingerprint, plan = task
        tar = Path(self.out) / f"{name}.tar"
        done = Path(self.out) / ".done" / f"{name}.json"
        if done.exists() and tar.exists():
            record = read_json(done)
            if record.get("fingerprint") == fingerprint:
                return record
        write_plan_tar(tar, plan)
        record = {
            "name": name,
            "rows": len(plan),
            "bytes": sum(n for _, _, ms in plan for _, _, n in ms),
            "fingerprint": fingerprint,
        }
        write_json(done, record)
        return record


def plan_shards(
    records: list[dict[str, Any]], shard_size: int | None
) -> tuple[list[tuple[str, list]], int]:
    """Output shards as (name, [(source, key, members)]) and the number of duplicate keys
    dropped (a key kept in an earlier input shard)."""
    seen: set[str] = set()
    per_input: list[list[tuple[str, str, list]]] = []
    duplicates = 0
    for r in records:
        part = []
        for key, members in r["samples"]:
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            part.append((r["source"], key, [tuple(m) for m in members]))
        per_input.append(part)
    if shard_size is None:
        shards = [(r["name"], p) for r, p in zip(records, per_input, strict=True) if p]
        return shards, duplicates
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, not {shard_size}")
    flat = [s for p in per_input for s in p]
    return [
        (f"{i:05d}", flat[start : start + shard_size])
        for i, start in enumerate(range(0, len(flat), shard_size))
    ], duplicates


# ----------------------------------------------------------------------------- reference set


def reference_samples(reference: Path, template: str) -> list[tuple[str, dict[str, bytes]]]:
    """The reference set as webdataset samples with a templated caption (the paper's
    ``a photo of a {class}``)."""
    classes = (
        read_classnames(Path(reference) / "classnames.txt")
        if (Path(reference) / "classnames.txt").exists()
        else None
    )
    samples = []
    for key, path, label in image_folder_items(Path(reference)):
        name = classes[label] if classes else Path(path).parent.name
        caption = template.format(c=name)
        members = {
            "jpg": Path(path).read_bytes(),
            "txt": caption.encode(),
            "json": json.dumps({"key": key, "caption": caption, "label": label}).encode(),
        }
        samples.append((key, members))
    return samples


def _write_reference(out: Path, reference: Path, template: str, shard_size: int) -> dict[str, int]:
    samples = reference_samples(reference, template)
    sizes = {}
    for i, start in enumerate(range(0, len(samples), shard_size)):
        name = f"ref-{i:05d}.tar"
        part = samples[start : start + shard_size]
        write_tar(out / name, part)  # small and reproducible: rewritten, never stale
        sizes[name] = len(part)
    return sizes


# ----------------------------------------------------------------------------- materialize


def materialize(
    split: Path,
    source: str,
    out: Path,
    reference: Path | None = None,
    caption_template: str = "a photo of a {c}",
    shard_size: int | None = None,
    executor: Executor | None = None,
    keys_only: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the split's samples (every member) as shards, plus the reference set; returns the
    counts and the '::'-joined shard list that open_clip_train reads.

    ``split``: a split folder or a key list file. ``shard_size``: samples per output shard
    (None: one output shard per input shard). ``keys_only``: write only the key list of the
    samples found (``keys.txt``, ``keys.parquet``) and ``sources.json`` (input shard → kept
    count) for a loader that filters the source shards on the fly."""
    out = Path(out)
    _refuse_broken(Path(split))
    keys_path = _keys_path(split)
    wanted = read_key_list(keys_path, allow_empty=True)
    tars = expand_shards(source)
    executor = executor or Executor(LocalEngine(1))
    tasks = [(f"{i:05d}", t) for i, t in enumerate(tars)]
    records = executor.map(
        IndexShard(str(keys_path), str(out)), tasks, on_done=Progress("materialize: index", log)
    )
    shards, duplicates = plan_shards(records, shard_size)
    # A plan is a function of the index records and the shard size: hash those, not the plan.
    inputs = sha256_bytes(f"{shard_size}\0{[r['fingerprint'] for r in records]}".encode())
    tasks = [(name, sha256_bytes(f"{inputs}\0{name}".encode()), plan) for name, plan in shards]
    found = sorted(k for _, plan in shards for _, k, _ in plan)
    write_split(
        out, found, {"name": out.name, "policy": "materialized", "source_keys": len(wanted)}
    )
    summary: dict[str, Any] = {
        "kept": len(found),
        "missing": len(set(wanted)) - len(found),
        "corrupt": sum(r["corrupt"] for r in records),
        "duplicate": duplicates,
        "skipped": dict(sum((Counter(r["skipped"]) for r in records), Counter())),
        "input_shards": len(tars),
    }
    if keys_only:
        sources = Counter(src for _, plan in shards for src, _, _ in plan)
        write_json(out / "sources.json", dict(sorted(sources.items())))
        summary["reference"] = 0
        summary["samples"] = len(found)
        write_json(out / "materialize.json", summary)
        return summary
    written = executor.map(WriteShard(str(out)), tasks, on_done=Progress("materialize: write", log))
    sizes = {f"{r['name']}.tar": r["rows"] for r in written}
    if reference is not None:
        sizes.update(_write_reference(out, reference, caption_template, shard_size or 1000))
    n_reference = sum(v for k, v in sizes.items() if k.startswith("ref-"))
    sizes = dict(sorted(sizes.items()))
    write_json(out / "sizes.json", sizes)
    summary.update(
        reference=n_reference,
        samples=len(found) + n_reference,
        output_shards=len(sizes),
        shards="::".join(str(out / name) for name in sizes),
    )
    write_json(out / "materialize.json", summary)
    return summary
