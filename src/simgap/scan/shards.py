"""Scan an embedding store shard by shard on an executor; merge the shards' per-test partials.

Each shard is one task (``ShardScan``, a picklable callable): it scans that shard's rows against
all tests and writes ``rows/<shard>.npy`` (per-row outputs), ``parts/<shard>.npy`` (per-test top-k
and counts over the shard) and last ``done/<shard>.json``, each atomically. A rerun skips every
shard whose done record carries the same input fingerprint, so a killed scan resumes where it
stopped. The driver then merges the partials in shard order with ``merge_topk`` (a total order:
similarity descending, row id ascending), so any engine, any worker count and any completion
order give the same bytes as one process scanning the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from simgap.io import fingerprint, read_json, sha256_array, sha256_file, write_json, write_npy
from simgap.layout import done_record
from simgap.parallel import Executor, LocalEngine, task_device
from simgap.scan.kernel import KernelConfig, merge_topk
from simgap.scan.layout import (
    FORMAT,
    part_records,
    row_records,
    test_table,
    write_tests_and_meta,
)
from simgap.scan.scan import RowProgress, ScanResult, check_tests, find_bad_rows, scan_arrays
from simgap.store import ShardInfo, Store, StoreError

BAD_ROW_POLICIES = ("error", "skip")
FIRST_KEYS = 5  # keys named in a bad-row error or record


@dataclass(frozen=True, repr=False)
class ScanShard:
    name: str
    offset: int
    rows: int
    keep: np.ndarray | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        # Executor errors name the task: keep that line short (no mask array in it).
        return f"shard {self.name}"


def exclude_bad_rows(
    store: Store, shard: str, emb: np.ndarray, keep: np.ndarray | None, policy: str
) -> tuple[np.ndarray | None, int, list[str]]:
    """Check a shard's rows; NaN/Inf or non-unit rows raise (``error``) or leave ``keep``
    (``skip``). Returns the keep mask, the number of bad rows and the first bad keys."""
    bad = find_bad_rows(emb)
    if keep is not None:
        bad = bad[keep[bad]]  # rows excluded anyway do not count
    if len(bad) == 0:
        return keep, 0, []
    first = store.read_keys(shard).column("key").take(pa.array(bad[:FIRST_KEYS])).to_pylist()
    if policy == "error":
        raise ValueError(
            f"{store.path}/emb/{shard}.npy: {len(bad)} rows are NaN/Inf or not unit-norm "
            f"(first keys: {', '.join(first)}); re-embed them or scan with --skip-bad"
        )
    keep = np.ones(len(emb), bool) if keep is None else keep.copy()
    keep[bad] = False
    return keep, len(bad), first


@dataclass(frozen=True)
class ShardScan:
    """The per-shard scan, the same function on every engine. The store travels as its
    (small) manifest, not re-opened per task; tests are read from the scan folder (``inputs/``),
    not shipped in the task: a process pool pickles every task."""

    store: Store
    out: str
    topk: int
    config: KernelConfig
    bad_rows: str
    inputs: str  # fingerprint of tests, thresholds, k, groups and format
    groups: tuple[tuple[int, int], ...] | None = None  # test ranges of the benchmarks

    def fingerprint(self, info: ShardInfo, keep: np.ndarray | None) -> str:
        # The partials hold global row ids: a shard whose offset moved (an earlier shard gained or
        # lost rows) must be rescanned even if its own bytes are unchanged.
        shard = [info.sha256, info.offset, info.rows]
        parts = [FORMAT, self.inputs, shard, sha256_array(keep), self.bad_rows]
        return fingerprint(parts)

    def __call__(self, task: ScanShard) -> dict[str, Any]:
        out = Path(self.out)
        store = self.store
        info = next((s for s in store.shards if s.name == task.name), None)
        if info is None:
            raise StoreError(f"{store.path}: no shard {task.name}")
        fp = self.fingerprint(info, task.keep)
        done = _done_record(out, task.name, fp)
        if done is not None:
            return done
        verify_shard(store, info)
        emb = store.read_emb(task.name)
        if len(emb) != info.rows:
            raise StoreError(f"{store.path}/emb/{task.name}.npy: {len(emb)} rows, not {info.rows}")
        keep, n_bad, bad_keys = exclude_bad_rows(store, task.name, emb, task.keep, self.bad_rows)
        tests = np.load(out / "inputs" / "tests.npy")
        thr_path = out / "inputs" / "thresholds.npy"
        thresholds = np.load(thr_path) if thr_path.exists() else None
        # Under Ray or a GPU-spread pool the task's GPU is only known here.
        config = replace(self.config, device=task_device(self.config.device))
        res = scan_arrays(
            [(task.offset, emb, keep)], tests, thresholds, self.topk, config, groups=self.groups
        )
        write_npy(
            out / "rows" / f"{task.name}.npy",
            row_records(res.row_max, res.row_argmax, res.row_margin),
        )
        write_npy(
            out / "parts" / f"{task.name}.npy",
            part_records(res.topk_sim, res.topk_row, res.count_above),
        )
        record = {
            "name": task.name,
            "rows": info.rows,
            "scanned": info.rows if keep is None else int(keep.sum()),
            "bad_rows": n_bad,
            "bad_keys": bad_keys,
            "fingerprint": fp,
        }
        # Written last: the done record is what marks the shard finished.
        write_json(done_record(out, task.name), record)
        return record


def _done_record(out: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    path = done_record(out, name)
    if not path.exists():
        return None
    record = read_json(path)
    outputs = (out / "rows" / f"{name}.npy", out / "parts" / f"{name}.npy")
    if record.get("fingerprint") != fingerprint or not all(p.exists() for p in outputs):
        return None
    return record


def merge_parts(
    out: Path, shards: list[str], m: int, k: int, with_count: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fold the shards' per-test partials, in shard order, into the store's top-k and counts."""
    sim = np.full((m, k), -np.inf, np.float32)
    row = np.full((m, k), -1, np.int64)
    count = np.zeros(m, np.int64)
    for name in shards:
        path = out / "parts" / f"{name}.npy"
        part = np.load(path)
        if part.shape != (m,) or part["sim"].shape[1:] != (k,):
            raise ValueError(f"{path}: partial for {part.shape} tests, expected {m} x k={k}")
        if k:
            sim, row = merge_topk((sim, row), (part["sim"], part["row"]))
        count += part["count"]
    return sim, row, count if with_count else None


def topk_keys(store: Store, rows: np.ndarray) -> np.ndarray:
    """Base keys of global row ids (None at -1 padding), reading one shard's keys at a time."""
    keys = np.full(rows.shape, None, object)
    for s in store.shards:
        sel = (rows >= s.offset) & (rows < s.offset + s.rows)
        if sel.any():
            col = store.read_keys(s.name).column("key").to_numpy(zero_copy_only=False)
            keys[sel] = col[rows[sel] - s.offset]
    return keys


def verify_shard(store: Store, info: ShardInfo) -> None:
    """A shard rewritten since the manifest (another run, a partial copy, bit rot) must not be
    scanned silently. One SHA-256 pass costs far less than the scan of the same bytes.
    (clip-retrieval folders are identified by file size and mtime, not a checksum.)"""
    if not info.sha256 or info.sha256.startswith("stat:"):
        return
    path = store.path / "emb" / f"{info.name}.npy"
    if sha256_file(path, chunk=1 << 20) != info.sha256:  # small reads: memory stays one shard
        raise StoreError(f"{path}: checksum does not match {store.path}/manifest.json")


def _store_blocks(
    store: Store, masks: dict[str, np.ndarray] | None, policy: str, bad: list[tuple[int, list]]
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    for s in store.shards:
        verify_shard(store, s)
        emb = store.read_emb(s.name)
        keep = None if masks is None else masks[s.name]
        keep, n_bad, first = exclude_bad_rows(store, s.name, emb, keep, policy)
        bad.append((n_bad, first))
        yield s.offset, emb, keep


@dataclass(frozen=True)
class ScanOptions:
    """How ``scan_store`` scans and what it keeps; the store, tests and thresholds are its
    arguments.

    ``keep(shard_name)`` returns a bool mask of that shard's rows to scan (a split rescanned
    without copying). Rows that are NaN/Inf or not unit-norm raise a ValueError naming their
    keys (``bad_rows="error"``) or are excluded and counted (``"skip"``).

    ``groups``: (benchmark name, start, stop) of consecutive test ranges; the per-row outputs
    are then per benchmark, (N, B), from the same one pass over the store (``scan_arrays``).

    Without ``out_dir`` the shards stream through this process (read ahead on a thread) and
    everything is returned in memory. With ``out_dir`` every shard is a task on ``executor``
    (default: this process) writing its outputs and a done record (resumable), the partials are
    merged, and the per-test outputs (plus ``test_info`` columns such as benchmark and key, see
    ``layout.py``) and ``scan.json`` are written; ``return_rows=False`` keeps the per-row
    outputs out of memory (read them back per shard with ``iter_scan_rows``)."""

    topk: int = 10
    keep: Callable[[str], np.ndarray] | None = None
    out_dir: Path | str | None = None
    progress: RowProgress | None = None
    config: KernelConfig | None = None
    executor: Executor | None = None
    return_rows: bool = True
    test_info: pa.Table | None = None
    bad_rows: str = "error"
    groups: Sequence[tuple[str, int, int]] | None = None


def scan_store(
    base: Store,
    tests: np.ndarray,
    thresholds: np.ndarray | None = None,
    options: ScanOptions | None = None,
) -> ScanResult:
    """Exact fused scan of an embedding store against ``tests`` (M, d), with a margin against
    ``thresholds`` (M,) when given; ``options`` (``ScanOptions``) says how."""
    opts = options or ScanOptions()
    # An "auto" screen on CUDA is chosen by measurement where the shards are scanned, not here.
    cfg = (opts.config or KernelConfig()).resolved(measure=False)
    tests = np.asarray(tests)
    thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
    check_tests(tests, thresholds, opts.topk)
    if opts.bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, not {opts.bad_rows!r}")
    if tests.shape[1] != base.dim:
        raise ValueError(f"{base.path}: dim {base.dim}, tests have d={tests.shape[1]}")
    keep = opts.keep
    masks = None if keep is None else {s.name: _mask(keep, s.name, s.rows) for s in base.shards}
    if opts.out_dir is None:
        if opts.executor is not None:
            raise ValueError("scanning on an executor needs out_dir (shards hand over files)")
        bad: list[tuple[int, list]] = []
        res = scan_arrays(
            _store_blocks(base, masks, opts.bad_rows, bad),
            tests,
            thresholds,
            opts.topk,
            cfg,
            progress=opts.progress,
            rows_total=base.rows,
            groups=None if opts.groups is None else [(a, b) for _, a, b in opts.groups],
        )
        res.bad_rows = sum(n for n, _ in bad)
        return res
    job = ScanJob(
        base=base,
        tests=tests,
        thresholds=thresholds,
        masks=masks,
        out=Path(opts.out_dir),
        cfg=cfg,
        executor=opts.executor or Executor(LocalEngine(1)),
        options=opts,
    )
    return _scan_shards(job)


def _mask(keep: Callable[[str], np.ndarray], name: str, rows: int) -> np.ndarray:
    mask = np.asarray(keep(name), bool)
    if mask.shape != (rows,):
        raise ValueError(f"keep mask for shard {name}: shape {mask.shape}, shard has {rows} rows")
    return mask


@dataclass(frozen=True)
class ScanJob:
    """One sharded scan, validated by ``scan_store``: what ``_scan_shards`` runs."""

    base: Store
    tests: np.ndarray
    thresholds: np.ndarray | None
    masks: dict[str, np.ndarray] | None  # shard name -> rows to scan; None: every row
    out: Path
    cfg: KernelConfig  # options.config resolved
    executor: Executor
    options: ScanOptions


def _scan_shards(job: ScanJob) -> ScanResult:
    base, tests, thresholds, masks = job.base, job.tests, job.thresholds, job.masks
    out, cfg, executor, opts = job.out, job.cfg, job.executor, job.options
    topk, progress, bad_rows, groups = opts.topk, opts.progress, opts.bad_rows, opts.groups
    # A scan.json left by an earlier run would mark this folder finished while it is rewritten.
    (out / "scan.json").unlink(missing_ok=True)
    write_npy(out / "inputs" / "tests.npy", tests)
    thr_path = out / "inputs" / "thresholds.npy"
    if thresholds is not None:
        write_npy(thr_path, thresholds)
    else:
        thr_path.unlink(missing_ok=True)
    inputs = {
        "tests_sha256": sha256_array(tests),
        "tests_dtype": str(tests.dtype),
        "thresholds_sha256": sha256_array(thresholds),
        "topk": topk,
    }
    spans = None if groups is None else tuple((int(a), int(b)) for _, a, b in groups)
    if groups is not None:
        inputs["benchmarks"] = [[n, a, b] for n, a, b in groups]
    inputs_fp = fingerprint(inputs)
    fn = ShardScan(base, str(out), topk, cfg, bad_rows, inputs_fp, spans)
    tasks = [
        ScanShard(s.name, s.offset, s.rows, None if masks is None else masks[s.name])
        for s in base.shards
    ]
    rows_done = [0]

    def on_done(finished: int, total: int, record: dict[str, Any]) -> None:
        rows_done[0] += record["rows"]
        if progress is not None:
            progress(rows_done[0], base.rows)

    records = executor.map(fn, tasks, on_done=on_done)
    names = [t.name for t in tasks]
    m = len(tests)
    sim, row, count = merge_parts(out, names, m, topk, thresholds is not None)
    n_bad = sum(r["bad_rows"] for r in records)
    first_bad = [k for r in records for k in r["bad_keys"]][:FIRST_KEYS]
    result = ScanResult(sim, row, count, None, None, None, bad_rows=n_bad)
    keys = topk_keys(base, row) if topk else None
    meta = {
        # No paths: scan.json is a fingerprint of its inputs and must not depend on location.
        "inputs": {
            **inputs,
            "base": {"rows": base.rows, "shards_sha256": [s.sha256 for s in base.shards]},
            "keep_sha256": None
            if masks is None
            else sha256_array(
                np.concatenate([masks[n] for n in names]) if names else np.zeros(0, bool)
            ),
            "model": base.model,
        },
        "bad_rows": {"policy": bad_rows, "count": n_bad, "first_keys": first_bad},
    }
    if groups is not None:
        meta["benchmarks"] = [{"name": n, "start": a, "stop": b} for n, a, b in groups]
    shards = [{"name": s.name, "offset": s.offset, "rows": s.rows} for s in base.shards]
    table = test_table(result, opts.test_info, thresholds, keys)
    write_tests_and_meta(result, out, shards, table, meta)
    if opts.return_rows:
        recs = [np.load(out / "rows" / f"{n}.npy") for n in names]
        shape = (0,) if groups is None else (0, len(groups))
        rec = (
            np.concatenate(recs)
            if recs
            else row_records(
                np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, np.float32)
            )
        )
        result.row_max, result.row_argmax = rec["max"].copy(), rec["argmax"].copy()
        result.row_margin = rec["margin"].copy() if thresholds is not None else None
    return result
