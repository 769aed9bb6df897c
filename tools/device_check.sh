#!/usr/bin/env bash
# One prepared check for a lent GPU machine: run it, read the report, record the numbers in docs/SCALING.md.
#
#   tools/device_check.sh [--quick] [--out DIR] [--wheels DIR]
#
# Parts (each with its own time limit; the report says PASS / FAIL / SKIPPED and why for each):
#   1. environment: python, torch, transformers, accelerate, the GPU;
#   2. packages: runtime packages the image lacks are installed from carried wheels (--wheels DIR, default
#      ./wheels; how to prepare them: docs/SCALING.md "Device check"), never from the network;
#   3. GPU-marked tests (tests/test_gpu.py: CUDA worker logprobs vs the full forward in fp32/bf16, the
#      fused decode step, self-speculative rollouts); without CUDA: their CPU counterparts instead;
#   4. the default job (`looprl train`, embedded model), a few steps, with per-step times;
#   5. the Ouro-1.4B job config (configs/ouro-1.4b-dapo17k.yaml) in bf16 on random weights, torch engine:
#      two steps with rollout and update times. Without CUDA: a 2-layer stand-in of the same layout
#      (checks the script and the code path; not a measurement).
# Budget: under 8 minutes on a GPU machine, under 5 without one (--quick: about a minute, parts 1-4 only,
# 1 step). Exit 0 when no part FAILED (skipped parts do not fail it).
# The report is DIR/report.md (DIR: --out, else $OUT when set, as on the lent machine, else ./device_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
OUTDIR="${OUT:-device_check_out}"
WHEELS="${LOOPRL_WHEELS:-wheels}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUTDIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
REPORT="$OUTDIR/report.md"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/looprl-device-check.XXXXXX")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
FAILED=0
PY=${PYTHON:-python}
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then GPU=1; else GPU=0; fi
if [ "$GPU" = 0 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

{
  echo "# looprl device check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  [ "$QUICK" = 1 ] && echo "Mode: --quick (parts 1-4, one step)." && echo
} > "$REPORT"

note() { echo "$*" >> "$REPORT"; }
skip() { note "**SKIPPED**: $*"; note; echo "device_check: SKIPPED $*" >&2; }
# part NAME LIMIT_S CMD...: run CMD under a time limit, its output to DIR/NAME.log, PASS/FAIL in the report
part() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "device_check: $name (limit ${limit}s) ..." >&2
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc = 0 ]; then
    note "**PASS** $name (${took} s; log: $name.log)"
  else
    FAILED=1
    [ $rc = 124 ] && note "**FAIL** $name: over its ${limit} s limit (log: $name.log)" \
                  || note "**FAIL** $name: exit $rc after ${took} s (log: $name.log); last lines:"
    note '```'; tail -n 15 "$OUTDIR/$name.log" >> "$REPORT"; note '```'
  fi
  note
  return $rc
}

note "## 1. Environment"
$PY tools/device_check.py env >> "$REPORT" 2>&1 || { note "(environment probe failed)"; FAILED=1; }
note

note "## 2. Packages"
MISSING="$($PY tools/device_check.py missing 2>/dev/null)"
if [ -z "$MISSING" ]; then
  note "All runtime packages importable; no wheels needed."; note
elif [ -d "$WHEELS" ]; then
  note "Missing: \`$MISSING\`; installing from $WHEELS (no index):"
  # shellcheck disable=SC2086
  part install-wheels 180 $PY -m pip install --no-index --find-links "$WHEELS" $MISSING
  STILL="$($PY tools/device_check.py missing 2>/dev/null)"
  [ -n "$STILL" ] && note "Still missing after the install: \`$STILL\`" && note
else
  skip "installing \`$MISSING\`: no wheels folder $WHEELS (prepare one as docs/SCALING.md \"Device check\" says, and carry it)"
fi
MISSING="$($PY tools/device_check.py missing 2>/dev/null)"
PYTEST_OK=1; TRAIN_OK=1
case " $MISSING " in *" pytest "*) PYTEST_OK=0 ;; esac
for pkg in datasets math-verify sympy rich pyyaml safetensors tqdm; do
  case " $MISSING " in *" $pkg"*) TRAIN_OK=0 ;; esac
done

note "## 3. GPU-marked tests"
if [ "$PYTEST_OK" = 0 ]; then
  skip "tests: pytest is not installed"
elif [ "$GPU" = 1 ]; then
  part gpu-tests 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
elif [ "$QUICK" = 1 ]; then
  skip "tests/test_gpu.py (no CUDA); --quick also skips their CPU counterparts"
else
  skip "tests/test_gpu.py (no CUDA). Ran their CPU counterparts instead:"
  part cpu-counterpart-tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_rollout_torch.py \
    tests/test_rollout_speculative.py -k "logprobs_match_full_forward or fused_ouro_step or greedy_equals"
fi

note "## 4. The default job"
if [ "$TRAIN_OK" = 0 ]; then
  skip "the default job: runtime packages missing ($MISSING)"
else
  STEPS=3; [ "$GPU" = 0 ] && STEPS=2; [ "$QUICK" = 1 ] && STEPS=1
  note "\`looprl train\` with configs/default.yaml (embedded model), $STEPS step(s), on $([ $GPU = 1 ] && echo GPU || echo CPU):"
  if part default-job 150 $PY -m rl train --max_steps "$STEPS" --eval_every 0 --progress false --report_to none \
       --overwrite true --output_dir "$WORK/default"; then
    $PY tools/device_check.py metrics "$WORK/default" >> "$REPORT" 2>&1
    note
  fi
fi

note "## 5. Ouro-1.4B job config, bf16, random weights"
if [ "$TRAIN_OK" = 0 ]; then
  skip "the Ouro-1.4B step: runtime packages missing ($MISSING)"
elif [ "$QUICK" = 1 ]; then
  skip "the Ouro-1.4B step (--quick)"
elif [ "$GPU" = 1 ]; then
  part ouro-1.4b-step 240 $PY tools/device_check.py ouro-step "$WORK/ouro"
  grep -v 'it/s\]' "$OUTDIR/ouro-1.4b-step.log" >> "$REPORT"; note  # without progress bars
else
  skip "the Ouro-1.4B step itself (no CUDA: ~30 min per step on a CPU). Ran the same script on a 2-layer stand-in (not a measurement):"
  part ouro-small-step-cpu 150 $PY tools/device_check.py ouro-step "$WORK/ouro" --small
  grep -v 'it/s\]' "$OUTDIR/ouro-small-step-cpu.log" >> "$REPORT"; note  # without progress bars
fi

rm -rf "$WORK"
note "Total: $(( $(date +%s) - START )) s; $([ $FAILED = 0 ] && echo "no part failed" || echo "SOME PART FAILED")."
echo "device_check: report in $REPORT" >&2
exit $FAILED
