"""Scan a base store against benchmark stores: the one scan front-end, what ``simgap scan``,
``simgap select`` (through its ``--scans``) and every ``simgap run`` read.

The benchmarks' tests are concatenated in the order given; ``tests/tests.parquet`` names each
test's benchmark (the store folder's name) and key, and scan.json each benchmark's test range.
One pass over the base gives, per base row and per benchmark, the max similarity, its argmax and
the margin over the thresholds (``layout.py``): every split of the grid is selected from it. With
a reference store the thresholds are every test's NN similarity to it, from one pass over the
reference written to ``<out>/reference`` (same layout).
Inputs are checked before any work: same similarity model, same dim, normalised stores, and
benchmark rows free of NaN/Inf and of non-unit vectors (named by key in the error).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from simgap.io import fingerprint, read_json, sha256_array, write_json, write_npy
from simgap.layout import done_record
from simgap.lock import locks_output
from simgap.parallel import Executor, LocalEngine, task_device
from simgap.parallel import Progress as RateProgress
from simgap.scan.kernel import KernelConfig, TopKHandler, prepare_tests, scan_block
from simgap.scan.scan import RowProgress, ScanResult, check_tests, find_bad_rows
from simgap.scan.shards import FIRST_KEYS, ScanOptions, scan_store, verify_shard
from simgap.store import Store, StoreError, check_compatible, open_store
from simgap.types import Log


def check_normalized(*stores: Store) -> None:
    for s in stores:
        if s.manifest.get("normalized") is not True:
            raise StoreError(
                f"{s.path}/manifest.json: embeddings are not marked L2-normalised "
                f"(normalized={s.manifest.get('normalized')!r}); similarity needs unit vectors"
            )


def load_tests(stores: list[Store]) -> tuple[np.ndarray, pa.Table]:
    """All benchmark rows, concatenated, and a table naming each one's benchmark and key."""
    names = [s.path.name for s in stores]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark stores must have distinct folder names, got {names}")
    embs, benchmarks, keys = [], [], []
    for name, store in zip(names, stores, strict=True):
        emb = store.embeddings()
        store_keys = store.keys()
        bad = find_bad_rows(emb)
        if len(bad):
            first = ", ".join(store_keys[i] for i in bad[:FIRST_KEYS])
            raise ValueError(
                f"{store.path}: {len(bad)} test rows are NaN/Inf or not unit-norm "
                f"(first keys: {first}); re-embed that benchmark"
            )
        embs.append(emb)
        benchmarks += [name] * len(emb)
        keys += store_keys
    tests = np.concatenate(embs) if embs else np.zeros((0, 0), np.float16)
    if len(tests) == 0:
        raise ValueError(f"benchmark stores {names} hold no rows")
    info = pa.table({"benchmark": pa.array(benchmarks, pa.string()), "key": pa.array(keys)})
    return tests, info


def log_progress(label: str, log: Log, every_s: float = 5.0) -> RowProgress:
    """A ``progress(rows_done, rows_total)`` callback logging rows/s and ETA, at most every
    ``every_s`` seconds (and at the end)."""
    return RateProgress(label, log, every_s=every_s).count


def _open(store: Store | Path | str) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def benchmark_groups(info: pa.Table) -> list[tuple[str, int, int]]:
    """(benchmark, start, stop) of each benchmark's consecutive tests in ``load_tests``'s table."""
    names = info.column("benchmark").to_pylist()
    groups: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1], i + 1)
        else:
            groups.append((name, i, i + 1))
    return groups


@locks_output("out")
def scan_benchmarks(
    base: Store | Path | str,
    benchmarks: list[Store | Path | str],
    out: Path | str,
    reference: Store | Path | str | None = None,
    topk: int = 10,
    config: KernelConfig | None = None,
    executor: Executor | None = None,
    bad_rows: str = "error",
    log: Log | None = None,
) -> ScanResult:
    """Scan ``base`` against every benchmark at once (one pass, per-benchmark row outputs), with
    thresholds from ``reference`` (one pass over it)."""
    base_store = _open(base)
    test_stores = [_open(b) for b in benchmarks]
    ref_store = None if reference is None else _open(reference)
    stores = [base_store, *test_stores, *([ref_store] if ref_store else [])]
    check_compatible(*stores)
    check_normalized(*stores)
    tests, info = load_tests(test_stores)
    groups = benchmark_groups(info)
    out = Path(out)
    # What the reference pass and the pool pass share; each adds its own topk, folder, progress.
    shared = ScanOptions(
        config=config,
        executor=executor,
        return_rows=False,
        test_info=info,
        bad_rows=bad_rows,
        groups=groups,
    )

    def progress(what: str):
        return None if log is None else log_progress(what, log)

    thresholds = None
    if ref_store is not None:
        if ref_store.rows == 0:
            raise ValueError(f"{ref_store.path}: the reference store has no rows")
        ref_options = replace(
            shared, topk=1, out_dir=out / "reference", progress=progress("reference scan")
        )
        ref = scan_store(ref_store, tests, options=ref_options)
        thresholds = ref.topk_sim[:, 0].copy()
        if not np.isfinite(thresholds).all():
            raise ValueError(
                f"{ref_store.path}: every reference row was excluded; no thresholds to use"
            )
    options = replace(shared, topk=topk, out_dir=out, progress=progress("scan"))
    return scan_store(base_store, tests, thresholds, options)


# ----------------------------------------------------------------------------- the splits' check


@dataclass(frozen=True, repr=False)
class SplitsTask:
    """One base shard and, per split, which of its rows the split keeps (bit-packed)."""

    name: str
    offset: int
    rows: int
    keep: np.ndarray  # (splits, ceil(rows / 8)) uint8, np.packbits of each split's mask

    def __repr__(self) -> str:
        return f"shard {self.name}"


@dataclass(frozen=True)
class SplitsScan:
    """Per shard, each split's nearest kept row for every test: the shard is read and moved to
    the device once, the tests prepared once, and each split's kept rows go through the kernel
    with a top-1 handler (the exact total order: similarity descending, row ascending)."""

    store: Store
    out: str
    config: KernelConfig
    inputs: str  # fingerprint of the tests and the format

    def fingerprint(self, task: SplitsTask, sha256: str) -> str:
        return fingerprint([CHECK_FORMAT, self.inputs, sha256, task.offset, task.rows,
                            sha256_array(task.keep)])  # fmt: skip

    def __call__(self, task: SplitsTask) -> dict[str, Any]:
        out = Path(self.out)
        info = next((s for s in self.store.shards if s.name == task.name), None)
        if info is None:
            raise StoreError(f"{self.store.path}: no shard {task.name}")
        fp = self.fingerprint(task, info.sha256)
        done = done_record(out, task.name)
        part = out / "parts" / f"{task.name}.npy"
        if done.exists() and part.exists() and read_json(done).get("fingerprint") == fp:
            return read_json(done)
        verify_shard(self.store, info)
        emb = self.store.read_emb(task.name)
        tests = np.load(out / "inputs" / "tests.npy")
        keep = np.unpackbits(task.keep, axis=1, count=task.rows).astype(bool)
        cfg = replace(self.config, device=task_device(self.config.device)).resolved()
        sim, row = _splits_top1(np.array(emb), task.offset, keep, tests, cfg)
        write_npy(part, _check_records(sim, row))
        record = {"name": task.name, "rows": task.rows, "fingerprint": fp}
        write_json(done, record)  # last: marks the shard finished
        return record


CHECK_FORMAT = "simgap-splits-check/1"
SPLIT_CHUNK = 1 << 16  # kept rows per kernel call: bounds the gathered copy


def _splits_top1(
    emb: np.ndarray, offset: int, keep: np.ndarray, tests: np.ndarray, cfg: KernelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(splits, tests) NN similarity and global row over each split's kept rows of one shard;
    -inf / -1 where a split keeps none of them. ``cfg`` resolved."""
    dev = torch.device(cfg.device)
    test_set = prepare_tests(
        torch.from_numpy(tests).to(dev), None, cfg.precision, cfg.tile_tests, cfg.test_group
    )
    x_all = torch.from_numpy(emb).to(dev)  # the shard, read once: a copy, not the memmap
    sim = np.full((len(keep), len(tests)), -np.inf, np.float32)
    row = np.full((len(keep), len(tests)), -1, np.int64)
    for s, mask in enumerate(keep):
        kept = np.flatnonzero(mask)
        if not len(kept):
            continue
        top = TopKHandler(len(tests), 1, dev)
        for c0 in range(0, len(kept), SPLIT_CHUNK):
            local = torch.from_numpy(kept[c0 : c0 + SPLIT_CHUNK]).to(dev)
            x = x_all.index_select(0, local)
            scan_block(x, local + offset, test_set, [top], cfg)
        best, at = top.result()
        sim[s], row[s] = best[:, 0].cpu().numpy(), at[:, 0].cpu().numpy()
    return sim, row


def _check_records(sim: np.ndarray, row: np.ndarray) -> np.ndarray:
    rec = np.empty(sim.shape, dtype=[("sim", "<f4"), ("row", "<i8")])
    rec["sim"], rec["row"] = sim, row
    return rec


def split_masks(base: Store, keys: list[list[str]]) -> dict[str, np.ndarray]:
    """Per shard, which rows each split's written keys (``keys``: one list per split) keep, as
    (splits, ceil(rows / 8)) ``np.packbits`` bits: 41 splits of a 2x10^8-row pool hold 1 GB.
    The base's keys are read once; each split's key set is hashed once, for all shards."""
    columns = [base.read_keys(s.name).column("key") for s in base.shards]
    every = pa.chunked_array([c for col in columns for c in col.chunks], pa.string())
    packed = {s.name: np.zeros((len(keys), (s.rows + 7) // 8), np.uint8) for s in base.shards}
    for i, split in enumerate(keys):
        mask = pc.is_in(every, value_set=pa.array(split, pa.string()))
        mask = mask.to_numpy(zero_copy_only=False).astype(bool, copy=False)
        for s in base.shards:
            packed[s.name][i] = np.packbits(mask[s.offset : s.offset + s.rows])
    return packed


def scan_splits(
    base: Store,
    tests: np.ndarray,
    masks: dict[str, np.ndarray],
    out: Path | str,
    config: KernelConfig | None = None,
    executor: Executor | None = None,
    log: Log | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every split's guarantee check in one pass over ``base``: per split and test, the NN
    similarity (and global row) among the split's kept rows (``masks``: per shard, the
    ``split_masks`` bits). -inf / -1 where a split keeps no row. Resumable per shard like
    ``scan_store``."""
    out = Path(out)
    cfg = (config or KernelConfig()).resolved()
    tests = np.asarray(tests)
    check_tests(tests, None, 1)
    if tests.shape[1] != base.dim:
        raise ValueError(f"{base.path}: dim {base.dim}, tests have d={tests.shape[1]}")
    n_splits = len(next(iter(masks.values()))) if masks else 0
    (out / "check.json").unlink(missing_ok=True)
    write_npy(out / "inputs" / "tests.npy", tests)
    inputs = fingerprint([CHECK_FORMAT, sha256_array(tests), str(tests.dtype)])
    fn = SplitsScan(base, str(out), cfg, inputs)
    tasks = [SplitsTask(s.name, s.offset, s.rows, masks[s.name]) for s in base.shards]
    progress = RateProgress("splits check", log)
    (executor or Executor(LocalEngine(1))).map(fn, tasks, on_done=progress)
    sim = np.full((n_splits, len(tests)), -np.inf, np.float32)
    row = np.full((n_splits, len(tests)), -1, np.int64)
    for t in tasks:
        part = np.load(out / "parts" / f"{t.name}.npy")
        # The top-1 of merge_topk's total order (similarity descending, row ascending), for every
        # split and test at once: any shard order gives these bytes.
        p_sim, p_row = part["sim"], part["row"]
        tie = (p_sim == sim) & (p_row >= 0) & ((row < 0) | (p_row < row))
        better = (p_sim > sim) | tie
        sim, row = np.where(better, p_sim, sim), np.where(better, p_row, row)
    write_npy(out / "nn_sim.npy", sim)
    write_npy(out / "nn_row.npy", row)
    write_json(out / "check.json", {"format": CHECK_FORMAT, "splits": n_splits,
                                    "tests": len(tests), "rows": base.rows})  # fmt: skip
    return sim, row
