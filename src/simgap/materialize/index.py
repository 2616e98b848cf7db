"""Phase 1, index: where each kept sample's members lie in one input tar (headers only)."""

from __future__ import annotations

import functools
import os
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgap.data.keylist import read_key_list
from simgap.data.tars import ShardError, TarWalk, safe_member_name, split_name
from simgap.io import COUNT, Check, read_record, sha256_bytes, write_record
from simgap.layout import KEY_INDEX, done_record

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


# Index records (simgap.io.write_record): what a resumed run reuses without indexing again.
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
