"""The reference set (the paper's ImageNet-train images with a templated caption) as extra
training shards."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simgap.data.sources import folder_class_names, image_folder_items
from simgap.data.tars import Sample
from simgap.data.tarwrite import write_tar
from simgap.io import sha256_bytes, write_record
from simgap.materialize.write import finished_record, shard_outputs

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


def refuse_clashes(items: list[RefItem], wanted: list[str], reference: Path, split: Path) -> None:
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
        tar, done = shard_outputs(Path(self.out), name)
        if (record := finished_record(tar, done, fingerprint)) is not None:
            return record
        write_tar(tar, _ref_samples(items))  # fsync'd before its done record, like any shard
        record = {"name": name, "rows": len(items), "fingerprint": fingerprint}
        write_record(done, record)
        return record
