"""The ``simgap`` command line: parses arguments, calls the library, prints. Nothing else."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from simgap.io import error_line


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def skipped_text(counts: dict[str, int]) -> str:
    """``{"corrupt_image": 2, "empty_file": 1}`` → ``3 skipped (2 corrupt_image, 1 empty_file)``."""
    total = sum(counts.values())
    if not total:
        return "0 skipped"
    parts = sorted(((n, why) for why, n in counts.items() if n), key=lambda p: (-p[0], p[1]))
    return f"{total} skipped (" + ", ".join(f"{n} {why}" for n, why in parts) + ")"


def _summed(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for why, n in d.items():
            total[why] = total.get(why, 0) + int(n)
    return total


def cmd_world(a: argparse.Namespace) -> None:
    from simgap.world import WorldConfig, generate_world

    cfg = WorldConfig(seed=a.seed, scale=a.scale, n_classes=a.classes)
    info = generate_world(cfg, Path(a.out), _log)
    c = info["counts"]
    print(
        f"world: {len(info['classnames'])} classes, {c['pool']} pool samples in "
        f"{c['pool_shards']} shards ({c['near_duplicates']} injected near-duplicates), "
        f"{c['reference']} reference images, {sum(c['benchmarks'].values())} test images in "
        f"{len(c['benchmarks'])} benchmarks -> {a.out}"
    )


def _run_config(a: argparse.Namespace, name: str, settings: dict) -> None:
    from simgap.console import RunConsole
    from simgap.experiment import config, run_config
    from simgap.report import summary_table

    cfg = config.load(name)
    if settings:
        cfg = config.override(cfg, settings)
    run_dir = Path(a.run_dir)
    plan = run_config(cfg, run_dir, _log, dry_run=True)  # reads stage records, writes nothing
    if a.dry_run:
        print(plan["text"])
        return
    stages = [p["stage"] for p in plan["plan"]]
    cached = sum(p["cached"] for p in plan["plan"])
    print(
        f"{cfg.name}: {len(stages)} stages ({cached} cached) in {run_dir}; "
        f"stage logs in {run_dir / 'logs'}" + ("" if a.verbose else " (-v streams them)"),
        flush=True,
    )
    with RunConsole(run_dir, stages, cached=cached, verbose=a.verbose) as console:
        result = run_config(cfg, run_dir, console)
    print(summary_table(run_dir))
    print(f"report: {result['report']['html']}")
    total = sum(result["timings"].values())
    print(
        f"run: {len(stages)} stages ({cached} cached), {len(result['splits'])} splits, "
        f"{len(result['trained'])} trained, {total:.0f}s of stage time -> {run_dir}"
    )


def cmd_run(a: argparse.Namespace) -> None:
    from simgap.experiment.config import parse_setting

    settings = dict(parse_setting(s) for s in a.set)
    if a.engine:
        settings["engine.name"] = a.engine
    if a.run_dir is None:
        a.run_dir = f"runs/{Path(a.config).stem}"
    _run_config(a, a.config, settings)


def cmd_demo(a: argparse.Namespace) -> None:
    """`simgap run demo` with the world's knobs on the command line."""
    flags = {
        "seed": ["seed", "sources.world.seed", "similarity.recipe.seed", "train.recipe.seed"],
        "scale": ["sources.world.scale"],
        "classes": ["sources.world.n_classes"],
        "epochs": ["similarity.recipe.epochs", "train.recipe.epochs"],
        "engine": ["engine.name"],
        "workers": ["engine.workers"],
    }
    settings = {
        key: getattr(a, flag)
        for flag, keys in flags.items()
        if getattr(a, flag) is not None
        for key in keys
    }
    _run_config(a, "demo", settings)


def cmd_embed(a: argparse.Namespace) -> None:
    from simgap.data.tables import TableSpec, is_table
    from simgap.embed import embed
    from simgap.models import ModelSpec
    from simgap.parallel import Executor, build_engine

    spec = ModelSpec(arch=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained)
    source = a.source
    if is_table(source) and "#" not in source:
        source = TableSpec(
            source, a.csv_img_key, a.csv_caption_key, a.csv_key, a.csv_separator
        ).locator()
    executor = Executor(build_engine(_engine_spec(a), a.device))
    store = embed(
        source,
        Path(a.out),
        spec,
        executor,
        a.device,
        a.batch_size,
        a.shard_size,
        progress=_log,
        decode_workers=a.decode_workers,
        text=a.text,
        precision=a.precision,
    )
    skipped = _summed([sh.get("skipped", {}) for sh in store.manifest.get("shards", [])])
    print(
        f"embed: {store.rows} rows in {len(store.shards)} shards, {skipped_text(skipped)} "
        f"-> {a.out}"
    )


def cmd_scan(a: argparse.Namespace) -> None:
    from simgap.io import read_json
    from simgap.parallel import Executor, build_engine
    from simgap.scan import KernelConfig, iter_scan_rows
    from simgap.scan.run import scan_benchmarks

    engine = build_engine(_engine_spec(a), a.device)
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
        log=_log,
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
    meta = select(cfg, _log)
    msg = (
        f"select {meta['policy']}: kept {meta['size']} of {meta['pool_size']} pool rows "
        f"({meta['pool_size'] - meta['size']} removed)"
    )
    if "guarantee" in meta:
        msg += f", guarantee holds on {meta['guarantee']['tests']} test points"
    if a.control:
        msg += f", control {a.out}-random"
    print(msg + f" -> {a.out}")


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
        log=_log,
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
        log=_log,
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


def cmd_train(a: argparse.Namespace) -> None:
    from simgap import train as t
    from simgap.io import read_json

    recipe = t.Recipe(
        model=a.model,
        epochs=a.epochs,
        samples_seen=a.samples_seen,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup=a.warmup,
        wd=a.wd,
        precision=a.precision,
        workers=a.workers,
        seed=a.seed,
        save_frequency=a.save_frequency,
        grad_checkpointing=a.grad_checkpointing,
    )
    out = Path(a.out)
    if a.torchrun is None and a.slurm_nodes is None:
        ckpt = t.train(
            recipe, a.data, a.samples, out, a.name, _log,
            keys=a.keys, device=a.device, threads=a.threads,
        )  # fmt: skip
        record = read_json(t.run_dir(out, a.name) / t.RECORD_FILE)
        print(
            f"train: {record['num_samples']} samples x {recipe.epochs} epochs, "
            f"global batch {recipe.batch_size} -> {ckpt}"
        )
        return
    samples, key_filter = t.prepare_run(recipe, a.data, a.samples, out, a.name, a.keys)
    if a.torchrun is not None:
        text = t.torchrun_command(
            recipe, a.data, samples, out, a.name, a.torchrun, key_filter=key_filter
        )
        script, scheduler = t.run_dir(out, a.name) / "torchrun.sh", "bash"
    else:
        text = t.slurm_script(
            recipe, a.data, samples, out, a.name,
            t.SlurmJob(
                nodes=a.slurm_nodes, gpus_per_node=a.gpus_per_node, cpus_per_task=a.cpus_per_task,
                time=a.time, partition=a.partition, account=a.account, python=a.python,
            ),
            key_filter=key_filter,
        )  # fmt: skip
        script, scheduler = t.run_dir(out, a.name) / "train.sbatch", "sbatch"
    t.write_launch_script(script, text)
    print(text.rstrip())
    print(f"written to {script}", file=sys.stderr)
    if a.launch:
        rc = t.launch_script(script, scheduler)
        if rc != 0:
            raise RuntimeError(f"{scheduler} {script} exited with status {rc}")
    done = f"ran it with {scheduler}" if a.launch else "not launched (--launch runs it)"
    # stderr: stdout holds the script alone, for a pipe.
    line = f"train: {samples} samples x {recipe.epochs} epochs, script {script}, {done}"
    print(line, file=sys.stderr)


def cmd_evaluate(a: argparse.Namespace) -> None:
    import json

    from simgap.evaluate import evaluate_benchmarks
    from simgap.models import ModelSpec, load_model

    names = [Path(b).name for b in a.benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark folder names must differ (they name the results): {names}")
    spec = ModelSpec(arch=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained)
    loaded = load_model(spec, device=a.device)
    templates = None
    if a.templates:
        if not Path(a.templates).is_file():
            raise FileNotFoundError(f"{a.templates}: templates file not found")
        templates = [t for t in Path(a.templates).read_text().splitlines() if t.strip()]
    summary = evaluate_benchmarks(
        loaded,
        {n: Path(b) for n, b in zip(names, a.benchmarks, strict=True)},
        Path(a.out) if a.out else None,
        templates,
        layout=a.layout,
        batch_size=a.batch_size,
        log=_log,
    )
    print(json.dumps(summary["benchmarks"], indent=2, sort_keys=True))
    res = summary["benchmarks"]
    top1 = ", ".join(f"{n} {r['top1']:.1%}" for n, r in res.items())
    skipped = _summed([r.get("skipped", {}) for r in res.values()])
    print(  # stderr: stdout holds the results as JSON alone
        f"evaluate: {len(res)} benchmarks, {sum(r['n'] for r in res.values())} test images, "
        f"{skipped_text(skipped)}; top-1 {top1}" + (f" -> {a.out}" if a.out else ""),
        file=sys.stderr,
    )


def cmd_report(a: argparse.Namespace) -> None:
    from simgap.report import build_report, summary_table

    paths = build_report(Path(a.run_dir))
    print(summary_table(Path(a.run_dir)))
    figures = len(list(Path(paths["html"]).parent.glob("fig-*.png")))
    print(f"report: {figures} figures -> {paths['html']} (and {Path(paths['markdown']).name})")


def _world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="size knob (1.0 = default demo)")
    p.add_argument("--classes", type=int, default=10)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="simgap-tiny", help="open_clip architecture or local-dir:")
    p.add_argument("--checkpoint", help="local checkpoint file")
    p.add_argument("--pretrained", help="open_clip pretrained tag (needs the hub or its cache)")


def _engine_args(p: argparse.ArgumentParser, gpus: bool = False) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1)
    if gpus:
        p.add_argument(
            "--gpus-per-task", type=float, default=1.0, help="Ray, CUDA device: GPUs per task"
        )
        p.add_argument(
            "--cpus-per-gpu-task",
            type=float,
            default=4.0,
            help="Ray, CUDA device: CPUs per GPU task (embed: all but one decode images)",
        )


def _engine_spec(a: argparse.Namespace):  # -> simgap.parallel.EngineSpec (imported lazily)
    from simgap.parallel import EngineSpec

    return EngineSpec(
        a.engine,
        a.workers,
        getattr(a, "address", None),
        getattr(a, "gpus_per_task", 1.0),
        getattr(a, "cpus_per_gpu_task", 4.0),
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simgap", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="generate the built-in miniature world")
    p.add_argument("out")
    _world_args(p)
    p.set_defaults(fn=cmd_world)

    p = sub.add_parser("run", help="run an experiment config (a file, or a shipped name)")
    p.add_argument("config", help="config file (.toml/.yaml) or demo | paper-world | paper-laion")
    p.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="stream every stage's log (trainer output)"
    )
    p.add_argument("--engine", choices=["local", "ray"], help="override engine.name")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="run the shipped demo config end to end on the world")
    p.add_argument("run_dir", nargs="?", default="demo-run")
    p.add_argument("--seed", type=int)
    p.add_argument("--scale", type=float, help="world size knob (1.0 = default demo)")
    p.add_argument("--classes", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--engine", choices=["local", "ray"])
    p.add_argument("--workers", type=int)
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="stream every stage's log (trainer output)"
    )
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("embed", help="embed a source into an embedding store")
    p.add_argument(
        "source",
        help="tar shards (folder, brace pattern, '::' list, fsspec URL), an image folder, a "
        "CLIP_benchmark wds folder, a csv/tsv/parquet table, or a clip-retrieval folder "
        "(linked in place, not re-embedded)",
    )
    p.add_argument("-o", "--out", required=True)
    _model_args(p)
    _engine_args(p, gpus=True)
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (Ray: one GPU per task)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (folders)")
    p.add_argument(
        "--decode-workers",
        type=int,
        help="decode processes per shard task (default: the spare CPUs, at most 8, when shards "
        "run in this process; 0 under --workers > 1 or Ray)",
    )
    p.add_argument("--text", action="store_true", help="also store caption embeddings")
    p.add_argument("--csv-img-key", default="filepath", help="table column of image paths")
    p.add_argument("--csv-caption-key", default="title", help="caption column ('' for none)")
    p.add_argument("--csv-key", default="", help="key column (default: row number)")
    p.add_argument("--csv-separator", default="", help="default: tab for .tsv, sniffed for .csv")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("scan", help="exact NN scan of a base store against benchmark stores")
    p.add_argument("base")
    p.add_argument("--benchmarks", nargs="+", required=True)
    p.add_argument("--thresholds-from", help="reference store: thresholds = NN similarity to it")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("-o", "--out", required=True)
    _engine_args(p, gpus=True)
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (Ray: one GPU per task)")
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

    p = sub.add_parser("select", help="make a split: gapmatch, near, far, random, coreset, ...")
    p.add_argument(
        "policy",
        choices=["full", "gapmatch", "near", "far", "random", "coreset", "semdedup", "image-based"],
    )
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

    p = sub.add_parser("materialize", help="write a split as webdataset shards")
    p.add_argument("split", help="split folder or key list (.txt/.parquet)")
    p.add_argument("source", help="the pool's tar shards")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--reference", help="image folder appended with 'a photo of a {class}'")
    p.add_argument("--shard-size", type=int, help="samples per output shard (default: per input)")
    p.add_argument("--keys-only", action="store_true", help="write only the key list")
    _engine_args(p)
    p.set_defaults(fn=cmd_materialize, workers=4)  # IO threads (benchmarks/materialize.py)

    p = sub.add_parser("train", help="train CLIP with open_clip_train (local, torchrun, SLURM)")
    p.add_argument("data", help="tar shards: brace pattern or '::'-joined list")
    p.add_argument("--keys", help="key list (keys.txt / keys.parquet) applied on the fly to DATA")
    p.add_argument("--samples", type=int, help="samples per epoch (default: key count/sizes.json)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--name", default="clip")
    p.add_argument("--model", default="simgap-tiny")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples-seen", type=int, help="sample budget instead of epochs over DATA")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all GPUs together)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--precision", default="fp32", help="fp32 on CPU; amp or amp_bf16 on GPUs")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-frequency", type=int, default=0, help="keep epoch_<E>.pt every E")
    p.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--device", default="cpu", help="local run: cpu or cuda")
    p.add_argument("--threads", type=int, help="local run: CPU threads (OMP_NUM_THREADS)")
    p.add_argument("--torchrun", type=int, metavar="GPUS", help="write a one-node torchrun script")
    p.add_argument("--slurm-nodes", type=int, metavar="N", help="write an sbatch script")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--time", default="72:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--python", default="python", help="python on the cluster nodes")
    p.add_argument("--launch", action="store_true", help="run the script (bash / sbatch)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="zero-shot top-1/top-5/recall on benchmarks")
    p.add_argument("benchmarks", nargs="+", help="benchmark folders (any supported layout)")
    p.add_argument("--layout", default="auto", help="auto, folder, wds, imagenet, imagenet-v2, "
                   "imagenet-r, imagenet-a, objectnet")  # fmt: skip
    p.add_argument("--templates", help="prompt file (default: the benchmark's own)")
    p.add_argument("-o", "--out", help="write eval.json and predictions/<benchmark>.parquet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
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
    except (OSError, ValueError, RuntimeError) as e:
        # Library errors name the file and the problem; a traceback would bury that line.
        # (OSError covers missing files and a full disk, whose message names the file.)
        print(f"simgap: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
