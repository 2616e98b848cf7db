"""``simgap select``: make a split of the pool with one selection policy."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import log

POLICIES = ["full", "gapmatch", "near", "far", "random", "coreset", "semdedup", "image-based"]


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="make a split: gapmatch, near, far, random, coreset, ...")
    p.add_argument("policy", choices=POLICIES)
    p.add_argument("pool", help="the pool's embedding store")
    p.add_argument("-o", "--out", required=True, help="split folder")
    p.add_argument("--benchmarks", nargs="+", help="benchmark stores (the union is used)")
    p.add_argument(
        "--scans",
        nargs="+",
        help="pool scans (simgap scan's folders): benchmarks are picked by name; scans of one "
        "benchmark each may also be given in --benchmarks order",
    )
    p.add_argument("--reference", help="reference store (thresholds; image-based clusters)")
    p.add_argument(
        "--reference-scans", nargs="+", help="reference scans (OUT/reference): thresholds"
    )
    p.add_argument("--size", help="kept size: a count (1000) or a fraction (0.25)")
    p.add_argument("--seed", type=int, default=0)
    _reference_args(p)
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the rescan that checks the gapmatch guarantee",
    )
    p.add_argument("--control", action="store_true", help="also write <out>-random, size-matched")
    p.add_argument("--clusters", type=int, default=100, help="k-means clusters")
    p.add_argument("--eps", type=float, default=0.124, help="semdedup: drop above 1 - eps")
    p.add_argument("--rule", choices=["kept", "any"], default="kept", help="semdedup keep rule")
    p.set_defaults(fn=cmd_select)


def _reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add-reference",
        dest="add_reference",
        action="store_true",
        default=None,
        help="the reference set is added to the split and its control (recorded in split.json); "
        "default: for gapmatch only, as the paper",
    )
    p.add_argument(
        "--no-add-reference",
        dest="add_reference",
        action="store_false",
        help="the reference set is not added to the split (for gapmatch the paper's ablation: "
        "the check then skips its 'equal' half)",
    )


def _adds_reference(policy: str, given: bool | None) -> bool:
    """--add-reference / --no-add-reference, else the paper's setting for the family (the
    config's default ``reference.add_to``): the full pool alone, the gap-matched splits with it."""
    from simgap.experiment.config import Reference

    return given if given is not None else policy in Reference().add_to


def cmd_select(a: argparse.Namespace) -> None:
    from simgap.select.build import SelectConfig, select
    from simgap.select.policies import parse_size

    cfg = SelectConfig(
        policy=a.policy,
        pool=Path(a.pool),
        out=Path(a.out),
        benchmarks=tuple(Path(b) for b in a.benchmarks or ()),
        scans=tuple(Path(s) for s in a.scans or ()),
        reference=Path(a.reference) if a.reference else None,
        reference_scans=tuple(Path(s) for s in a.reference_scans or ()),
        size=parse_size(a.size) if a.size else None,
        seed=a.seed,
        add_reference=_adds_reference(a.policy, a.add_reference),
        check=a.check,
        control=a.control,
        clusters=a.clusters,
        eps=a.eps,
        rule=a.rule,
    )
    meta = select(cfg, log)
    msg = (
        f"select {meta['policy']}: kept {meta['size']} of {meta['pool_size']} pool rows "
        f"({meta['pool_size'] - meta['size']} removed)"
    )
    if "guarantee" in meta:
        msg += f", guarantee holds on {meta['guarantee']['tests']} test points"
    if a.control:
        msg += f", control {a.out}-random"
    print(msg + f" -> {a.out}")
