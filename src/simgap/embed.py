"""Source → embedding store, one shard task at a time, resumable.

``EmbedShard`` is the worker: a frozen, picklable callable that reads one shard task, decodes and
transforms its images, runs the similarity model, and writes the store shard atomically with a
done record last. ``embed`` plans the tasks, skips those already done from the same input, runs
the rest on an executor and writes the manifest.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from simgap.data.images import decode_rgb
from simgap.data.sources import ShardTask, shard_tasks
from simgap.models import LoadedModel, ModelSpec, load_model
from simgap.parallel import Executor, LocalEngine, Progress
from simgap.store import Store, StoreWriter, normalize_fp16


@functools.lru_cache(maxsize=2)
def _cached_model(spec: ModelSpec, device: str) -> LoadedModel:
    # One load per worker process, reused across that process's shards.
    return load_model(spec, device=device)


def encode_images(
    loaded: LoadedModel, images: list, device: str, batch_size: int, dim: int
) -> np.ndarray:
    """Images → L2-normalised float16 embeddings (the store's format)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [loaded.preprocess(im) for im in images[start : start + batch_size]]
            )
            out.append(loaded.model.encode_image(batch.to(device)).float().cpu().numpy())
    if not out:
        return np.zeros((0, dim), np.float16)
    return normalize_fp16(np.concatenate(out))


@functools.lru_cache(maxsize=2)
def _dim_of(spec: ModelSpec, device: str) -> int:
    from PIL import Image

    loaded = _cached_model(spec, device)
    with torch.inference_mode():
        x = loaded.preprocess(Image.new("RGB", (8, 8))).unsqueeze(0).to(device)
        return int(loaded.model.encode_image(x).shape[-1])


@dataclass(frozen=True)
class EmbedShard:
    store: str
    spec: ModelSpec
    dim: int
    device: str = "cpu"
    batch_size: int = 256

    def __call__(self, task: ShardTask) -> dict[str, Any]:
        writer = StoreWriter(Path(self.store), {}, self.dim, {})
        fingerprint = task.fingerprint()
        if (done := writer.done_record(task.name, fingerprint)) is not None:
            return done
        loaded = _cached_model(self.spec, self.device)
        skipped: Counter[str] = Counter()
        keys, images, meta = [], [], []
        for key, data, m in task.records(skipped):
            image = decode_rgb(data, skipped)
            if image is not None:
                keys.append(key)
                images.append(image)
                meta.append(m)
        emb = encode_images(loaded, images, self.device, self.batch_size, self.dim)
        columns: dict[str, list] = {"key": keys}
        for name in sorted({k for m in meta for k in m}):
            columns[name] = [m.get(name) for m in meta]
        return writer.write_shard(task.name, emb, pa.table(columns), fingerprint, dict(skipped))


def embed(
    source: str | Path,
    out: Path,
    spec: ModelSpec,
    executor: Executor | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    shard_size: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> Store:
    tasks = shard_tasks(source, shard_size)
    loaded = _cached_model(spec, device)
    dim = _dim_of(spec, device)
    writer = StoreWriter(Path(out), loaded.identity, dim, {"spec": str(source)})
    worker = EmbedShard(str(out), spec, dim, device, batch_size)
    executor = executor or Executor(LocalEngine(1))
    records = executor.map(worker, tasks, on_done=Progress(f"embed {Path(out).name}", progress))
    return writer.finish(records)
