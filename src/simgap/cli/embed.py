"""``simgap embed``: embed a source into an embedding store."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgap.cli.common import device_engine_args, engine_spec, log, model_args, skipped_text, summed


def add_to(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed a source into an embedding store")
    p.add_argument(
        "source",
        help="tar shards (folder, brace pattern, '::' list, fsspec URL), an image folder, a "
        "CLIP_benchmark wds folder, a csv/tsv/parquet table, or a clip-retrieval folder "
        "(linked in place, not re-embedded)",
    )
    p.add_argument("-o", "--out", required=True)
    model_args(p)
    device_engine_args(p)
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
    executor = Executor(build_engine(engine_spec(a), a.device))
    store = embed(
        source,
        Path(a.out),
        spec,
        executor,
        a.device,
        a.batch_size,
        a.shard_size,
        progress=log,
        decode_workers=a.decode_workers,
        text=a.text,
        precision=a.precision,
    )
    skipped = summed([sh.get("skipped", {}) for sh in store.manifest.get("shards", [])])
    print(
        f"embed: {store.rows} rows in {len(store.shards)} shards, {skipped_text(skipped)} "
        f"-> {a.out}"
    )
