#!/bin/bash
# Issue #26's GPU measurements in one command (one H200, about 7 minutes; at most BUDGET seconds, 560 by default):
#   1b     gpu_step.py at the Pythia-1B shape, realistic lengths, batch sizes 1-8, --profile: L2, then KL
#   6.9b   gpu_step.py at the reference's 6.86B shape, gradient checkpointing, reference lengths, L2, batch 1-4,
#          --profile
#   ablate the sequnlearn variant alone at 1B, batch 8, L2, --profile, with all four settings at their CPU values
#          and cuDNN attention (the engine issue #26 measured), then with one GPU setting at a time put back to its
#          CPU value: with the 1b stage's batch-8 row (all GPU values), the before/after row of each change
# Run from anywhere:  bash benchmarks/gpu_check.sh [OUT_DIR]    (default: $OUT, else benchmarks/results/gpu_check)
# Writes OUT/gpu_check.log, OUT/gpu_step_1b_l2.json, OUT/gpu_step_1b_kl.json, OUT/gpu_step_6.9b.json and
# OUT/gpu_step_ablate.json (one entry per setting). Each run is cut at its limit (T_1B, T_7B, T_ABL seconds) or
# at the budget's end; a cut run leaves no JSON, the next run starts anyway. STAGES="1b 6.9b ablate" by default.
# Wheels for packages the GPU machine lacks (transformers, peft, ... at our pins) go in .whl/ (git-ignored), as
# for ../shared/gpu-check/check.sh. PY: the Python (default .venv/bin/python if there, else python3).
# DRY=1: every command on the CPU at the tiny shape (checks this script and the options, not the GPU).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${1:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$OUT" || exit 2
if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
if [ -d .whl ] && [ -z "${DRY:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/gpu_check.log BUDGET=${BUDGET:-560} STAGES=${STAGES:-1b 6.9b ablate}
DRYARGS=()
[ -n "${DRY:-}" ] && DRYARGS=(--device cpu --shape tiny --max-length 64 --min-batch 1 --max-batch 1 --steps 1 --warmup 0)
: > "$LOG"
say() { echo "== $(date +%T) [${SECONDS}s] $*" | tee -a "$LOG"; }

run() {  # NAME LIMIT ARGS...: one gpu_step.py run, its JSON in OUT/NAME.json, cut at LIMIT or the budget's end
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)); shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then say "$name skipped: the budget ($BUDGET s) is spent"; return; fi
  say "$name (limit ${limit}s): gpu_step.py $*"
  timeout "$limit" "$PY" benchmarks/gpu_step.py "$@" "${DRYARGS[@]}" --json "$OUT/$name.json" 2>&1 | tee -a "$LOG"
  say "$name rc=${PIPESTATUS[0]}"
}

VERSIONS='import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__,
"cuda", torch.cuda.is_available())'
say "versions: $("$PY" -c "$VERSIONS" 2>&1 | tail -1)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$LOG"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$LOG"
git status --short -- src benchmarks 2>/dev/null | tee -a "$LOG"

ONE_B=(--shape pythia-1b --lengths realistic --max-batch 8 --steps 2 --warmup 1 --profile)
for stage in $STAGES; do
  case $stage in
    1b) for loss in l2 kl; do run "gpu_step_1b_$loss" "${T_1B:-170}" "${ONE_B[@]}" --retain "$loss"; done ;;
    6.9b) run gpu_step_6.9b "${T_7B:-240}" --shape deep-ignorance-6.9b --checkpointing --lengths reference \
            --retain l2 --max-batch 4 --steps 2 --warmup 1 --profile ;;
    ablate)
      CPU=(--set row_group_tokens=256 --set pad_multiple=1 --set head_chunk_rows=256)
      i=0
      for setting in "${CPU[*]} --set sdpa_backend=default" "--set sdpa_backend=default" "--set row_group_tokens=256" \
                     "--set head_chunk_rows=256" "--set pad_multiple=1" "${CPU[*]} --set sdpa_backend=flash"; do
        # shellcheck disable=SC2086  # the setting's words are options
        run "ablate_$i" "${T_ABL:-45}" "${ONE_B[@]}" --retain l2 --min-batch 8 --variants sequnlearn $setting
        i=$((i + 1))
      done
      "$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = sorted(out.glob("ablate_*.json"), key=lambda p: int(p.stem.split("_")[1]))
merged = [json.loads(p.read_text()) for p in parts]
(out / "gpu_step_ablate.json").write_text(json.dumps(merged, indent=1))
for p in parts:
    p.unlink()
for m in merged:
    size = m["runs"][0]["sequnlearn"]["sizes"][-1]
    prof = size.get("profile", {})
    print(f"ablate {m['setup']['overrides'] or 'GPU settings'}: {size.get('tokens_per_s', 0):.0f} tok/s, "
          f"{prof.get('kernel_launches_per_step', 0):.0f} launches, GPU busy {100 * prof.get('gpu_busy_share', 0):.0f}%")
EOF
      ;;
    *) say "unknown stage $stage (1b, 6.9b, ablate)" ;;
  esac
done
say "done"
ls -la "$OUT" | tee -a "$LOG"
