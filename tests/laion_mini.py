"""paper-laion-mini: the paper's real setup in miniature, in the real layouts, made from the
world's images, and the `paper-laion` config pointed at it.

- ImageNet-train: ``imagenet/train/<wnid>/<key>.JPEG`` (WordNet-id class folders);
- the six benchmarks: ImageNet-val as a plain class folder (``classnames.txt`` +
  ``<class>/<image>``), the other five as CLIP_benchmark wds folders (``test/0.tar``,
  ``classnames.txt``, ``zeroshot_classification_templates.txt``);
- LAION: img2dataset tar shards (``{key}.jpg .txt .json`` + per-shard parquet), and the same
  pool as clip-retrieval embeddings (``img_emb/img_emb_{i}.npy``, ``metadata/metadata_{i}
  .parquet``) made by the similarity model, read in place through ``pool_embeddings``.

The config is ``paper-laion`` with only paths, sizes, the model (``simgap-tiny`` from a local
checkpoint), the device (cpu) and what follows from them changed (``MINI_SETTINGS``)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from simgap.data.clip_benchmark import write_wds
from simgap.embed import embed
from simgap.experiment import config
from simgap.models import ModelSpec, load_model
from simgap.store import open_store
from simgap.world import WorldConfig, generate_world

# paper-laion's benchmark name -> the world benchmark standing in for it
STAND_INS = {
    "imagenet-val": "photo",
    "imagenet-v2": "photo-v2",
    "imagenet-sketch": "sketch",
    "imagenet-r": "rendition",
    "imagenet-a": "hard",
    "objectnet": "pose",
}
WORLD = WorldConfig(seed=7, scale=0.06, n_classes=10)


def wnids(n: int) -> list[str]:
    text = (resources.files("simgap") / "data" / "imagenet" / "wnids.txt").read_text()
    return text.split()[:n]


def _reference(world: Path, out: Path) -> None:
    """ImageNet-train: the world's reference classes renamed to WordNet ids, in label order."""
    names = (world / "classnames.txt").read_text().split("\n")
    names = [n for n in names if n]
    for wnid, name in zip(wnids(len(names)), names, strict=True):
        (out / wnid).mkdir(parents=True)
        for img in sorted((world / "reference" / name).iterdir()):
            shutil.copyfile(img, out / wnid / f"{wnid}_{img.stem}.JPEG")


def _wds(bench: Path, out: Path) -> None:
    classes = [c for c in (bench / "classnames.txt").read_text().split("\n") if c]
    samples = [
        (img.stem.replace("-", "_"), "jpg", img.read_bytes(), label)
        for label, name in enumerate(classes)
        for img in sorted((bench / name).iterdir())
    ]
    write_wds(out, classes, ["a photo of a {c}.", "a drawing of a {c}."], samples)


def _clip_retrieval(store_path: Path, out: Path) -> None:
    """What clip-retrieval's inference writes, from a store of the pool's embeddings."""
    store = open_store(store_path)
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    for i, s in enumerate(store.shards):
        np.save(out / "img_emb" / f"img_emb_{i}.npy", np.asarray(store.read_emb(s.name)))
        keys = store.read_keys(s.name)
        table = pa.table(
            {
                "image_path": keys.column("key"),
                "caption": keys.column("caption"),
                "key": keys.column("key"),
            }
        )
        pq.write_table(table, out / "metadata" / f"metadata_{i}.parquet")


def build(root: Path) -> dict[str, Path]:
    """The miniature's data folders and the similarity checkpoint under ``root``."""
    world = root / "world"
    generate_world(WORLD, world, lambda _: None)
    data = root / "data"
    _reference(world, data / "imagenet" / "train")
    benches = {}
    for name, stand_in in STAND_INS.items():
        src = world / "benchmarks" / stand_in
        if name == "imagenet-val":
            benches[name] = data / "imagenet" / "val"
            shutil.copytree(src, benches[name])  # the plain class folder
        else:
            benches[name] = data / "clip_benchmark" / f"wds_{name}"
            _wds(src, benches[name])
    laion = data / "laion"
    shutil.copytree(world / "pool", laion)
    ckpt = root / "similarity.pt"
    torch.manual_seed(0)
    loaded = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    torch.save({"state_dict": loaded.model.state_dict()}, ckpt)
    spec = ModelSpec("simgap-tiny", checkpoint=str(ckpt))
    embed(str(laion), root / "pool-store", spec, batch_size=64, decode_workers=0)
    _clip_retrieval(root / "pool-store", data / "laion-emb")
    shutil.rmtree(root / "pool-store")
    return {
        "reference": data / "imagenet" / "train",
        "pool": laion,
        "pool_embeddings": data / "laion-emb",
        "checkpoint": ckpt,
        **{f"bench:{k}": v for k, v in benches.items()},
    }


# What differs from paper-laion, and why: paths; the model and device; sizes (batches, one
# epoch, one training process); and, to stay within a CI budget, two of the 41 splits trained
# and the local engine (the Ray engine's GPU requests are tested in tests/test_engines.py).
def mini_settings(paths: dict[str, Path]) -> dict[str, object]:
    return {
        "name": "paper-laion-mini",
        "sources.real.reference": str(paths["reference"]),
        "sources.real.pool": str(paths["pool"]),
        "sources.real.pool_embeddings": str(paths["pool_embeddings"]),
        "sources.real.benchmarks": {
            k.split(":", 1)[1]: str(v) for k, v in paths.items() if k.startswith("bench:")
        },
        "similarity.model": "simgap-tiny",
        "similarity.pretrained": "",
        "similarity.checkpoint": str(paths["checkpoint"]),
        "similarity.batch_size": 64,
        "similarity.device": "cpu",
        "scan.device": "cpu",
        "train.splits": ["combined", "combined-random"],
        "train.parallel": 2,
        "train.threads": 1,
        "train.device": "cpu",
        "train.gpus": 1,
        "train.recipe.model": "simgap-tiny",
        "train.recipe.epochs": 1,
        "train.recipe.batch_size": 32,
        "train.recipe.warmup": 10,
        "train.recipe.precision": "fp32",
        "train.recipe.workers": 1,
        "evaluate.batch_size": 64,
        "evaluate.device": "cpu",
        "engine.name": "local",
        "engine.address": "",
    }


def mini_config(paths: dict[str, Path]) -> config.Config:
    return config.override(config.load("paper-laion"), mini_settings(paths))
