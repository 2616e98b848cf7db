"""Phase 2, write: output shards copied by offset from the input tars, each resumable."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgap.data.tarwrite import TarWriter
from simgap.io import COUNT, Optional, read_record, sha256_bytes, write_atomic, write_record
from simgap.layout import SHARDS_DONE, done_record
from simgap.materialize.index import IndexShard

Member = tuple[str, int, int]  # extension, data offset in the tar, size (or that list)

# The done record of an output shard (simgap.io.write_record): what a resumed run reuses.
DONE_SCHEMA = {"name": str, "rows": COUNT, "bytes": Optional(COUNT), "fingerprint": str}


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


def shard_outputs(out: Path, name: str) -> tuple[Path, Path]:
    """An output shard's tar and its done record."""
    return out / f"{name}.tar", done_record(out, name, SHARDS_DONE)


def finished_record(tar: Path, done: Path, fingerprint: str) -> dict[str, Any] | None:
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
        tar, done = shard_outputs(Path(self.out), name)
        if (record := finished_record(tar, done, fingerprint)) is not None:
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


def plan_fingerprint(index_fingerprint: str, plan: list[tuple[str, str, list[Member]]]) -> str:
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
        tar, done = shard_outputs(Path(self.out), name)
        if tar.exists() and (written := read_record(done, DONE_SCHEMA)) is not None:
            # The same input: whether its drops still hold is for the caller to check.
            if written.get("index") != index:
                written = None
        if written is None and plan:
            fingerprint = plan_fingerprint(index, plan)
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
