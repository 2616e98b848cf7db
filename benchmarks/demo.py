"""Time the whole demo and each stage.

    python benchmarks/demo.py [--run-dir DIR] [--scale 1.0] [--epochs 5] [--config demo]

Runs a config (by default the shipped ``demo``, as ``simgap demo`` does) in a fresh folder (so
nothing is cached) and prints, as its last line, one JSON object
``{"config": ..., "stages": {name: seconds, ...}, "total_seconds": ...}``. Target: the default
demo finishes in ≤ 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from simgap.experiment import config, run_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--config", default="demo", help="a shipped config name or a file")
    ap.add_argument("--scale", type=float, help="override sources.world.scale")
    ap.add_argument("--epochs", type=int, help="override both recipes' epochs")
    a = ap.parse_args()
    run_dir = a.run_dir or Path(tempfile.mkdtemp(prefix="simgap-demo-")) / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    settings: dict[str, object] = {}
    if a.scale is not None:
        settings["sources.world.scale"] = a.scale
    if a.epochs is not None:
        settings |= {"similarity.recipe.epochs": a.epochs, "train.recipe.epochs": a.epochs}
    cfg = config.override(config.load(a.config), settings) if settings else config.load(a.config)
    start = time.perf_counter()
    result = run_config(cfg, run_dir, log=lambda m: print(m, flush=True))
    total = time.perf_counter() - start
    print(
        json.dumps(
            {"config": a.config, "stages": result["timings"], "total_seconds": round(total, 1)}
        )
    )


if __name__ == "__main__":
    main()
