"""Scan a base store against benchmark stores (what ``simgap scan`` runs).

The benchmarks' tests are concatenated in the order given; ``tests/tests.parquet`` names each
test's benchmark (the store folder's name) and key. With a reference store the thresholds are
every test's NN similarity to it, from a scan written to ``<out>/reference`` (same layout).
Inputs are checked before any work: same similarity model, same dim, normalised stores, and
benchmark rows free of NaN/Inf and of non-unit vectors (named by key in the error).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from simgap.lock import locks_output
from simgap.parallel import Executor
from simgap.parallel import Progress as RateProgress
from simgap.scan.kernel import KernelConfig
from simgap.scan.scan import Progress, ScanResult, find_bad_rows
from simgap.scan.shards import FIRST_KEYS, scan_store
from simgap.store import Store, StoreError, check_compatible, open_store


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


def log_progress(label: str, log: Callable[[str], None], every_s: float = 5.0) -> Progress:
    """A ``progress(rows_done, rows_total)`` callback logging rows/s and ETA, at most every
    ``every_s`` seconds (and at the end)."""
    return RateProgress(label, log, every_s=every_s).count


@locks_output("out")
def scan_benchmarks(
    base: Path | str,
    benchmarks: list[Path | str],
    out: Path | str,
    reference: Path | str | None = None,
    topk: int = 10,
    config: KernelConfig | None = None,
    executor: Executor | None = None,
    bad_rows: str = "error",
    log: Callable[[str], None] | None = None,
) -> ScanResult:
    """Scan ``base`` against every benchmark at once, with thresholds from ``reference``."""
    base_store = open_store(base)
    test_stores = [open_store(b) for b in benchmarks]
    ref_store = None if reference is None else open_store(reference)
    stores = [base_store, *test_stores, *([ref_store] if ref_store else [])]
    check_compatible(*stores)
    check_normalized(*stores)
    tests, info = load_tests(test_stores)
    out = Path(out)
    thresholds = None
    if ref_store is not None:
        if ref_store.rows == 0:
            raise ValueError(f"{ref_store.path}: the reference store has no rows")
        ref = scan_store(
            ref_store,
            tests,
            topk=1,
            out_dir=out / "reference",
            progress=None if log is None else log_progress("reference scan", log),
            config=config,
            executor=executor,
            return_rows=False,
            test_info=info,
            bad_rows=bad_rows,
        )
        thresholds = ref.topk_sim[:, 0].copy()
        if not np.isfinite(thresholds).all():
            raise ValueError(
                f"{ref_store.path}: every reference row was excluded; no thresholds to use"
            )
    return scan_store(
        base_store,
        tests,
        thresholds=thresholds,
        topk=topk,
        out_dir=out,
        progress=None if log is None else log_progress("scan", log),
        config=config,
        executor=executor,
        return_rows=False,
        test_info=info,
        bad_rows=bad_rows,
    )
