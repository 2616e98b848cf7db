"""``simgap evaluate``: zero-shot top-1/top-5/recall of one model on benchmark folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simgap.cli.common import log, model_args, skipped_text, summed


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot top-1/top-5/recall on benchmarks")
    p.add_argument("benchmarks", nargs="+", help="benchmark folders (any supported layout)")
    p.add_argument("--layout", default="auto", help="auto, folder, wds, imagenet, imagenet-v2, "
                   "imagenet-r, imagenet-a, objectnet")  # fmt: skip
    p.add_argument("--templates", help="prompt file (default: the benchmark's own)")
    p.add_argument("-o", "--out", help="write eval.json and predictions/<benchmark>.parquet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    model_args(p)
    p.set_defaults(fn=cmd_evaluate)


def _templates(path: str | None) -> list[str] | None:
    if not path:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: templates file not found")
    return [t for t in Path(path).read_text().splitlines() if t.strip()]


def cmd_evaluate(a: argparse.Namespace) -> None:
    from simgap.evaluate import evaluate_benchmarks
    from simgap.models import ModelSpec, load_model

    names = [Path(b).name for b in a.benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark folder names must differ (they name the results): {names}")
    spec = ModelSpec(arch=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained)
    loaded = load_model(spec, device=a.device)
    summary = evaluate_benchmarks(
        loaded,
        {n: Path(b) for n, b in zip(names, a.benchmarks, strict=True)},
        Path(a.out) if a.out else None,
        _templates(a.templates),
        layout=a.layout,
        batch_size=a.batch_size,
        log=log,
    )
    print(json.dumps(summary["benchmarks"], indent=2, sort_keys=True))
    res = summary["benchmarks"]
    top1 = ", ".join(f"{n} {r['top1']:.1%}" for n, r in res.items())
    skipped = summed([r.get("skipped", {}) for r in res.values()])
    print(  # stderr: stdout holds the results as JSON alone
        f"evaluate: {len(res)} benchmarks, {sum(r['n'] for r in res.values())} test images, "
        f"{skipped_text(skipped)}; top-1 {top1}" + (f" -> {a.out}" if a.out else ""),
        file=sys.stderr,
    )
