"""The ``simgap`` command line: parses arguments, calls the library, prints. Nothing else."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cmd_world(a: argparse.Namespace) -> None:
    from simgap.world import WorldConfig, generate_world

    cfg = WorldConfig(seed=a.seed, scale=a.scale, n_classes=a.classes)
    info = generate_world(cfg, Path(a.out), _log)
    print(f"world written to {a.out}: {info['counts']}")


def _config(a: argparse.Namespace):
    from simgap.experiment import ExperimentConfig
    from simgap.train import Recipe
    from simgap.world import WorldConfig

    return ExperimentConfig(
        world=WorldConfig(seed=a.seed, scale=a.scale, n_classes=a.classes),
        similarity_recipe=Recipe(epochs=a.epochs, lr=1e-3, seed=a.seed),
        train_recipe=Recipe(epochs=a.epochs, lr=1e-3, seed=a.seed),
        seed=a.seed,
        engine=a.engine,
        workers=a.workers,
    )


def cmd_demo(a: argparse.Namespace) -> None:
    from simgap.experiment import run_experiment
    from simgap.report import summary_table

    result = run_experiment(Path(a.run_dir), _config(a), _log)
    print(summary_table(Path(a.run_dir)))
    print(f"report: {result['report']['html']}")
    print(f"total {sum(result['timings'].values()):.0f}s over {len(result['timings'])} stages")


def cmd_embed(a: argparse.Namespace) -> None:
    from simgap.embed import embed
    from simgap.models import ModelSpec
    from simgap.parallel import Executor, make_engine

    spec = ModelSpec(arch=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained)
    executor = Executor(make_engine(a.engine, a.workers, a.address))
    store = embed(
        a.source, Path(a.out), spec, executor, a.device, a.batch_size, a.shard_size, progress=_log
    )
    print(f"{store.rows} rows in {len(store.shards)} shards → {a.out}")


def cmd_scan(a: argparse.Namespace) -> None:
    import numpy as np

    from simgap.scan import scan_store
    from simgap.store import check_compatible, open_store

    base = open_store(a.base)
    tests = [open_store(b) for b in a.benchmarks]
    stores = [base, *tests]
    thresholds = None
    if a.thresholds_from:
        stores.append(open_store(a.thresholds_from))
    check_compatible(*stores)
    test_emb = np.concatenate([t.embeddings() for t in tests])
    if a.thresholds_from:
        ref = scan_store(stores[-1], test_emb, topk=1)
        thresholds = ref.topk_sim[:, 0].copy()
    res = scan_store(
        base,
        test_emb,
        thresholds=thresholds,
        topk=a.topk,
        out_dir=Path(a.out),
        progress=lambda done, total: _log(f"scan: {done}/{total} rows"),
    )
    msg = f"scanned {base.rows} rows × {len(test_emb)} tests → {a.out}"
    if res.row_margin is not None:
        msg += f"; {int((res.row_margin > 0).sum())} rows above a threshold"
    print(msg)


def cmd_materialize(a: argparse.Namespace) -> None:
    from simgap.splits import materialize

    summary = materialize(
        Path(a.split), a.source, Path(a.out), reference=Path(a.reference) if a.reference else None
    )
    print(
        f"kept {summary['kept']}, missing {summary['missing']}, "
        f"reference {summary['reference']} → {a.out}"
    )


def cmd_train(a: argparse.Namespace) -> None:
    from simgap.train import Recipe, train

    recipe = Recipe(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    ckpt = train(recipe, a.data, a.samples, Path(a.out), a.name, _log)
    print(f"checkpoint: {ckpt}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    import json

    from simgap.evaluate import evaluate_benchmark
    from simgap.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(arch=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained))
    templates = [t for t in Path(a.templates).read_text().splitlines() if t.strip()]
    results = {}
    for bench in a.benchmarks:
        res = evaluate_benchmark(loaded, Path(bench), templates)
        res.pop("predictions")
        results[Path(bench).name] = res
    print(json.dumps(results, indent=2))


def cmd_report(a: argparse.Namespace) -> None:
    from simgap.report import build_report, summary_table

    paths = build_report(Path(a.run_dir))
    print(summary_table(Path(a.run_dir)))
    print(f"report: {paths['html']}")


def _world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="size knob (1.0 = default demo)")
    p.add_argument("--classes", type=int, default=10)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="simgap-tiny", help="open_clip architecture or local-dir:")
    p.add_argument("--checkpoint", help="local checkpoint file")
    p.add_argument("--pretrained", help="open_clip pretrained tag (needs the hub or its cache)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simgap", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="generate the built-in miniature world")
    p.add_argument("out")
    _world_args(p)
    p.set_defaults(fn=cmd_world)

    p = sub.add_parser("demo", help="run the paper's experiment end to end on the world")
    p.add_argument("run_dir", nargs="?", default="demo-run")
    _world_args(p)
    p.add_argument("--epochs", type=int, default=5)
    _engine_args(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("embed", help="embed a source into an embedding store")
    p.add_argument("source", help="tar shards (folder, brace pattern) or an image folder")
    p.add_argument("-o", "--out", required=True)
    _model_args(p)
    _engine_args(p)
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (folders)")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("scan", help="exact NN scan of a base store against benchmark stores")
    p.add_argument("base")
    p.add_argument("--benchmarks", nargs="+", required=True)
    p.add_argument("--thresholds-from", help="reference store: thresholds = NN similarity to it")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(fn=cmd_scan)

    p = sub.add_parser("materialize", help="write a split as webdataset shards")
    p.add_argument("split")
    p.add_argument("source", help="the pool's tar shards")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--reference", help="image folder appended with 'a photo of a {class}'")
    p.set_defaults(fn=cmd_materialize)

    p = sub.add_parser("train", help="train CLIP with open_clip_train on shards")
    p.add_argument("data", help="tar shards: brace pattern or '::'-joined list")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--name", default="clip")
    p.add_argument("--model", default="simgap-tiny")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="zero-shot top-1 on benchmark folders")
    p.add_argument("benchmarks", nargs="+")
    p.add_argument("--templates", required=True)
    _model_args(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("report", help="build the HTML/Markdown report of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("simgap: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as e:
        # Library errors name the file and the problem; a traceback would bury that line.
        print(f"simgap: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
