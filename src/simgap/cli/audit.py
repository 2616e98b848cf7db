"""``simgap audit``: near-duplicates of benchmark test points in a store."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import log


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="near-duplicates of benchmark test points in a store")
    p.add_argument("base")
    p.add_argument("--benchmarks", nargs="+", required=True)
    p.add_argument("--threshold", type=float, default=0.95, help="embedding (--verify none)")
    p.add_argument(
        "--verify",
        choices=["pixels", "none"],
        default="pixels",
        help="pixels: verify top-k candidates on pixels; none: embedding threshold only",
    )
    p.add_argument("--pixel-threshold", type=float, default=0.975, help="--verify pixels")
    p.add_argument("--topk", type=int, default=10, help="candidates per test point and descriptor")
    p.add_argument("--ground-truth", help="parquet of injected pairs (the world's)")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(fn=cmd_audit)


def cmd_audit(a: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from simgap.audit import audit, store_name
    from simgap.store import open_store

    tests = {store_name(s): s for s in (open_store(b) for b in a.benchmarks)}
    truth = pq.read_table(a.ground_truth) if a.ground_truth else None
    report = audit(
        tests,
        open_store(a.base),
        a.threshold,
        truth,
        Path(a.out),
        verify=a.verify,
        pixel_threshold=a.pixel_threshold,
        topk=a.topk,
        log=log,
    )
    for name, r in report["benchmarks"].items():
        print(f"{name}: {r['contaminated']}/{r['tests']} test points ({r['fraction']:.2%})")
    if "ground_truth" in report:
        g = report["ground_truth"]
        print(f"ground truth: precision {g['precision']:.3f}, recall {g['recall']:.3f}")
    benches = report["benchmarks"].values()
    print(
        f"audit: {sum(r['contaminated'] for r in benches)} of {sum(r['tests'] for r in benches)} "
        f"test points contaminated in {len(report['benchmarks'])} benchmarks, "
        f"{report['pairs']} pairs (--verify {a.verify}) -> {a.out}"
    )
