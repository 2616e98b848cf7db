"""Source → embedding store, one shard task at a time, resumable.

``EmbedShard`` is the worker: a frozen, picklable callable that streams one shard task's samples,
decodes and transforms their images (in ``decode_workers`` processes, ahead of the model),
runs the similarity model batch by batch, and writes the store shard atomically with a done
record last. ``embed`` plans the tasks, skips those already done from the same input and model,
runs the rest on an executor and writes the manifest.

A clip-retrieval folder as source is not re-embedded: ``embed`` records the model the user names
for it in a link store that reads the folder in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from simgap.data.images import decode_rgb
from simgap.data.sources import Record, SourceShard, shard_tasks
from simgap.data.tables import is_table
from simgap.data.transforms import SplitTransform, split_transform
from simgap.io import fingerprint
from simgap.lock import locks_output
from simgap.models import (
    DeviceError,
    LoadedModel,
    ModelSpec,
    check_device,
    ieee_fp32,
    load_model,
    model_identity,
    numerics_identity,
)
from simgap.parallel import Executor, LocalEngine, Progress, RayEngine, ThreadEngine, task_device
from simgap.store import Store, StoreWriter, is_clip_retrieval, link_clip_retrieval, normalize_fp16
from simgap.types import Log

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=2)
def _cached_model(spec: ModelSpec, device: str) -> LoadedModel:
    # One load per worker process, reused across that process's shards.
    return load_model(spec, device=device)


def autocast_dtype(device: str, precision: str) -> torch.dtype | None:
    """The autocast dtype for a device and precision choice; None runs in float32.

    ``auto`` is bf16 on GPUs that support it natively (Ampere and later), else fp16 on GPU,
    float32 on CPU. fp16 on CPU is refused: CPU fp16 matmul is two orders of magnitude slower
    than float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {PRECISIONS}")
    on_gpu = str(device).startswith("cuda")
    if precision == "auto":
        if not on_gpu:
            return None
        # Emulated bf16 (a V100 "supports" it in software) is far slower than fp16.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if precision == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a GPU (device cuda); on CPU use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Intra-op threads of every embed forward. CPU conv/GEMM kernels (oneDNN, the im2col GEMM) pick
# their algorithm from the input shape *and* the thread count, and algorithms differ in the last
# float bits: a fixed count (and fixed shapes, see ``padded``) makes the stored bytes the same in
# any process (CLI, pool worker, Ray task), whatever ``torch.set_num_threads`` it runs with.
FORWARD_THREADS = 1


@contextlib.contextmanager
def forward_threads(n: int = FORWARD_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows``: a shard's last, partial batch then runs the
    same kernels as its full batches (each image's result does not depend on the other rows,
    only on the batch shape)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


def _autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def forward_context(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """What every embed forward runs under: ``FORWARD_THREADS``, inference mode, float32 GPU
    kernels in IEEE float32 (no TF32) and autocast to ``dtype`` (None: none)."""
    with forward_threads(), torch.inference_mode(), ieee_fp32(), _autocast(device, dtype):
        yield


def encode_batch(
    loaded: LoadedModel,
    pixels: torch.Tensor,
    device: str,
    precision: str = "auto",
    rows: int = 0,
) -> np.ndarray:
    """One batch of preprocessed images → float32 image features (not yet normalised).

    The forward runs on ``rows`` rows (the batch zero-padded; 0: as given) with
    ``FORWARD_THREADS`` threads, so an image's bytes do not depend on its batch or process.
    """
    dtype = autocast_dtype(device, precision)
    x = padded(pixels, rows).to(device, non_blocking=True)
    with forward_context(device, dtype):
        return loaded.model.encode_image(x)[: len(pixels)].float().cpu().numpy()


def encode_texts(
    loaded: LoadedModel, texts: list[str], device: str, batch_size: int, precision: str = "auto"
) -> np.ndarray:
    """Captions → float32 text features; a missing caption is embedded as the empty string.

    Batches are padded to ``batch_size`` and run with ``FORWARD_THREADS``, as images are."""
    dtype = autocast_dtype(device, precision)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(texts[start : start + batch_size])
        x = padded(tokens, batch_size).to(device)
        with forward_context(device, dtype):
            out.append(loaded.model.encode_text(x)[: len(tokens)].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class Batch:
    """Up to ``batch_size`` samples of one shard, ready for the forward: the decodable ones' keys,
    metadata and normalised pixels (None if none decoded), and what was skipped and why.
    ``shard`` is the shard's index in its group; its ``last`` batch also carries what reading
    the shard skipped (unsafe members, a cut tar)."""

    shard: int
    last: bool
    keys: list[str]
    meta: list[dict[str, Any]]
    pixels: torch.Tensor | None
    skipped: Counter


def prepare_batch(
    transform: SplitTransform, records: list[Record], shard: int = 0, last: bool = True
) -> Batch:
    """Decode, transform and stack one batch of records (in a decode worker, if any)."""
    skipped: Counter[str] = Counter()
    keys, meta, pixels = [], [], []
    for key, data, columns in records:
        image = decode_rgb(data, skipped)
        if image is not None:
            keys.append(key)
            meta.append(columns)
            pixels.append(transform.per_image(image))
    stacked = transform.batch(pixels) if pixels else None
    return Batch(shard, last, keys, meta, stacked, skipped)


def marked_chunks(records: Iterable[Record], size: int) -> Iterator[tuple[list[Record], bool]]:
    """``size`` records at a time, the last chunk marked; an empty shard gives one empty chunk.
    The mark is given once the records have run out, so the reader's skip counts are final."""
    held: list[Record] | None = None
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            if held is not None:
                yield held, False
            held, chunk = chunk, []
    if chunk:
        if held is not None:
            yield held, False
        held = chunk
    yield (held if held is not None else []), True


class GroupBatches(torch.utils.data.IterableDataset):
    """The ``Batch``es of a group of shard tasks, shard after shard, in order.

    Batches never span two shards (each shard's last batch is short), so the bytes are those of
    embedding each shard alone. Under a DataLoader with N workers, worker w prepares the group's
    batches w, w+N, ... (each worker reads every shard, only decodes its own batches); the
    DataLoader takes them round-robin, which is the original order, so the bytes written do not
    depend on N. Workers run on into the next shard while the main process finishes the
    previous one: a group pays the workers' start-up once, not once a shard. The pixels cross to
    the main process in shared memory, so the main process does nothing but the forward.

    The first ``skip`` batches are left out (the main process prepares them itself, see
    ``prepared_batches``); ``stop`` ends the iteration after that many batches.
    """

    def __init__(
        self,
        tasks: tuple[SourceShard, ...],
        transform: SplitTransform,
        batch_size: int,
        skip: int = 0,
        stop: int | None = None,
    ):
        self.tasks, self.transform, self.batch_size = tasks, transform, batch_size
        self.skip, self.stop = skip, stop

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = 0
        for i, task in enumerate(self.tasks):
            read_skips: Counter[str] = Counter()
            for chunk, last in marked_chunks(task.records(read_skips), self.batch_size):
                if b == self.stop:
                    return
                if b >= self.skip and (b - self.skip) % workers == worker:
                    batch = prepare_batch(self.transform, chunk, i, last)
                    if last:
                        batch.skipped.update(read_skips)
                    yield batch
                b += 1


def _as_is(item: Any) -> Any:
    return item  # the DataLoader's default collate would try to collate a Batch


def prepared_batches(
    tasks: tuple[SourceShard, ...], transform: SplitTransform, batch_size: int, workers: int = 0
) -> Iterable[Batch]:
    """Decode + transform in this process (``workers`` 0) or in a DataLoader's worker
    processes, which run ahead of the model (decode is Python-heavy: threads would share the
    GIL with it).

    With workers, this process prepares the group's first batch itself while the workers start
    up and prepare the next ones: the forward begins one batch earlier, instead of waiting for a
    worker's start-up and first batch (~25 % of a 1,000-image shard's time on 2 CPUs)."""
    if workers <= 0:
        return GroupBatches(tasks, transform, batch_size)
    loader = torch.utils.data.DataLoader(
        GroupBatches(tasks, transform, batch_size, skip=1),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=2,
    )
    return _primed(loader, GroupBatches(tasks, transform, batch_size, stop=1))


def _primed(loader: Iterable[Batch], first: Iterable[Batch]) -> Iterator[Batch]:
    batches = iter(loader)  # starts the workers
    yield from first
    yield from batches


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
            loaded = _cached_model(self.spec, device)
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


def _remove_stale_temporaries(out: Path) -> None:
    # A killed run leaves write_atomic's temp files; only the planner removes them, before any
    # worker of this run starts writing.
    for sub in ("emb", "keys", "text", "done"):
        for tmp in (out / sub).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


@locks_output("out")
def embed(
    source: str | Path,
    out: Path,
    spec: ModelSpec,
    executor: Executor | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    shard_size: int = 1000,
    progress: Log | None = None,
    *,
    decode_workers: int | None = None,
    text: bool = False,
    precision: str = "auto",
) -> Store:
    """Embed ``source`` into the store at ``out`` (resuming a killed run). ``decode_workers``
    None: ``auto_decode_workers``."""
    out = Path(out)
    if not is_table(source) and is_clip_retrieval(source):
        return link_clip_retrieval(out, Path(source), model_identity(spec))
    autocast_dtype(device, precision)  # a bad choice fails before any work
    executor = executor or Executor(LocalEngine(1))
    if _on_this_machine(executor):
        check_device(device)  # a Ray task checks its own (the head may have no GPU)
    tasks = shard_tasks(source, shard_size)
    probe = probe_device(executor, device)
    loaded = _cached_model(spec, probe)
    dim = _dim_of(spec, probe)
    manifest_source: dict[str, Any] = {"spec": str(source)}
    writer = StoreWriter(out, loaded.identity, dim, manifest_source)
    _remove_stale_temporaries(out)
    # A rerun may rewrite shards (the source or the model changed): until finish() writes the
    # new manifest the folder must read as unfinished, never as the old store over new shards.
    (out / "manifest.json").unlink(missing_ok=True)
    if decode_workers is None:
        decode_workers = auto_decode_workers(executor)
    worker = EmbedShard(
        str(out),
        spec,
        dim,
        device,
        batch_size,
        decode_workers,
        text,
        precision,
        loaded.identity["checkpoint_sha256"] or "",
    )
    groups = _groups(tasks, executor, decode_workers)
    on_done = Progress(f"embed {out.name}", progress)
    if any(len(g) > 1 for g in groups):  # groups run in this process: a line per shard still
        worker = dataclasses.replace(worker, on_shard=_EachShard(on_done, len(tasks)))
        done = executor.map(worker, groups)
    else:
        done = executor.map(worker, groups, on_done=on_done)
    return writer.finish([r for group in done for r in group["shards"]])


@dataclass
class _EachShard:
    """Feeds a group's shards to the progress reporter one by one, each shard once (a retried
    group reports its finished shards again)."""

    progress: Progress
    total: int
    seen: set[str] = field(default_factory=set)

    def __call__(self, record: dict[str, Any]) -> None:
        if record["name"] not in self.seen:
            self.seen.add(record["name"])
            self.progress(len(self.seen), self.total, record)


# Shards embedded one after another in this process with decode workers go in groups, so that the
# workers run on from one shard into the next; a process pool or a cluster gets single shards to
# spread, and so does a run without decode workers (nothing to keep running).
GROUP_SHARDS = 8


def _groups(
    tasks: list[SourceShard], executor: Executor, decode_workers: int
) -> list[tuple[SourceShard, ...]]:
    size = GROUP_SHARDS if _in_process(executor) and decode_workers > 0 else 1
    return [tuple(tasks[i : i + size]) for i in range(0, len(tasks), size)]


def probe_device(executor: Executor, device: str) -> str:
    """Where the driver loads the model to read its identity and dimension: shards embedded
    elsewhere (a pool, Ray) load their own model, so the driver uses the CPU rather than hold a
    GPU (one a task may need) for nothing; in this process the tasks reuse the driver's model."""
    return device if _in_process(executor) else "cpu"


def auto_decode_workers(executor: Executor) -> int:
    """Decode processes when the caller did not choose: the spare CPUs (at most 8) when shards
    run one after another in this process; under Ray a GPU task's own CPUs but one (the model
    waits on decoding otherwise); none under a process pool or for Ray's CPU tasks, whose
    tasks already take the CPUs."""
    engine = executor.engine
    if isinstance(engine, RayEngine) and engine.num_gpus > 0:
        return max(0, min(8, int(engine.num_cpus) - 1))
    if not _in_process(executor):
        return 0
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def _on_this_machine(executor: Executor) -> bool:
    return isinstance(executor.engine, (LocalEngine, ThreadEngine))


def _in_process(executor: Executor) -> bool:
    """Whether the executor runs its tasks one after another in this process."""
    engine = executor.engine
    return isinstance(engine, LocalEngine) and engine.workers <= 1
