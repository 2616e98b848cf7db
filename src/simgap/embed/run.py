"""``embed``: plans the shard tasks, runs them on the executor and writes the manifest."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simgap.data.sources import SourceShard, shard_tasks
from simgap.data.tables import is_table
from simgap.embed.encode import autocast_dtype, cached_model, model_dim
from simgap.embed.shard import EmbedShard
from simgap.lock import locks_output
from simgap.models import ModelSpec, check_device, model_identity
from simgap.parallel import Executor, LocalEngine, Progress, RayEngine, ThreadEngine
from simgap.store import Store, StoreWriter, is_clip_retrieval, link_clip_retrieval
from simgap.types import Log


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
    loaded = cached_model(spec, probe)
    dim = model_dim(spec, probe)
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
