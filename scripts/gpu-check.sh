#!/usr/bin/env bash
# GPU check: extraction throughput of three random-init DINOv3 sizes, the step time and fidelity of
# each target policy in both teacher views, and a few minutes of training, on the phantom; one JSON
# file per step and a summary.
#
#   OUT=/some/folder bash scripts/gpu-check.sh            # on a GPU machine, under 8 minutes
#   OUT=/some/folder bash scripts/gpu-check.sh --dry-run  # the same sequence, tiny, on CPU (1-5 minutes)
#
# Run from the repository root. The packages come from PYTHONPATH (or an installed copy): commands
# run as "$PYTHON -m dinomix_cache ...", PYTHON defaulting to python. Outputs in $OUT (default
# ./gpu-check-out): summary.json (nvidia-smi, torch and CUDA versions, each step's status and wall
# time), bench-extract-<teacher>.json, bench-targets-{slice,crop}.json (each teacher view, on a store
# of the context-sensitive ViT-S-sized random teacher with crop windows), train.json (step times from the run's
# log.jsonl), and logs/<step>.log and .stdout (each command's output). Stores and the training run go
# to a temporary folder that is removed at the end; the GPU run generates the phantom under
# data/phantom on first use (the dry run keeps its small phantom in the temporary folder, so nothing
# in the repository is touched). Every step has its own timeout and the whole run a time budget
# (GPU_CHECK_BUDGET_S seconds, default 420); a step that fails or runs out of time is recorded and
# the rest still run where they can. The exit status is 0 only if every step succeeded.
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -f dinomix_cache/__main__.py ]]; then
    echo "gpu-check: run from the repository root (dinomix_cache/__main__.py not found)" >&2
    exit 2
fi

PYTHON=${PYTHON:-python}
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # random-init teachers need no download
export HF_HUB_DISABLE_PROGRESS_BARS=1

if (( DRY_RUN )); then
    # Tiny and on CPU even where a GPU is present; the phantom lives in the temporary folder.
    export CUDA_VISIBLE_DEVICES=""
    export PYTHONDONTWRITEBYTECODE=1
    BUDGET_S=${GPU_CHECK_BUDGET_S:-900}  # generous: shared CPUs can be slow, and nothing here is timed for real
    DATA="$WORK/phantom"
    PHANTOM=(--data "$DATA" --phantom-cases 6 --phantom-matrix 64 --target-shape 32x64x64)
    DEVICE=cpu
    DTYPE=float32  # CPUs emulate bfloat16 slowly; the GPU run measures bfloat16
    TEACHERS=(random:tiny)
    STORE_TEACHER=random:ctx-tiny
    WINDOWS=32x32
    PRESET=cpu-small
    BENCH_EXTRACT=(--max-cases 1 --repeats 1)
    BENCH_TARGETS=(--steps 1 --warmup 0 --crop 16x32x32)
    TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-2}
    T_EXTRACT=180 T_BENCH_EXTRACT=180 T_BENCH_TARGETS=480 T_TRAIN=240  # guards against a hang only
else
    BUDGET_S=${GPU_CHECK_BUDGET_S:-420}  # with the timeouts' grace and the summary: under 8 minutes
    DATA=data/phantom
    PHANTOM=(--data "$DATA")  # the default phantom: the 30 Synapse ids, 512 x 512, 80x160x160 volumes
    DEVICE=auto
    DTYPE=bfloat16
    TEACHERS=(random:vits16 random:vitb16 random:vitl16)
    STORE_TEACHER=random:ctx-vits16  # ViT-S speed, and tokens that see context, so the cosines can fail
    WINDOWS=128x128  # the paper crop's in-plane size: the crop view's windows
    PRESET=paper
    BENCH_EXTRACT=()
    BENCH_TARGETS=()
    TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-200}
    T_EXTRACT=150 T_BENCH_EXTRACT=90 T_BENCH_TARGETS=120 T_TRAIN=200
fi
STORE="$WORK/store.zarr"
RUN="$WORK/run"
STEPS_TSV="$OUT/.steps.tsv"
: > "$STEPS_TSV"
START=$SECONDS
FAILED=0

say() { echo "gpu-check [$((SECONDS - START))s]: $*" >&2; }

# run_step NAME TIMEOUT_S COMMAND...: runs COMMAND under `timeout` (capped by what is left of the
# budget), stdout to logs/NAME.stdout, stderr to logs/NAME.log; appends NAME, status, rc, seconds
# and the command to .steps.tsv. Returns COMMAND's status (0 ok).
run_step() {
    local name=$1 limit=$2 rc=0 begin left
    shift 2
    left=$((BUDGET_S - (SECONDS - START)))
    if (( left < 20 )); then
        say "$name: skipped, the time budget of ${BUDGET_S}s is spent"
        printf '%s\tskipped\t\t0\t%s\n' "$name" "$*" >> "$STEPS_TSV"
        FAILED=1
        return 1
    fi
    (( limit > left )) && limit=$left
    say "$name (timeout ${limit}s): $*"
    begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.stdout" 2> "$OUT/logs/$name.log" || rc=$?
    local status=ok
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - begin))" "$*" >> "$STEPS_TSV"
    if (( rc != 0 )); then
        say "$name: $status (exit $rc) after $((SECONDS - begin))s; last lines of logs/$name.log:"
        tail -n 5 "$OUT/logs/$name.log" >&2 || true
    else
        say "$name: done in $((SECONDS - begin))s"
    fi
    return "$rc"
}

# json_result NAME: the last line of logs/NAME.stdout that parses as JSON, written to NAME.json with
# the step's command and wall time.
json_result() {
    "$PYTHON" - "$OUT" "$1" <<'PY'
import json, sys
from pathlib import Path
out, name = Path(sys.argv[1]), sys.argv[2]
result = None
for line in reversed((out / "logs" / f"{name}.stdout").read_text().splitlines()):
    try:
        result = json.loads(line)
        break
    except ValueError:
        continue
if not isinstance(result, dict):
    sys.exit(f"gpu-check: {name} printed no JSON object")
row = [r.split("\t") for r in (out / ".steps.tsv").read_text().splitlines() if r.split("\t")[0] == name][-1]
record = {"step": name, "command": row[4], "wall_s": int(row[3]), "result": result}
(out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
PY
}

say "mode: $( ((DRY_RUN)) && echo 'dry run (tiny, CPU)' || echo GPU ); OUT=$OUT; budget ${BUDGET_S}s"

# 1. The store for bench targets and train (this also generates the phantom on first use).
STORE_OK=0
if run_step extract "$T_EXTRACT" "$PYTHON" -m dinomix_cache extract --dataset phantom "${PHANTOM[@]}" \
        --teacher "$STORE_TEACHER" --dtype "$DTYPE" --device "$DEVICE" --crop-windows "$WINDOWS" --out "$STORE" \
        --no-progress; then
    STORE_OK=1
else
    FAILED=1
fi

# 2. Extraction throughput per teacher size, end to end against the teacher alone.
for teacher in "${TEACHERS[@]}"; do
    name="bench-extract-${teacher#random:}"
    if run_step "$name" "$T_BENCH_EXTRACT" "$PYTHON" -m dinomix_cache bench extract --dataset phantom \
            "${PHANTOM[@]}" --teacher "$teacher" --dtype "$DTYPE" --device "$DEVICE" \
            ${BENCH_EXTRACT[@]+"${BENCH_EXTRACT[@]}"} --json; then
        json_result "$name" || FAILED=1
    else
        FAILED=1
    fi
done

# 3. Step time and fidelity of each target policy, and 4. a short training run.
if (( STORE_OK )); then
    for view in slice crop; do
        if run_step "bench-targets-$view" "$T_BENCH_TARGETS" "$PYTHON" -m dinomix_cache bench targets \
                --cache "$STORE" --preset "$PRESET" --teacher-view "$view" \
                ${BENCH_TARGETS[@]+"${BENCH_TARGETS[@]}"} --json; then
            json_result "bench-targets-$view" || FAILED=1
        else
            FAILED=1
        fi
    done
    train_rc=0
    run_step train "$T_TRAIN" "$PYTHON" -m dinomix_cache train --cache "$STORE" --preset "$PRESET" \
        --max-steps "$TRAIN_STEPS" --out "$RUN" --no-progress || train_rc=$?
    # A run stopped by its timeout still logged its steps: summarise them, and count it as failed.
    (( train_rc != 0 )) && FAILED=1
    if [[ -f "$RUN/log.jsonl" ]]; then
        "$PYTHON" - "$OUT" "$RUN/log.jsonl" "$TRAIN_STEPS" <<'PY' || FAILED=1
import json, statistics, sys
from pathlib import Path
out, log, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
seconds = [float(r["seconds"]) for r in records if r.get("kind") == "step"]
if not seconds:
    sys.exit("gpu-check: the training run logged no steps")
row = [r.split("\t") for r in (out / ".steps.tsv").read_text().splitlines() if r.split("\t")[0] == "train"][-1]
warm = seconds[min(5, len(seconds) // 2):] or seconds  # the first steps include compilation and caches
ordered = sorted(warm)
result = {
    "steps": len(seconds), "max_steps": max_steps, "status": row[1],
    "first_step_s": round(seconds[0], 4),
    "median_step_s": round(statistics.median(warm), 4), "mean_step_s": round(statistics.fmean(warm), 4),
    "p90_step_s": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
    "min_step_s": round(min(warm), 4), "max_step_s": round(max(warm), 4),
    "timed_steps": len(warm), "steps_total_s": round(sum(seconds), 3),
    "epochs_validated": sum(1 for r in records if r.get("kind") == "epoch"),
    "step_seconds": [round(s, 4) for s in seconds],
}
record = {"step": "train", "command": row[4], "wall_s": int(row[3]), "result": result}
(out / "train.json").write_text(json.dumps(record, indent=1) + "\n")
PY
    fi
else
    say "bench-targets and train: skipped (no store)"
    printf 'bench-targets-slice\tskipped\t\t0\tneeds the store\nbench-targets-crop\tskipped\t\t0\tneeds the store\n' \
        >> "$STEPS_TSV"
    printf 'train\tskipped\t\t0\tneeds the store\n' >> "$STEPS_TSV"
fi

# 5. The summary: machine, versions, every step's status.
NVIDIA_SMI=""
if command -v nvidia-smi > /dev/null 2>&1; then
    NVIDIA_SMI=$(timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || true)
fi
NVIDIA_SMI="$NVIDIA_SMI" timeout 120 "$PYTHON" - "$OUT" "$DRY_RUN" "$((SECONDS - START))" "$BUDGET_S" "$FAILED" <<'PY'
import json, os, platform, sys
from pathlib import Path
out, dry_run, wall, budget, failed = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
import torch
versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "python": platform.python_version()}
steps = {}
for line in (out / ".steps.tsv").read_text().splitlines():
    name, status, rc, seconds, command = line.split("\t", 4)
    file = out / f"{name}.json"
    steps[name] = {"status": status, "rc": int(rc) if rc else None, "wall_s": int(seconds), "command": command,
                   "json": file.name if file.exists() else None}
smi = os.environ.get("NVIDIA_SMI", "").strip()
summary = {"dry_run": dry_run, "ok": not failed and all(s["status"] == "ok" for s in steps.values()),
           "wall_s": wall, "budget_s": budget, "nvidia_smi": smi or None, **versions, "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps({k: summary[k] for k in ("ok", "wall_s", "torch", "cuda", "device_name")}))
for name, step in steps.items():
    print(f"  {name:<22} {step['status']:<8} {step['wall_s']:>4} s  {step['json'] or ''}")
PY
rm -f "$STEPS_TSV"
say "finished in $((SECONDS - START))s; results in $OUT"
exit "$FAILED"
