"""Sources: where images come from, cut into shard tasks that any engine can run.

Every source becomes a list of ``SourceShard``s; a task names its inputs (paths, not data) and
knows how to stream its samples as (key, image bytes, metadata). Tasks are picklable so the
local process pool and Ray can ship them.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simgap.data import clip_benchmark
from simgap.data.images import IMAGE_EXTENSIONS, pick_image
from simgap.data.tables import TableSpec, is_table, table_rows, table_samples
from simgap.data.tars import (
    ShardError,
    expand_shards,
    image_key,
    is_url,
    iter_samples,
    shard_stat,
)

Record = tuple[str, bytes | None, dict[str, Any]]  # key, image bytes, metadata columns


@dataclass(frozen=True)
class SourceShard:
    name: str  # output shard name, fixed width: "00000"
    tar: str | None = None  # a webdataset shard (local path or fsspec URL) ...
    files: tuple[tuple[str, str, Any], ...] = field(default=())  # ... or (key, path, value) items
    column: str = "label"  # what an item's value is: "label" (image folders), "caption" (tables)
    table: str | None = None  # the table locator the items came from, if any
    labelled: bool = False  # tar samples must carry a ``.cls`` label (CLIP_benchmark wds)

    def fingerprint(self) -> str:
        """Identifies the task's input: paths, sizes and mtimes (cheap, changes when data does)."""
        h = hashlib.sha256(self.name.encode())
        paths = [self.tar] if self.tar else [p for _, p, _ in self.files]
        if self.table:
            paths.append(TableSpec.from_locator(self.table).path)
            h.update(self.table.encode())
        for p in paths:
            h.update(f"{p}\0{_stat_or_missing(p)}\0".encode())
        return h.hexdigest()

    def records(self, skipped: Counter[str]) -> Iterator[Record]:
        if self.tar is not None:
            yield from _tar_records(self.tar, skipped, self.labelled)
            return
        for key, path, value in self.files:
            try:
                data = Path(path).read_bytes()
            except OSError:
                skipped["unreadable_file"] += 1
                continue
            meta: dict[str, Any] = {"source": self.table or path, self.column: value}
            if self.table:
                meta["path"] = path
            yield key, data, meta


def _stat_or_missing(path: str) -> str:
    # A file missing now is skipped and counted; if it appears later the fingerprint changes.
    try:
        return shard_stat(path)
    except OSError:
        return "missing"


def _tar_records(tar: str, skipped: Counter[str], labelled: bool) -> Iterator[Record]:
    for key, members in iter_samples(tar, skipped):
        if labelled and "cls" not in members:
            skipped["missing_label"] += 1
            continue
        meta: dict[str, Any] = {"source": tar}
        if "txt" in members:
            meta["caption"] = members["txt"].decode("utf-8", errors="replace")
        if "cls" in members:  # CLIP_benchmark's wds: the class index as text
            try:
                meta["label"] = int(members["cls"].decode().strip())
            except ValueError:
                skipped["bad_label"] += 1
                continue
        yield key, pick_image(members), meta


def read_classnames(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: class-names file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: class-names file is empty")
    return names


_WNID = re.compile(r"n\d{8}")


def folder_class_names(root: Path, folders: list[str]) -> dict[str, str]:
    """The class name of each class folder of an image folder, for captions: the folder's own
    name, except that WordNet-id folders (ImageNet-train's ``n01440764``) get the ImageNet class
    name open_clip ships (``tench``), by the id's position among the 1000 sorted ids."""
    wnid_like = [f for f in folders if _WNID.fullmatch(f)]
    if not wnid_like:
        return {f: f for f in folders}
    from simgap.data.clip_benchmark import imagenet_classnames, imagenet_wnids

    position = {w: i for i, w in enumerate(imagenet_wnids("imagenet"))}
    names = imagenet_classnames()
    for f in folders:
        if f not in position:
            what = "a WordNet id outside" if _WNID.fullmatch(f) else "not a WordNet id, unlike"
            raise ValueError(
                f"{Path(root) / f}: class folder {f!r} is {what} the 1000 ImageNet classes "
                f"(the other folders are WordNet ids); its images' caption has no class name"
            )
    return {f: names[position[f]] for f in folders}


def image_folder_items(root: Path) -> list[tuple[str, str, int]]:
    """ImageNet-style folder: one sub-folder per class; labels follow ``classnames.txt`` if present
    (the benchmark's class subset, in global order), else the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    listing = root / "classnames.txt"
    classes = (
        read_classnames(listing)
        if listing.exists()
        else sorted(p.name for p in root.iterdir() if p.is_dir())
    )
    items = []
    seen: dict[str, Path] = {}
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: class folder listed in {listing} is missing")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                key = image_key(path)
                if key in seen:
                    raise ValueError(f"duplicate key {key!r}: {seen[key]} and {path}")
                seen[key] = path
                items.append((key, str(path), label))
    if not items:
        raise ValueError(f"{root}: image folder holds no images")
    return items


def _chunks(items: list, shard_size: int) -> list[tuple[str, tuple]]:
    return [
        (f"{i:05d}", tuple(items[start : start + shard_size]))
        for i, start in enumerate(range(0, len(items), shard_size))
    ]


def _wds_benchmark_shards(path: Path) -> list[str] | None:
    """The tars of a CLIP_benchmark ``wds/<name>`` folder, or None if ``path`` is not one."""
    if not clip_benchmark.is_wds_benchmark(path):
        return None
    return [str(p) for p in clip_benchmark.wds_shards(path)]


def shard_tasks(spec: str | Path, shard_size: int = 1000) -> list[SourceShard]:
    """Tasks for a source: a table (csv/tsv/parquet, optionally ``#options``), a CLIP_benchmark
    wds folder, an image folder, or tar shards (list, pattern, folder, fsspec URL)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    if is_table(spec):
        table = TableSpec.from_locator(str(spec))
        return [
            SourceShard(name, files=chunk, column="caption", table=table.locator())
            for name, chunk in _chunks(table_rows(table), shard_size)
        ]
    path = Path(str(spec))
    if not is_url(str(spec)) and path.is_dir():
        if (wds := _wds_benchmark_shards(path)) is not None:
            return [SourceShard(f"{i:05d}", tar=t, labelled=True) for i, t in enumerate(wds)]
        is_tar_source = any(path.glob("*.tar"))
        if not is_tar_source:
            return [
                SourceShard(name, files=chunk)
                for name, chunk in _chunks(image_folder_items(path), shard_size)
            ]
    tars = expand_shards(spec)
    if not tars:
        raise ShardError(f"{spec}: no shards")
    return [SourceShard(f"{i:05d}", tar=t) for i, t in enumerate(tars)]


def fetch_samples(source: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """Find samples again by key, given the ``source`` locator a store's keys table records
    (a tar shard or URL, a table locator, or an image file): key -> members (extension ->
    bytes). Missing keys are absent from the result, so the caller decides whether that is an
    error."""
    if is_table(source):
        return table_samples(source, keys)
    if source.endswith(".tar") or is_url(source):
        return {k: m for k, m in iter_samples(source) if k in keys}
    path = Path(source)
    if image_key(path) not in keys or not path.exists():
        return {}
    return {image_key(path): {path.suffix.lower().lstrip("."): path.read_bytes()}}
