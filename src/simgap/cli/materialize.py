"""``simgap materialize``: write a split as webdataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import engine_args, log, skipped_text


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("materialize", help="write a split as webdataset shards")
    p.add_argument("split", help="split folder or key list (.txt/.parquet)")
    p.add_argument("source", help="the pool's tar shards")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--reference", help="image folder appended with 'a photo of a {class}'")
    p.add_argument("--shard-size", type=int, help="samples per output shard (default: per input)")
    p.add_argument("--keys-only", action="store_true", help="write only the key list")
    engine_args(p)
    p.set_defaults(fn=cmd_materialize, workers=4)  # IO threads (benchmarks/materialize.py)


def cmd_materialize(a: argparse.Namespace) -> None:
    from simgap.materialize import materialize
    from simgap.parallel import Executor, ThreadEngine, make_engine

    # IO-heavy: local workers are threads (no process start-up; one shard's fsync overlaps the
    # next one's copy).
    engine = ThreadEngine(a.workers) if a.engine == "local" else make_engine(a.engine, a.workers)
    summary = materialize(
        Path(a.split),
        a.source,
        Path(a.out),
        reference=Path(a.reference) if a.reference else None,
        shard_size=a.shard_size,
        executor=Executor(engine),
        keys_only=a.keys_only,
        log=log,
    )
    if a.keys_only:
        print(f"materialize: {summary['kept']} keys found, {summary['missing']} missing -> {a.out}")
        return
    print(
        f"materialize: {summary['samples']} samples in {summary['output_shards']} shards "
        f"({summary['kept']} kept, {summary['reference']} reference), {summary['missing']} "
        f"missing, {summary['corrupt']} corrupt, {summary['duplicate']} duplicate, "
        f"{skipped_text(summary.get('skipped', {}))} -> {a.out}"
    )
