"""``EmbedShard``, the worker: embeds a group of shard tasks and writes each as a store shard,
its done record last."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from simgap.data.sources import SourceShard
from simgap.data.transforms import split_transform
from simgap.embed.batches import prepared_batches
from simgap.embed.encode import (
    FORWARD_THREADS,
    autocast_dtype,
    cached_model,
    encode_batch,
    encode_texts,
)
from simgap.io import fingerprint
from simgap.models import DeviceError, LoadedModel, ModelSpec, ieee_fp32, numerics_identity
from simgap.parallel import task_device
from simgap.store import StoreWriter, normalize_fp16


@dataclass(frozen=True)
class EmbedShard:
    store: str
    spec: ModelSpec
    dim: int
    device: str = "cpu"
    batch_size: int = 256
    decode_workers: int = 0
    text: bool = False
    precision: str = "auto"
    model_sha256: str = ""  # the weights' identity: a shard made by other weights is redone
    # Called with each shard's record as it finishes; only for groups run in this process
    # (a pool or Ray reports per task through the executor).
    on_shard: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)

    def fingerprint(self, task_fingerprint: str) -> str:
        # The forward's kernel choice is part of the bytes: shards written before threads and
        # batch shapes were fixed are redone rather than mixed with new ones.
        # The resolved dtype and device kind, not the choice: "auto" is float32 on CPU but bf16
        # on a GPU, and one store must not mix the two.
        # On a GPU the model, SM count and library versions too (``gpu_fingerprint``): cuBLAS
        # gives the same bits only on the same ones, so a resume on another GPU kind redoes
        # the shards instead of mixing two kinds' bytes in one store.
        dtype = autocast_dtype(self.device, self.precision)
        numerics = f"{torch.device(self.device).type},{dtype},threads={FORWARD_THREADS},padded"
        numerics += gpu_fingerprint(self.numerics())
        config = [task_fingerprint, self.model_sha256, self.text, numerics, self.batch_size]
        return fingerprint(config)

    def numerics(self) -> dict[str, Any]:
        """This process's forward numerics (``numerics_identity``), as the forward sets them."""
        with ieee_fp32():
            device = task_device(self.device)
            return numerics_identity(device, autocast_dtype(device, self.precision))

    def __call__(self, group: tuple[SourceShard, ...]) -> dict[str, Any]:
        """Embed a group of shard tasks (those not done already); one record per shard.

        A CUDA error leaves this process's GPU context unusable: it is raised naming the shard,
        and any later group in this process (a retry) fails at once naming that shard, instead
        of each failing with the same sticky error as if it were its own."""
        if _lost_gpu:
            raise DeviceError(
                f"not run: an earlier CUDA error left this process's GPU unusable "
                f"({_lost_gpu[0]}); "
                "rerun the command to resume"
            )
        current = [group[0].name if group else "?"]  # the shard being embedded, for errors
        try:
            return self._embed(group, current)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_cuda_error(e) or isinstance(e, DeviceError):
                raise
            where = f"shard {current[0]}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
            if not isinstance(e, torch.OutOfMemoryError):  # out of memory is not sticky
                _lost_gpu.append(where)
            raise DeviceError(f"{self.store}: CUDA error in {where}") from e

    def _embed(self, group: tuple[SourceShard, ...], current: list[str]) -> dict[str, Any]:
        writer = StoreWriter(Path(self.store), {}, self.dim, {})
        records: dict[str, dict[str, Any]] = {}
        todo: list[tuple[SourceShard, str]] = []
        for task in group:
            fingerprint = self.fingerprint(task.fingerprint())
            if (done := writer.done_record(task.name, fingerprint)) is not None:
                records[task.name] = done
                self._report(done)
            else:
                todo.append((task, fingerprint))
        if todo:
            current[0] = todo[0][0].name
            device = task_device(self.device)
            loaded = cached_model(self.spec, device)
            numerics = self.numerics()
            transform = split_transform(loaded.preprocess)
            tasks = tuple(t for t, _ in todo)
            shard = _Shard()
            for batch in prepared_batches(tasks, transform, self.batch_size, self.decode_workers):
                current[0] = todo[batch.shard][0].name
                shard.skipped.update(batch.skipped)
                if batch.pixels is not None:
                    shard.features.append(
                        encode_batch(loaded, batch.pixels, device, self.precision, self.batch_size)
                    )
                    shard.keys += batch.keys
                    shard.meta += batch.meta
                if batch.last:
                    task, fingerprint = todo[batch.shard]
                    records[task.name] = self._write(
                        writer, loaded, task.name, fingerprint, shard, numerics
                    )
                    self._report(records[task.name])
                    shard = _Shard()
        shards = [records[t.name] for t in group]
        return {"rows": sum(r["rows"] for r in shards), "shards": shards}

    def _report(self, record: dict[str, Any]) -> None:
        if self.on_shard is not None:
            self.on_shard(record)

    def _write(
        self,
        writer: StoreWriter,
        loaded: LoadedModel,
        name: str,
        fingerprint: str,
        shard: _Shard,
        numerics: dict[str, Any],
    ) -> dict[str, Any]:
        keys, meta = shard.keys, shard.meta
        emb = normalize_fp16(np.concatenate(shard.features)) if keys else _empty(self.dim)
        _check_unique(name, keys, meta)
        columns: dict[str, list] = {"key": keys}
        for column in sorted({k for m in meta for k in m}):
            columns[column] = [m.get(column) for m in meta]
        text_emb = None
        if self.text:
            captions = [m.get("caption") or "" for m in meta]
            text_emb = (
                normalize_fp16(
                    encode_texts(
                        loaded, captions, task_device(self.device), self.batch_size, self.precision
                    )
                )
                if captions
                else _empty(self.dim)
            )
        table = pa.table(columns) if keys else pa.table({"key": pa.array([], pa.string())})
        return writer.write_shard(
            name, emb, table, fingerprint, dict(shard.skipped), text_emb, numerics=numerics
        )


# Set by the first CUDA error in this process (it names the shard); see EmbedShard.__call__.
_lost_gpu: list[str] = []


def _is_cuda_error(e: BaseException) -> bool:
    # torch >= 2.8 raises AcceleratorError for CUDA runtime errors; cuBLAS / cuDNN failures and
    # older torch raise RuntimeError with the library named in the message.
    if isinstance(e, (torch.AcceleratorError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return any(m in text for m in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS"))


def gpu_fingerprint(numerics: dict[str, Any]) -> str:
    """The GPU part of an embed fingerprint ("" on the CPU, so CPU stores keep theirs)."""
    if numerics.get("device") != "cuda":
        return ""
    keys = ("gpu", "capability", "sms", "cuda", "cudnn")
    return "," + ",".join(f"{k}={numerics.get(k)}" for k in keys)


@dataclass
class _Shard:
    """What the forward has produced so far for the shard being embedded."""

    keys: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def _empty(dim: int) -> np.ndarray:
    return np.zeros((0, dim), np.float16)


def _check_unique(shard: str, keys: list[str], meta: list[dict[str, Any]]) -> None:
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in first:
            a, b = meta[first[k]].get("source", "?"), meta[i].get("source", "?")
            raise ValueError(f"duplicate key {k!r} in shard {shard}: {a} and {b}")
        first[k] = i
