"""Sources: where images come from, cut into shard tasks that any engine can run.

Every source becomes a list of ``ShardTask``s; a task names its inputs (paths, not data) and
knows how to stream its samples as (key, image bytes, metadata). Tasks are picklable so the
local process pool and Ray can ship them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simgap.data.images import IMAGE_EXTENSIONS, pick_image
from simgap.data.tars import ShardError, expand_shards, iter_samples

Record = tuple[str, bytes | None, dict[str, Any]]  # key, image bytes, metadata columns


@dataclass(frozen=True)
class ShardTask:
    name: str  # output shard name, fixed width: "00000"
    tar: str | None = None  # a webdataset shard ...
    files: tuple[tuple[str, str, int], ...] = field(default=())  # ... or (key, path, label) items

    def fingerprint(self) -> str:
        """Identifies the task's input: paths, sizes and mtimes (cheap, changes when data does)."""
        h = hashlib.sha256(self.name.encode())
        paths = [self.tar] if self.tar else [p for _, p, _ in self.files]
        for p in paths:
            st = Path(p).stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()

    def records(self, skipped: Counter[str]) -> Iterator[Record]:
        if self.tar is not None:
            for key, members in iter_samples(self.tar, skipped):
                meta: dict[str, Any] = {"source": self.tar}
                if "txt" in members:
                    meta["caption"] = members["txt"].decode("utf-8", errors="replace")
                yield key, pick_image(members), meta
            return
        for key, path, label in self.files:
            try:
                data = Path(path).read_bytes()
            except OSError:
                skipped["unreadable_file"] += 1
                continue
            yield key, data, {"source": path, "label": label}


def read_classnames(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: class-names file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: class-names file is empty")
    return names


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
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: class folder listed in {listing} is missing")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                items.append((path.stem, str(path), label))
    if not items:
        raise ValueError(f"{root}: image folder holds no images")
    return items


def shard_tasks(spec: str | Path, shard_size: int = 1000) -> list[ShardTask]:
    """Tasks for a source: a tar shard list/pattern/folder, or an image folder."""
    path = Path(str(spec))
    is_tar_source = str(spec).endswith(".tar") or "{" in str(spec) or "::" in str(spec)
    if path.is_dir() and not is_tar_source and not any(path.glob("*.tar")):
        items = image_folder_items(path)
        return [
            ShardTask(f"{i:05d}", files=tuple(items[start : start + shard_size]))
            for i, start in enumerate(range(0, len(items), shard_size))
        ]
    tars = expand_shards(spec)
    if not tars:
        raise ShardError(f"{spec}: no shards")
    return [ShardTask(f"{i:05d}", tar=t) for i, t in enumerate(tars)]


def fetch_samples(source: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """Find samples again by key, given the ``source`` locator a store's keys table records
    (a tar shard, or an image file): key -> members (extension -> bytes). Missing keys are absent
    from the result, so the caller decides whether that is an error."""
    if source.endswith(".tar") or "://" in source:
        return {k: m for k, m in iter_samples(source) if k in keys}
    path = Path(source)
    if path.stem not in keys or not path.exists():
        return {}
    return {path.stem: {path.suffix.lower().lstrip("."): path.read_bytes()}}
