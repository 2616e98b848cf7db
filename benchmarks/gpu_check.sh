#!/usr/bin/env bash
# One prepared run of every GPU check of issue 19 (part 2), for a machine with one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh            # in the repository root
#
# Results: one JSON file per step (rc, wall time, the step's last JSON line, its log tail) and
# summary.json, under $OUT (the device machine's result folder) or ./gpu-results. Every step runs
# under its own `timeout` and the next one runs whatever the last one did; a step whose time
# limit no longer fits the budget is skipped and recorded as skipped. Steps, in priority order:
#
#   env          GPU, driver, torch, CPU count
#   exact        scan exactness on CUDA: benchmarks/gpu_check_scan.py if present, else
#                SIMGAP_TEST_DEVICE=cuda pytest tests/test_scan.py
#   scan         benchmarks/scan.py --device cuda
#   embed        benchmarks/embed.py --model ViT-B-32 --device cuda --image-size 256, the
#                machine's cores as decode workers
#   embed_repro  the same shards embedded twice in process and once through LocalEngine(2):
#                the emb/*.npy bytes must be equal
#   train        benchmarks/train.py: simgap train (direct, and torchrun with 1 rank) against
#                open_clip_train run directly, ViT-B-32, amp_bf16
#   evaluate     simgap evaluate on CUDA against CPU, one local checkpoint (top-1, predictions)
#   demo_cuda    simgap run demo on CUDA (smaller world), wall time
#   demo_cpu     the same demo on the CPU, for the wall time beside it
#
# Knobs (environment): GPU_CHECK_BUDGET_S (default 540: the device time left after the
# machine's start, of 15 minutes), GPU_CHECK_DEVICE (cuda; "cpu" smoke-tests this script on a
# machine without a GPU), GPU_CHECK_QUICK=1 (tiny sizes, for that smoke test), GPU_CHECK_STEPS
# ("embed train": only these steps, e.g. to rerun one), PYTHON.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RES="${OUT:-$ROOT/gpu-results}"
mkdir -p "$RES"
SELF="$ROOT/benchmarks/gpu_check.sh"
if [ -z "${GPU_CHECK_WORK:-}" ]; then  # the top-level run owns the scratch folder
  GPU_CHECK_WORK="$(mktemp -d "${TMPDIR:-/tmp}/simgap-gpu-check.XXXXXX")"
  export GPU_CHECK_WORK
  trap 'rm -rf "$GPU_CHECK_WORK"' EXIT
fi
WORK="$GPU_CHECK_WORK"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
QUICK="${GPU_CHECK_QUICK:-0}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
NCPU="$(nproc)"
DECODE_WORKERS=$((NCPU > 1 ? NCPU - 1 : 1))
START_S="${GPU_CHECK_START_S:-$(date +%s)}"
export GPU_CHECK_START_S="$START_S"
SIMGAP=("$PYTHON" -m simgap.cli)

if [ "$QUICK" = 1 ]; then
  SCAN_ARGS=(--rows 20000 --tests 256 --shard-rows 10000)
  EMBED_ARGS=(--model simgap-tiny --images 400 --per-shard 100 --repeats 1)
  TRAIN_ARGS=(--samples 64 --batch-size 16 --shards 2 --workers 1 --pairs 1 --epochs 1)
  TRAIN_MODEL=(--config simgap-tiny-vit)
  REPRO_MODEL=simgap-tiny
  DEMO_SET=(--set sources.world.scale=0.1 --set train.recipe.epochs=1)
  DEMO_SET+=(--set similarity.recipe.epochs=1 --set 'train.splits=["full"]')
else
  SCAN_ARGS=(--rows 2000000 --tests 8192 --shard-rows 100000)
  EMBED_ARGS=(--model ViT-B-32 --image-size 256 --repeats 2)
  TRAIN_ARGS=(--samples 8192 --batch-size 256 --shards 8 --workers 4 --pairs 1 --epochs 1)
  TRAIN_MODEL=(--model ViT-B-32)
  REPRO_MODEL=ViT-B-32
  DEMO_SET=(--set sources.world.scale=0.5 --set train.recipe.epochs=2)
  DEMO_SET+=(--set similarity.recipe.epochs=2)
fi
TRAIN_PRECISION=amp_bf16
[ "$DEVICE" = cpu ] && TRAIN_PRECISION=fp32

left_s() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

# record NAME RC WALL_S LOG [SKIPPED_REASON]: RES/NAME.json from the step's log.
record() {
  "$PYTHON" - "$@" "$RES" <<'PY'
import json, sys
name, rc, wall, log, *rest = sys.argv[1:]
res = rest[-1]
skipped = rest[0] if len(rest) > 1 else None
try:
    lines = open(log, errors="replace").read().splitlines()
except OSError:
    lines = []
result = None
for line in reversed(lines):
    text = line.strip()
    if text.startswith("{") and text.endswith("}"):
        try:
            result = json.loads(text)
            break
        except ValueError:
            pass
record = {
    "step": name,
    "rc": None if skipped else int(rc),
    "timed_out": int(rc) in (124, 137) and not skipped,
    "wall_s": float(wall),
    "skipped": skipped,
    "result": result,
    "log_tail": lines[-25:],
}
with open(f"{res}/{name}.json", "w") as f:
    json.dump(record, f, indent=1)
PY
}

# step NAME LIMIT_S CMD...: run CMD under `timeout`, log it, record it; never stops the script.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$RES/$name.log" left
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    return
  fi
  [ "$QUICK" = 1 ] && limit=$((limit * 4))  # the smoke test runs on a slow CPU machine
  left=$(left_s)
  if [ "$left" -lt "$limit" ]; then
    echo "[$name] skipped: $left s left of the budget, the step may take $limit s" | tee "$log"
    record "$name" 0 0 "$log" "budget: ${left}s left, step limit ${limit}s"
    return
  fi
  echo "[$name] start (limit ${limit}s, ${left}s of the budget left)"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local wall
  wall=$("$PYTHON" -c "print(round($t1 - $t0, 1))")
  record "$name" "$rc" "$wall" "$log"
  echo "[$name] rc=$rc wall=${wall}s"
}

# --- env -----------------------------------------------------------------------------------
env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PYTHON" - <<'PY'
import json, os, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
             "memory_gib": round(p.total_memory / 2**30, 1),
             "cudnn": torch.backends.cudnn.version()}
print(json.dumps(info))
PY
}

# --- exactness -----------------------------------------------------------------------------
exact() {
  if [ -f benchmarks/gpu_check_scan.py ]; then
    "$PYTHON" benchmarks/gpu_check_scan.py --device "$DEVICE" --out "$RES/exact_scan.json"
  else
    SIMGAP_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest tests/test_scan.py -q -x -p no:cacheprovider
  fi
}

# --- embed byte identity -------------------------------------------------------------------
embed_repro() {
  # A file, not stdin: LocalEngine's spawned workers import the main module again.
  mkdir -p "$WORK/repro"
  cat >"$WORK/repro/check.py" <<'PY'
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simgap.data.tarwrite import write_tar
from simgap.embed import embed
from simgap.models import ModelSpec, load_model
from simgap.parallel import Executor, LocalEngine


def main() -> None:
    device, arch, work, quick = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
    rng = np.random.default_rng(0)
    per, shards = (50, 2) if quick else (250, 4)
    for s in range(shards):
        samples = []
        for i in range(per):
            low = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(low).resize((96, 96)).save(buf, "JPEG", quality=90)
            samples.append((f"k{s}{i:04d}", {"jpg": buf.getvalue()}))
        write_tar(work / "pool" / f"{s:05d}.tar", samples)
    ckpt = work / "weights.pt"
    torch.save(load_model(ModelSpec(arch), allow_random=True).model.state_dict(), ckpt)
    spec = ModelSpec(arch, checkpoint=str(ckpt))
    runs = {
        "in_process_a": Executor(LocalEngine(1)),
        "in_process_b": Executor(LocalEngine(1)),
        "local_engine_2": Executor(LocalEngine(2)),
    }
    digests, numerics = {}, {}
    for name, executor in runs.items():
        store = embed(work / "pool", work / name, spec, executor, device=device,
                      batch_size=128, shard_size=per)
        digests[name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted((work / name / "emb").glob("*.npy"))}
        numerics[name] = store.numerics
    same = all(d == digests["in_process_a"] for d in digests.values())
    print(json.dumps({"device": device, "model": arch, "images": per * shards,
                      "byte_identical": same, "numerics": numerics["in_process_a"],
                      "runs": list(runs)}))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
PY
  "$PYTHON" "$WORK/repro/check.py" "$DEVICE" "$REPRO_MODEL" "$WORK/repro" "$QUICK"
}

# --- evaluate CUDA vs CPU ------------------------------------------------------------------
evaluate_vs_cpu() {
  "$PYTHON" - "$WORK/eval" <<'PY'
import sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from simgap.models import ModelSpec, load_model

work = Path(sys.argv[1])
rng = np.random.default_rng(1)
classes = ["red", "green", "blue", "yellow", "purple"]
(work / "bench").mkdir(parents=True)
(work / "bench" / "classnames.txt").write_text("\n".join(classes) + "\n")
for c in classes:
    (work / "bench" / c).mkdir()
    for i in range(40):
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64))
        img.save(work / "bench" / c / f"{c}{i:03d}.png")
torch.save(load_model(ModelSpec("simgap-tiny-vit"), allow_random=True).model.state_dict(),
           work / "weights.pt")
(work / "templates.txt").write_text("a photo of a {c}.\na {c} thing.\n")
PY
  local model=(--model simgap-tiny-vit --checkpoint "$WORK/eval/weights.pt")
  model+=(--templates "$WORK/eval/templates.txt")
  local t0 t1 t2
  t0=$(date +%s.%N)
  "${SIMGAP[@]}" evaluate "$WORK/eval/bench" "${model[@]}" --device "$DEVICE" -o "$WORK/eval/gpu" \
    || return 1
  t1=$(date +%s.%N)
  "${SIMGAP[@]}" evaluate "$WORK/eval/bench" "${model[@]}" --device cpu -o "$WORK/eval/cpu" \
    || return 1
  t2=$(date +%s.%N)
  "$PYTHON" - "$WORK/eval" "$t0" "$t1" "$t2" "$DEVICE" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
work, t0, t1, t2, device = Path(sys.argv[1]), *map(float, sys.argv[2:5]), sys.argv[5]
gpu, cpu = (json.loads((work / s / "eval.json").read_text()) for s in ("gpu", "cpu"))
pg, pc = (pq.read_table(work / s / "predictions" / "bench.parquet").to_pydict()
          for s in ("gpu", "cpu"))
same = sum(a == b for a, b in zip(pg["pred"], pc["pred"])) / len(pc["pred"])
print(json.dumps({
    "device": device, "numerics": gpu["numerics"],
    "top1": {"gpu": gpu["benchmarks"]["bench"]["top1"], "cpu": cpu["benchmarks"]["bench"]["top1"]},
    "same_prediction_fraction": same, "keys_equal": pg["key"] == pc["key"],
    "wall_s": {"gpu": round(t1 - t0, 1), "cpu": round(t2 - t1, 1)},
}))
PY
}

# --- demo end to end -----------------------------------------------------------------------
demo() {  # demo DEVICE RUN_DIR
  local dev=$1 dir=$2 t0 t1 extra=(--set "train.recipe.precision=fp32")
  if [ "$dev" != cpu ]; then
    extra=(--set "similarity.device=$dev" --set "train.device=$dev" --set "evaluate.device=$dev")
    extra+=(--set "train.recipe.precision=$TRAIN_PRECISION")
  fi
  t0=$(date +%s.%N)
  "${SIMGAP[@]}" run demo --run-dir "$dir" "${DEMO_SET[@]}" "${extra[@]}" || return 1
  t1=$(date +%s.%N)
  "$PYTHON" -c "import json; print(json.dumps({'device': '$dev', 'wall_s': round($t1 - $t0, 1),
    'settings': '${DEMO_SET[*]} ${extra[*]}'}))"
}

# `bash gpu_check.sh --run FUNCTION ARGS...`: one step's function, in its own process (what
# `timeout` runs: it cannot run a shell function itself).
if [ "${1:-}" = --run ]; then
  shift
  "$@"
  exit $?
fi

step env 60 bash "$SELF" --run env_info
step exact 150 bash "$SELF" --run exact
step scan 180 "$PYTHON" benchmarks/scan.py --device "$DEVICE" --skip-faiss "${SCAN_ARGS[@]}"
step embed 180 "$PYTHON" benchmarks/embed.py --device "$DEVICE" "${EMBED_ARGS[@]}" \
  --decode-workers "$DECODE_WORKERS"
step embed_repro 120 bash "$SELF" --run embed_repro
step train 240 "$PYTHON" benchmarks/train.py --device "$DEVICE" --precision "$TRAIN_PRECISION" \
  "${TRAIN_MODEL[@]}" "${TRAIN_ARGS[@]}" --torchrun
step evaluate 90 bash "$SELF" --run evaluate_vs_cpu
step demo_cuda 240 bash "$SELF" --run demo "$DEVICE" "$WORK/demo-$DEVICE"
step demo_cpu 240 bash "$SELF" --run demo cpu "$WORK/demo-cpu"

"$PYTHON" - "$RES" "$BUDGET_S" "$START_S" <<'PY'
import json, sys, time
from pathlib import Path
res, budget, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
steps = ["env", "exact", "scan", "embed", "embed_repro", "train", "evaluate", "demo_cuda",
         "demo_cpu"]
summary = {"budget_s": budget, "total_s": round(time.time() - start, 1), "steps": {}}
for name in steps:
    path = res / f"{name}.json"
    if path.is_file():
        rec = json.loads(path.read_text())
        summary["steps"][name] = {k: rec[k] for k in ("rc", "timed_out", "wall_s", "skipped",
                                                      "result")}
(res / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({n: s["rc"] for n, s in summary["steps"].items()}))
PY
