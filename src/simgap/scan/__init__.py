"""Exact fused scan of a base set against test points (kernel.py: one tile; scan.py: streaming)."""

from simgap.scan.kernel import merge_topk, resolve_precision
from simgap.scan.scan import (
    ScanResult,
    iter_scan_rows,
    kernel_config,
    load_scan,
    scan_arrays,
    scan_store,
    write_scan,
)

__all__ = [
    "ScanResult",
    "iter_scan_rows",
    "kernel_config",
    "load_scan",
    "merge_topk",
    "resolve_precision",
    "scan_arrays",
    "scan_store",
    "write_scan",
]
