"""``simgap scan``: the exact nearest-neighbour scan of a base store against benchmark stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import device_engine_args, engine_spec, log


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="exact NN scan of a base store against benchmark stores")
    p.add_argument("base")
    p.add_argument("--benchmarks", nargs="+", required=True)
    p.add_argument("--thresholds-from", help="reference store: thresholds = NN similarity to it")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("-o", "--out", required=True)
    device_engine_args(p)
    p.add_argument(
        "--precision",
        default="auto",
        help="screen precision: auto, fp32, bf16, int8 (see KernelConfig)",
    )
    p.add_argument("--tile-rows", type=int, help="base rows per tile (default: per device)")
    p.add_argument("--tile-tests", type=int, help="tests per tile (default: per device)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="exclude and count base/reference rows that are NaN/Inf or not unit-norm "
        "(default: refuse them, naming their keys)",
    )
    p.set_defaults(fn=cmd_scan)


def cmd_scan(a: argparse.Namespace) -> None:
    from simgap.io import read_json
    from simgap.parallel import Executor, build_engine
    from simgap.scan import KernelConfig, iter_scan_rows
    from simgap.scan.run import scan_benchmarks

    engine = build_engine(engine_spec(a), a.device)
    kernel = KernelConfig(
        precision=a.precision, device=a.device, tile_rows=a.tile_rows, tile_tests=a.tile_tests
    )
    res = scan_benchmarks(
        a.base,
        a.benchmarks,
        Path(a.out),
        reference=a.thresholds_from,
        topk=a.topk,
        config=kernel,
        executor=Executor(engine),
        bad_rows="skip" if a.skip_bad else "error",
        log=log,
    )
    rows = read_json(Path(a.out) / "scan.json")["rows"]
    msg = f"scan: {len(res.topk_sim)} tests from {len(a.benchmarks)} benchmarks x {rows} base rows"
    if res.count_above is not None:
        above = sum(
            int((rec["margin"].reshape(len(rec), -1) > 0).any(1).sum())
            for _, _, rec in iter_scan_rows(a.out)
        )
        msg += f", {above} rows above a threshold"
    msg += f", {res.bad_rows} bad base rows skipped -> {a.out}"
    print(msg)
