"""Split files, and materializing a split into training shards.

A split is ``keys.parquet`` (kept pool keys, sorted) and ``split.json`` (how it was made).
Materialize filters the source webdataset shards by the split, one input shard per task, copying
every member of a kept sample verbatim; the reference set can be appended with templated captions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from simgap.data.sources import image_folder_items, read_classnames
from simgap.data.tars import expand_shards, iter_samples, write_tar
from simgap.io import read_json, sha256_bytes, write_json, write_parquet
from simgap.parallel import Executor, LocalEngine


def write_split(folder: Path, keys: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    keys = sorted(keys)
    write_parquet(folder / "keys.parquet", pa.table({"key": pa.array(keys, pa.string())}))
    meta = {**meta, "size": len(keys), "keys_sha256": sha256_bytes("\n".join(keys).encode())}
    write_json(folder / "split.json", meta)
    return meta


def read_split(folder: Path) -> tuple[set[str], dict[str, Any]]:
    folder = Path(folder)
    meta = read_json(folder / "split.json")
    keys = pq.read_table(folder / "keys.parquet").column("key").to_pylist()
    return set(keys), meta


@dataclass(frozen=True)
class FilterShard:
    """Worker: copy the kept samples of one input shard into one output shard."""

    split: str  # folder of the split (keys.parquet)
    out: str

    def __call__(self, task: tuple[str, str]) -> dict[str, Any]:
        name, tar = task
        done = Path(self.out) / "done" / f"{name}.json"
        if done.exists():
            return read_json(done)
        keep, _ = read_split(Path(self.split))
        skipped: Counter[str] = Counter()
        kept = [(k, m) for k, m in iter_samples(tar, skipped) if k in keep]
        write_tar(Path(self.out) / f"{name}.tar", kept)
        record = {"name": name, "kept": len(kept), "skipped": dict(skipped), "source": tar}
        write_json(done, record)
        return record


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


def materialize(
    split: Path,
    source: str,
    out: Path,
    reference: Path | None = None,
    caption_template: str = "a photo of a {c}",
    shard_size: int = 1000,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Write the split's samples (plus the reference set) as shards; returns counts and the
    brace pattern that open_clip_train reads."""
    out = Path(out)
    tars = expand_shards(source)
    tasks = [(f"{i:05d}", t) for i, t in enumerate(tars)]
    records = (executor or Executor(LocalEngine(1))).map(FilterShard(str(split), str(out)), tasks)
    sizes = {f"{r['name']}.tar": r["kept"] for r in records}
    n_reference = 0
    if reference is not None:
        samples = reference_samples(reference, caption_template)
        n_reference = len(samples)
        for i, start in enumerate(range(0, len(samples), shard_size)):
            name = f"ref-{i:05d}"
            if not (out / f"{name}.tar").exists():
                write_tar(out / f"{name}.tar", samples[start : start + shard_size])
            sizes[f"{name}.tar"] = len(samples[start : start + shard_size])
    sizes = {k: v for k, v in sorted(sizes.items()) if v > 0}
    write_json(out / "sizes.json", sizes)
    keys, _ = read_split(Path(split))
    kept = sum(r["kept"] for r in records)
    summary = {
        "kept": kept,
        "missing": len(keys) - kept,
        "reference": n_reference,
        "samples": kept + n_reference,
        "skipped": dict(sum((Counter(r["skipped"]) for r in records), Counter())),
        "shards": "::".join(str(out / name) for name in sizes),
    }
    write_json(out / "materialize.json", summary)
    return summary
