"""``materialize``: both phases on the executor, the reference set, and the summary."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from simgap.data.keylist import read_key_list
from simgap.data.tars import expand_shards
from simgap.io import read_json, sha256_bytes, write_json
from simgap.layout import SHARDS_DONE, done_record
from simgap.lock import locks_output
from simgap.materialize.index import IndexShard
from simgap.materialize.reference import (
    RefItem,
    WriteReferenceShard,
    reference_items,
    refuse_clashes,
)
from simgap.materialize.write import MirrorShard, WriteShard, plan_fingerprint, plan_shards
from simgap.parallel import Executor, LocalEngine, Progress
from simgap.select.splitfile import SPLIT_SCHEMA, write_split
from simgap.types import Log


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
    refuse_clashes(ref_items, wanted, Path(reference or "."), keys_path)
    tars = expand_shards(source)
    executor = executor or Executor(LocalEngine(1))
    mirror = shard_size is None and not keys_only
    records, prior = _index(executor, keys_path, out, tars, mirror, log)
    shards, duplicates = plan_shards(records, shard_size)
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
    tasks = _write_tasks(records, shards, shard_size)
    ready = {t[0] for t in tasks if prior.get(t[0], {}).get("fingerprint") == t[1]}
    todo = [t for t in tasks if t[0] not in ready]
    written = [prior[name] for name in sorted(ready)]
    written += executor.map(WriteShard(str(out)), todo, on_done=Progress("materialize: write", log))
    if ref_items:
        written += _write_reference(executor, out, ref_items, shard_size or 1000, log)
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


def _index(
    executor: Executor, keys_path: Path, out: Path, tars: list[str], mirror: bool, log: Log | None
) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Phase 1 on the executor: the index records of every input shard, and the output shards
    already written by the mirror tasks (``mirror``: index and write in one task)."""
    tasks = [(f"{i:05d}", t) for i, t in enumerate(tars)]
    if not mirror:
        records = executor.map(
            IndexShard(str(keys_path), str(out)), tasks, on_done=Progress("materialize: index", log)
        )
        return records, {}
    mirrored = executor.map(
        MirrorShard(str(keys_path), str(out)), tasks, on_done=Progress("materialize", log)
    )
    records = [r["index"] for r in mirrored]
    return records, {r["write"]["name"]: r["write"] for r in mirrored if r["write"]}


def _write_tasks(
    records: list[dict[str, Any]], shards: list[tuple[str, list]], shard_size: int | None
) -> list[tuple]:
    """Phase 2's tasks, each with the fingerprint its done record must carry to be reused."""
    if shard_size is None:
        index_fp = {r["name"]: r["fingerprint"] for r in records}
        return [
            (name, plan_fingerprint(index_fp[name], plan), plan, index_fp[name])
            for name, plan in shards
        ]
    # A plan is a function of the index records and the shard size: hash those.
    inputs = sha256_bytes(f"{shard_size}\0{[r['fingerprint'] for r in records]}".encode())
    return [(name, sha256_bytes(f"{inputs}\0{name}".encode()), plan) for name, plan in shards]


def _write_reference(
    executor: Executor, out: Path, ref_items: list[RefItem], n: int, log: Log | None
) -> list[dict[str, Any]]:
    """The reference set as ``ref-*.tar`` shards of ``n`` samples each."""
    ref_tasks = [
        (f"ref-{i:05d}", ref_items[start : start + n])
        for i, start in enumerate(range(0, len(ref_items), n))
    ]
    return executor.map(
        WriteReferenceShard(str(out)), ref_tasks, on_done=Progress("materialize: reference", log)
    )
