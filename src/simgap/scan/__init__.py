"""Exact fused scan of a base set against test points.

kernel/: the math on one tile (and ``KernelConfig``, the scan's only tuning knobs); scan.py:
streaming blocks through the kernel in one process; shards.py: a store scanned shard by shard on
an executor (local or Ray), resumable, partials merged; layout.py: the scan folder on disk;
lookup.py: an approximate FAISS IVF index for interactive look-ups (never for decisions).
"""

from simgap.scan.kernel import KernelConfig, merge_topk, resolve_precision
from simgap.scan.layout import iter_scan_rows, load_scan, load_tests_table, write_scan
from simgap.scan.scan import ScanResult, find_bad_rows, scan_arrays
from simgap.scan.shards import ScanOptions, scan_store

__all__ = [
    "KernelConfig",
    "ScanOptions",
    "ScanResult",
    "find_bad_rows",
    "iter_scan_rows",
    "load_scan",
    "load_tests_table",
    "merge_topk",
    "resolve_precision",
    "scan_arrays",
    "scan_store",
    "write_scan",
]
