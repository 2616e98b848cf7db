"""Materialize: a split (:mod:`simgap.select.splitfile`) or key list -> new training shards.

It runs in two parallel phases through the executor:

1. index, one task per input shard: walk the tar's headers (one sequential read,
   :class:`simgap.data.tars.TarWalk`), note where each member of a kept sample lies (offset,
   size); unsafe members (absolute, ``..``, links, devices) are skipped and counted, a cut or
   damaged tar keeps what precedes the damage and counts the rest;
2. write, one task per output shard: copy the kept members' bytes by offset into a reproducible
   tar, one sample at a time. Output shards hold ``shard_size`` samples each (resharded across
   input boundaries), or mirror the input shards when ``shard_size`` is None: then one task
   indexes and writes its shard (the input is read once), and only shards that hold a key kept
   in an earlier shard are rewritten afterwards.

Each task leaves a done record tied to its inputs, written after its tar is fsync'd (a done
record never points at data a power cut could lose), so a killed run resumes where it stopped.
The reference set's shards are tasks too. IO-heavy, so ``simgap materialize`` runs tasks on
threads (:class:`simgap.parallel.ThreadEngine`). Archive members are never extracted: the only
files written are the output folder's own.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simgap.data.keylist import read_key_list
from simgap.data.sources import folder_class_names, image_folder_items
from simgap.data.tars import (
    Sample,
    ShardError,
    TarWalk,
    expand_shards,
    safe_member_name,
    split_name,
)
from simgap.data.tarwrite import TarWriter, write_tar
from simgap.io import (
    COUNT,
    Check,
    Optional,
    read_json,
    read_record,
    sha256_bytes,
    write_atomic,
    write_json,
    write_record,
)
from simgap.layout import KEY_INDEX, SHARDS_DONE, done_record
from simgap.lock import locks_output
from simgap.parallel import Executor, LocalEngine, Progress
from simgap.select.splitfile import SPLIT_SCHEMA, write_split
from simgap.types import Log

Member = tuple[str, int, int]  # extension, data offset in the tar, size (or that list)


_KEY_SET_LOCK = threading.Lock()


def _key_set(path: str, mtime_ns: int) -> frozenset[str]:
    # One build per process, shared by its threads: unlocked, each thread of a ThreadEngine
    # would build its own copy of a split that may hold hundreds of millions of keys.
    with _KEY_SET_LOCK:
        return _read_key_set(path, mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_key_set(path: str, _mtime_ns: int) -> frozenset[str]:
    # Cached per process: every index task of a worker reads the same list.
    return frozenset(read_key_list(path, allow_empty=True))


def _refuse_broken(split: Path) -> None:
    """A gap-matched split whose guarantee check failed must not become training data."""
    meta_path = split / "split.json"
    if split.is_dir() and meta_path.is_file():
        guarantee = read_json(meta_path, SPLIT_SCHEMA).get("guarantee") or {}
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


def index_tar(path: str, keep: frozenset[str] | set[str]) -> dict[str, Any]:
    """Where the kept samples' members lie in one tar (headers only: no member is extracted)."""
    skipped: Counter[str] = Counter()
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            walk = TarWalk(fh, size)
            entries = list(walk)
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise ShardError(f"{path}: not a readable tar ({e})") from None
    bad: set[str] = set()
    if walk.end != "complete":
        # A cut keeps the members before it; other damage ends the walk where it is met.
        skipped["truncated_shard" if walk.end == "cut" else "damaged_tail"] += 1
        if walk.end != "trailing_data" and entries:
            # The sample in progress where the walk stopped may lack its later members.
            last = split_name(entries[-1][0])[0]
            if last in keep:
                bad.add(last)
    samples: dict[str, list[list]] = {}
    for name, regular, offset, n, _ in entries:
        if not regular or not safe_member_name(name):
            skipped["unsafe_member"] += 1
            continue
        key, ext = split_name(name)
        if key not in keep:
            continue
        if offset + n > size:
            bad.add(key)  # a member cut by a truncated file
            continue
        members = samples.get(key)
        if members is None:
            samples[key] = [[ext, offset, n]]
        else:
            members.append([ext, offset, n])
    kept = []
    for key, members in samples.items():
        if len(members) > 1:
            members.sort()  # by extension, as write_tar orders them
            twice = sum(a[0] == b[0] for a, b in zip(members, members[1:], strict=False))
            if twice:
                skipped["duplicate_member"] += twice
                bad.add(key)
        if key not in bad:
            kept.append([key, members])
    return {"samples": kept, "corrupt": len(bad), "skipped": dict(sorted(skipped.items()))}


# Done and index records (simgap.io.write_record): what a resumed run reuses without redoing.
_MEMBERS = Check(
    "[key, [[ext, offset, size], ...]]",
    lambda v: (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], str)
        and isinstance(v[1], list)
        and all(
            isinstance(m, list)
            and len(m) == 3
            and isinstance(m[0], str)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in m[1:])
            for m in v[1]
        )
    ),
)
INDEX_SCHEMA = {
    "name": str,
    "source": str,
    "fingerprint": str,
    "rows": COUNT,
    "samples": [_MEMBERS],
}
DONE_SCHEMA = {"name": str, "rows": COUNT, "bytes": Optional(COUNT), "fingerprint": str}


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
        done = done_record(Path(self.out), name, KEY_INDEX)
        record = read_record(done, INDEX_SCHEMA)
        if record is not None and (record["fingerprint"], record["source"]) == (fingerprint, tar):
            return record
        keep = _key_set(str(keys_path), keys_path.stat().st_mtime_ns)
        record = {"name": name, "source": tar, "fingerprint": fingerprint, **index_tar(tar, keep)}
        record["rows"] = len(record["samples"])
        # Compact: an index record lists every kept member of the shard.
        write_record(done, record, compact=True)
        return record


# ----------------------------------------------------------------------------- phase 2: write


def write_plan_tar(path: Path, plan: list[tuple[str, str, list[Member]]]) -> None:
    """Copy (source tar, key, members) into ``path`` as a reproducible tar (the same bytes as
    ``write_tar`` would give for those samples), member bytes copied by offset."""

    def write(f: io.BufferedIOBase) -> None:
        f.flush()
        fds: dict[str, int] = {}
        writer = TarWriter(f.fileno())
        try:
            for source, key, members in plan:
                if source not in fds:
                    fds[source] = os.open(source, os.O_RDONLY)
                for ext, offset, size in members:
                    name = f"{key}.{ext}" if ext else key
                    writer.copy(name, fds[source], offset, size, source)
            writer.finish()
        finally:
            writer.close()
            for fd in fds.values():
                os.close(fd)

    write_atomic(path, write)


def _outputs(out: Path, name: str) -> tuple[Path, Path]:
    """An output shard's tar and its done record."""
    return out / f"{name}.tar", done_record(out, name, SHARDS_DONE)


def _finished(tar: Path, done: Path, fingerprint: str) -> dict[str, Any] | None:
    """The done record of a shard already written from the same inputs, else None."""
    if tar.exists() and (record := read_record(done, DONE_SCHEMA)) is not None:
        if record["fingerprint"] == fingerprint:
            return record
    return None


@dataclass(frozen=True)
class WriteShard:
    """Phase 2 worker: write one output shard from its plan (reused when the plan is unchanged)."""

    out: str

    def __call__(self, task: tuple) -> dict:
        """``task``: (name, fingerprint, plan) or, for a mirrored shard, (name, fingerprint,
        plan, index fingerprint of its input), kept in the done record."""
        name, fingerprint, plan, *index = task
        tar, done = _outputs(Path(self.out), name)
        if (record := _finished(tar, done, fingerprint)) is not None:
            return record
        write_plan_tar(tar, plan)
        record = {
            "name": name,
            "rows": len(plan),
            "bytes": sum(n for _, _, ms in plan for _, _, n in ms),
            "fingerprint": fingerprint,
            **({"index": index[0]} if index else {}),
        }
        write_record(done, record)
        return record


def _plan_fingerprint(index_fingerprint: str, plan: list[tuple[str, str, list[Member]]]) -> str:
    """What a mirrored output shard holds: its input (the index record's fingerprint) and which
    of its keys it keeps (a key kept in an earlier input shard is dropped)."""
    return sha256_bytes("\n".join([index_fingerprint, *(k for _, k, _ in plan)]).encode())


@dataclass(frozen=True)
class MirrorShard:
    """Index one input shard and write its kept samples as the output shard of the same name, in
    one task (``shard_size`` None): the write reads what the index just brought into the page
    cache instead of reading the input from disk a second time, and one task's disk writes
    overlap another's reads. A key kept in an earlier input shard is dropped afterwards, by
    rewriting the shards that hold one (rare: duplicates are counted)."""

    keys: str
    out: str

    def __call__(self, task: tuple[str, str]) -> dict[str, Any]:
        record = IndexShard(self.keys, self.out)(task)
        name, index = record["name"], record["fingerprint"]
        plan = [(record["source"], k, ms) for k, ms in record["samples"]]
        written = None
        tar, done = _outputs(Path(self.out), name)
        if tar.exists() and (written := read_record(done, DONE_SCHEMA)) is not None:
            # The same input: whether its drops still hold is for the caller to check.
            if written.get("index") != index:
                written = None
        if written is None and plan:
            fingerprint = _plan_fingerprint(index, plan)
            written = WriteShard(self.out)((name, fingerprint, plan, index))
        return {"index": record, "write": written, "rows": record["rows"]}


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
            part.append((r["source"], key, members))  # [ext, offset, size] lists, as indexed
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


RefItem = tuple[str, str, str, int]  # key, image path, caption, label


def reference_items(reference: Path, template: str, seed: int = 0) -> list[RefItem]:
    """The reference set's images with their templated caption (the paper's ``a photo of a
    {class}``, with ImageNet's class names for WordNet-id folders): paths only, so that a
    1.28M-image set costs a listing, not its bytes.

    In a seeded random order: listed class after class, a training loader's shuffle buffer
    (open_clip's holds a few thousand samples) would fill whole batches with one caption."""
    items = image_folder_items(Path(reference))
    folders = sorted({Path(path).parent.name for _, path, _ in items})
    names = folder_class_names(Path(reference), folders)
    order = np.random.default_rng(seed).permutation(len(items))
    return [
        (key, path, template.format(c=names[Path(path).parent.name]), label)
        for key, path, label in (items[i] for i in order)
    ]


def _ref_samples(items: list[RefItem]) -> Iterator[Sample]:
    for key, path, caption, label in items:
        yield (
            key,
            {
                "jpg": Path(path).read_bytes(),
                "txt": caption.encode(),
                "json": json.dumps({"key": key, "caption": caption, "label": label}).encode(),
            },
        )


def _refuse_clashes(items: list[RefItem], wanted: list[str], reference: Path, split: Path) -> None:
    """A key in both the reference set and the split would appear twice in the training shards."""
    clash = sorted({k for k, _, _, _ in items}.intersection(wanted))
    if clash:
        raise ValueError(
            f"{reference}: reference key {clash[0]!r} is also in the split {split} "
            f"({len(clash)} such keys); rename the reference images or drop them from the split"
        )


@dataclass(frozen=True)
class WriteReferenceShard:
    """Write one ``ref-*.tar`` from its images, streaming them; reused while the images (their
    listing, sizes and mtimes) and the caption template are unchanged."""

    out: str

    def __call__(self, task: tuple[str, list[RefItem]]) -> dict[str, Any]:
        name, items = task
        lines = []
        for key, path, caption, label in items:
            st = os.stat(path)
            lines.append(f"{key}\0{path}\0{caption}\0{label}\0{st.st_size}\0{st.st_mtime_ns}")
        fingerprint = sha256_bytes("\n".join(lines).encode())
        tar, done = _outputs(Path(self.out), name)
        if (record := _finished(tar, done, fingerprint)) is not None:
            return record
        write_tar(tar, _ref_samples(items))  # fsync'd before its done record, like any shard
        record = {"name": name, "rows": len(items), "fingerprint": fingerprint}
        write_record(done, record)
        return record


# ----------------------------------------------------------------------------- materialize

_SHARD_NAME = re.compile(r"(ref-)?\d{5}\.tar")


def _remove_stale(out: Path, names: set[str]) -> None:
    """Shards an earlier run wrote that this one does not (a smaller split or reference set):
    left in place, a loader that globs the folder would train on them."""
    for tar in out.glob("*.tar"):
        if tar.name not in names and _SHARD_NAME.fullmatch(tar.name):
            tar.unlink()
            done_record(out, tar.stem, SHARDS_DONE).unlink(missing_ok=True)


@locks_output("out")
def materialize(
    split: Path,
    source: str,
    out: Path,
    reference: Path | None = None,
    caption_template: str = "a photo of a {c}",
    shard_size: int | None = None,
    reference_seed: int = 0,
    executor: Executor | None = None,
    keys_only: bool = False,
    log: Log | None = None,
) -> dict[str, Any]:
    """Write the split's samples (every member) as shards, plus the reference set; returns the
    counts and the '::'-joined shard list that open_clip_train reads.

    ``split``: a split folder or a key list file. ``shard_size``: samples per output shard
    (None: one output shard per input shard). ``reference_seed``: the order of the reference
    samples across their shards. ``keys_only``: write only the key list of the
    samples found (``keys.txt``, ``keys.parquet``) and ``sources.json`` (input shard → kept
    count) for a loader that filters the source shards on the fly."""
    out = Path(out)
    _refuse_broken(Path(split))
    keys_path = _keys_path(split)
    wanted = read_key_list(keys_path, allow_empty=True)
    ref_items = (
        [] if reference is None else reference_items(reference, caption_template, reference_seed)
    )
    _refuse_clashes(ref_items, wanted, Path(reference or "."), keys_path)
    tars = expand_shards(source)
    executor = executor or Executor(LocalEngine(1))
    tasks = [(f"{i:05d}", t) for i, t in enumerate(tars)]
    prior: dict[str, dict] = {}  # output shards written by the mirror tasks
    if shard_size is None and not keys_only:
        mirrored = executor.map(
            MirrorShard(str(keys_path), str(out)), tasks, on_done=Progress("materialize", log)
        )
        records = [r["index"] for r in mirrored]
        prior = {r["write"]["name"]: r["write"] for r in mirrored if r["write"]}
    else:
        records = executor.map(
            IndexShard(str(keys_path), str(out)), tasks, on_done=Progress("materialize: index", log)
        )
    shards, duplicates = plan_shards(records, shard_size)
    if shard_size is None:
        index_fp = {r["name"]: r["fingerprint"] for r in records}
        tasks = [
            (name, _plan_fingerprint(index_fp[name], plan), plan, index_fp[name])
            for name, plan in shards
        ]
    else:
        # A plan is a function of the index records and the shard size: hash those.
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
    ready = {t[0] for t in tasks if prior.get(t[0], {}).get("fingerprint") == t[1]}
    todo = [t for t in tasks if t[0] not in ready]
    written = [prior[name] for name in sorted(ready)]
    written += executor.map(WriteShard(str(out)), todo, on_done=Progress("materialize: write", log))
    if ref_items:
        n = shard_size or 1000
        ref_tasks = [
            (f"ref-{i:05d}", ref_items[start : start + n])
            for i, start in enumerate(range(0, len(ref_items), n))
        ]
        written += executor.map(
            WriteReferenceShard(str(out)),
            ref_tasks,
            on_done=Progress("materialize: reference", log),
        )
    sizes = {f"{r['name']}.tar": r["rows"] for r in written}
    _remove_stale(out, set(sizes))
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
