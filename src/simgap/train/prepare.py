"""Before a launch: the run folder claimed for one run, its key filter, its sample count, and
the checks that it can start or resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from simgap.data.keylist import read_key_list
from simgap.io import sha256_file, write_json, write_npy
from simgap.train.recipe import LATEST_CHECKPOINT, RECORD_FILE, Recipe, check_name, run_dir

KEY_HASHES_FILE = "keys.h128.npy"
KEY_HASH = np.dtype([("hi", "<u8"), ("lo", "<u8")])  # compared field by field: 128-bit order


def prepare_run(
    recipe: Recipe,
    train_data: str,
    num_samples: int | None,
    out_dir: Path,
    name: str,
    keys: Path | str | None = None,
) -> tuple[int, Path | None]:
    """Claim the run folder for this run and write its key filter (before any launch).

    Returns the sample count and the key filter file (None without a key list). A folder that
    holds another run (other recipe, data or key list) is refused.
    """
    check_name(name)
    rdir = run_dir(out_dir, name)
    key_list = read_key_list(keys) if keys is not None else None
    if num_samples is None:
        num_samples = len(key_list) if key_list is not None else count_samples(train_data)
    if num_samples < 1:
        raise ValueError(f"nothing to train on: {num_samples} samples")
    record = _record(recipe, train_data, num_samples)
    if keys is not None:
        # By content, not path: the same list given by another path is the same run.
        record["keys"] = {"sha256": sha256_file(keys), "count": len(key_list)}
    _claim_run_dir(rdir, record)
    if key_list is None:
        return num_samples, None
    path = rdir / KEY_HASHES_FILE
    if not path.is_file():  # written atomically, and the record pins the key list
        write_npy(path, key_hashes(key_list))
    return num_samples, path


def key_hash(key: str) -> tuple[int, int]:
    """128-bit hash of a sample key as (hi, lo) 64-bit halves (what the key filter compares)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def key_hashes(keys: list[str]) -> np.ndarray:
    """Sorted 128-bit hashes of a key list (dtype ``KEY_HASH``): 16 bytes a key,
    memory-mapped and shared by every dataloader worker. A pool key outside the list passes by
    chance with probability len(keys) / 2**128: with 64 bits, 2e8 pool keys against 1e8 listed
    ones would let one wrong sample in about once in a thousand runs."""
    hashes = np.unique(np.fromiter(map(key_hash, keys), KEY_HASH, len(keys)))
    if hashes.size != len(keys):
        raise ValueError("two keys of the key list share a 128-bit hash; rename one")
    return hashes


def count_samples(train_data: str) -> int:
    """Samples in materialized shards, from the ``sizes.json`` (shard file -> count) beside them."""
    import webdataset

    urls = webdataset.shardlists.expand_urls(train_data)
    total = 0
    for folder, names in _by_folder(urls).items():
        sizes_file = folder / "sizes.json"
        if not sizes_file.is_file():
            raise FileNotFoundError(
                f"{sizes_file}: not found; pass the sample count (--samples) or a key list"
            )
        sizes = json.loads(sizes_file.read_text())
        missing = [n for n in names if n not in sizes]
        if missing:
            raise ValueError(f"{sizes_file}: no count for shard {missing[0]}")
        total += sum(int(sizes[n]) for n in names)
    return total


def check_resumable(rdir: Path) -> None:
    """Refuse to resume from a checkpoint that torch cannot load with ``weights_only=True``
    (one that carries pickled code), before open_clip_train would load it."""
    import pickle

    import torch

    latest = rdir / "checkpoints" / LATEST_CHECKPOINT
    if not latest.is_file():
        return
    try:
        # mmap: only the pickle is read here, not the tensors.
        torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{latest}: refusing to resume from this checkpoint: it does not load with "
            f"torch.load(weights_only=True) ({first}). Remove it to restart the run."
        ) from None


def _record(recipe: Recipe, train_data: str, num_samples: int) -> dict:
    return {
        "recipe": dataclasses.asdict(recipe),
        "train_data": train_data,
        "num_samples": num_samples,
    }


def _claim_run_dir(rdir: Path, record: dict) -> None:
    """Refuse to resume a run directory that holds a different run (or an unknown one)."""
    path = rdir / RECORD_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != record:
            raise ValueError(
                f"{rdir} holds a run of a different recipe or data:\n  there: {existing}\n"
                f"  asked: {record}\nuse another name or remove that folder"
            )
        return
    if (rdir / "checkpoints").exists():
        raise ValueError(f"{rdir} holds checkpoints not made by simgap.train; use another name")
    rdir.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def check_shards(train_data: str, workers: int) -> None:
    import webdataset

    urls = webdataset.shardlists.expand_urls(train_data)
    local = [u for u in urls if not re.match(r"^[a-z][a-z0-9+.-]*:", u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} training shards missing, e.g. {missing[:3]}")
    # open_clip_train asserts this later, after building the model.
    if len(urls) < max(1, workers):
        raise ValueError(f"{len(urls)} shards cannot feed {workers} dataloader workers")


def _by_folder(urls: list[str]) -> dict[Path, list[str]]:
    folders: dict[Path, list[str]] = {}
    for url in urls:
        folders.setdefault(Path(url).parent, []).append(Path(url).name)
    return folders
