"""Time the whole demo and each stage.

    python benchmarks/demo.py [--run-dir DIR] [--scale 1.0]

Runs ``simgap demo`` in a fresh folder (so nothing is cached) and prints, as its last line, one
JSON object ``{"stages": {name: seconds, ...}, "total_seconds": ...}``. Target: the default demo
finishes in ≤ 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from simgap.cli import _config, parser
from simgap.experiment import run_experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=5)
    a = ap.parse_args()
    run_dir = a.run_dir or Path(tempfile.mkdtemp(prefix="simgap-demo-")) / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = parser().parse_args(
        ["demo", str(run_dir), "--scale", str(a.scale), "--epochs", str(a.epochs)]
    )
    start = time.perf_counter()
    result = run_experiment(run_dir, _config(args), log=lambda m: print(m, flush=True))
    total = time.perf_counter() - start
    print(json.dumps({"stages": result["timings"], "total_seconds": round(total, 1)}))


if __name__ == "__main__":
    main()
