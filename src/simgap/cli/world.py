"""``simgap world``: generate the built-in miniature world."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import log


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="generate the built-in miniature world")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="size knob (1.0 = default demo)")
    p.add_argument("--classes", type=int, default=10)
    p.set_defaults(fn=cmd_world)


def cmd_world(a: argparse.Namespace) -> None:
    from simgap.world import WorldConfig, generate_world

    cfg = WorldConfig(seed=a.seed, scale=a.scale, n_classes=a.classes)
    info = generate_world(cfg, Path(a.out), log)
    c = info["counts"]
    print(
        f"world: {len(info['classnames'])} classes, {c['pool']} pool samples in "
        f"{c['pool_shards']} shards ({c['near_duplicates']} injected near-duplicates), "
        f"{c['reference']} reference images, {sum(c['benchmarks'].values())} test images in "
        f"{len(c['benchmarks'])} benchmarks -> {a.out}"
    )
