"""Training throughput through simgap's adapter vs open_clip_train called directly, side by side.

Both sides train the same model (simgap's tiny ViT config, given to both as an open_clip
``local-dir:`` so that plain open_clip_train resolves it too) on the same webdataset shards with
the same arguments (``simgap.train.open_clip_argv``): simgap through ``simgap.train.train``
(subprocess ``python -m simgap._train_entry``), the anchor as ``python -m open_clip_train.main``.
Runs alternate (simgap, direct, simgap, direct, ...) to share the machine's noise; each side
keeps its best run. samples/s counts the samples of every epoch over the time from the first
"Start epoch" line to the process's exit (training, data loading and checkpoint saves; not the
interpreter start-up, which the wall-clock fields include). A third, optional measurement trains
through simgap on the same shards with a key list that keeps every sample (the on-the-fly filter's
cost).

    python benchmarks/train.py                         # 256 samples, 2 epochs, 2 pairs
    python benchmarks/train.py --samples 512 --pairs 3 --keys
    python benchmarks/train.py --model ViT-B-32 --device cuda --precision amp_bf16 \
        --samples 8192 --batch-size 256 --workers 4 --shards 8 --torchrun   # on a GPU

``--torchrun`` adds a third side: simgap's training under ``torch.distributed.run`` with one
rank (``train(..., torchrun=True)``), compared with the same direct runs. The last line printed
is one JSON object with simgap_samples_per_s, open_clip_samples_per_s and ratio (simgap /
open_clip; target >= 0.95), and with ``--torchrun`` torchrun_samples_per_s and torchrun_ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from simgap.models import shipped_configs_dir
from simgap.train import Recipe, open_clip_argv, train

SRC = Path(__file__).resolve().parent.parent / "src"


def write_shards(folder: Path, n: int, shards: int) -> str:
    """n random-colour 32px JPEGs with captions, in img2dataset layout."""
    folder.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
    per = n // shards
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                buf = io.BytesIO()
                rgb = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
                Image.new("RGB", (32, 32), rgb).save(buf, "JPEG")
                caption = f"a {colours[i % len(colours)]} square".encode()
                for name, data in ((f"p{i:07d}.jpg", buf.getvalue()), (f"p{i:07d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def model_dir(folder: Path, config: str) -> str:
    cfg = json.loads((shipped_configs_dir() / f"{config}.json").read_text())
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


class Clock:
    """Line callback: remembers when the first "Start epoch" line arrived."""

    def __init__(self) -> None:
        self.start: float | None = None

    def __call__(self, line: str) -> None:
        if self.start is None and "Start epoch" in line:
            self.start = time.perf_counter()


def run_simgap(
    recipe, data, n, out, name, threads, keys=None, device="cpu", torchrun=False
) -> tuple[float, float]:
    clock, t0 = Clock(), time.perf_counter()
    train(recipe, data, n, out, name, clock, keys=keys, threads=threads, device=device,
          torchrun=torchrun)  # fmt: skip
    end = time.perf_counter()
    return end - clock.start, end - t0


def run_direct(recipe, data, n, out, name, threads, device="cpu") -> tuple[float, float]:
    argv = open_clip_argv(recipe, data, n, out, name, device)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    clock, t0 = Clock(), time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "open_clip_train.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    tail = []
    for line in proc.stdout:
        clock(line)
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise RuntimeError("open_clip_train failed:\n" + "".join(tail))
    end = time.perf_counter()
    return end - clock.start, end - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=2, help="alternating simgap/direct run pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="simgap-tiny-vit", help="a shipped model config")
    ap.add_argument("--model", help="an open_clip architecture instead (ViT-B-32), from scratch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="amp_bf16 / amp on a GPU")
    ap.add_argument("--workers", type=int, default=1, help="dataloader workers (<= shards)")
    ap.add_argument("--torchrun", action="store_true", help="also time a 1-rank torchrun run")
    ap.add_argument("--keys", action="store_true", help="also time a key-list run")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_shards(tmp / "shards", a.samples, a.shards)
        model = a.model or model_dir(tmp / "model", a.config)
        recipe = Recipe(model=model, epochs=a.epochs, batch_size=a.batch_size,
                        workers=a.workers, precision=a.precision)  # fmt: skip
        seen = a.samples * a.epochs
        sides = ["simgap", "direct", *(["torchrun"] if a.torchrun else [])]
        runs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        dev, n = a.device, a.samples
        for i in range(a.pairs):
            runs["simgap"].append(run_simgap(recipe, data, n, tmp, f"s{i}", a.threads, device=dev))
            runs["direct"].append(run_direct(recipe, data, n, tmp, f"d{i}", a.threads, dev))
            if a.torchrun:
                runs["torchrun"].append(
                    run_simgap(recipe, data, n, tmp, f"t{i}", a.threads, device=dev, torchrun=True)
                )
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]}" for k, v in runs.items()), flush=True)
        result = {}
        if a.keys:
            keys = tmp / "keys.txt"
            keys.write_text("".join(f"p{i:07d}\n" for i in range(a.samples)))
            train_s, _ = run_simgap(recipe, data, None, tmp, "k", a.threads, keys, dev)
            result["simgap_keys_samples_per_s"] = round(seen / train_s, 2)
        best = {side: min(r[0] for r in rs) for side, rs in runs.items()}
        wall = {side: min(r[1] for r in rs) for side, rs in runs.items()}
        simgap, direct = seen / best["simgap"], seen / best["direct"]
        result = {
            "model": recipe.model if a.model else a.config,
            "device": a.device,
            "precision": a.precision,
            "samples_seen": seen,
            "pairs": a.pairs,
            "simgap_wall_s": round(wall["simgap"], 2),
            "open_clip_wall_s": round(wall["direct"], 2),
            **result,
            "simgap_samples_per_s": round(simgap, 2),
            "open_clip_samples_per_s": round(direct, 2),
            "ratio": round(simgap / direct, 4),
        }
        if a.torchrun:
            torchrun = seen / best["torchrun"]
            result["torchrun_wall_s"] = round(wall["torchrun"], 2)
            result["torchrun_samples_per_s"] = round(torchrun, 2)
            result["torchrun_ratio"] = round(torchrun / direct, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
