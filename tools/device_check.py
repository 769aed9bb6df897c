"""The Python half of tools/device_check.sh: environment facts, missing packages, metrics summaries, and
one bf16 training step of the Ouro-1.4B job on random weights (rollout and update times).

    python tools/device_check.py env                      # versions and the device, as Markdown lines
    python tools/device_check.py missing                  # pip names of runtime packages not importable
    python tools/device_check.py metrics RUN_DIR          # per-step times and rewards of a run, Markdown
    python tools/device_check.py ouro-step WORK [--small] # the Ouro-1.4B bf16 step (--small: a 2-layer stand-in)

Kept out of the shell script so the script stays a list of parts with time limits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> pip name: what `looprl train`/`looprl eval` and the tests import beyond the device image's
# torch, transformers, accelerate and peft (and what those pull in)
RUNTIME = {"datasets": "datasets", "math_verify": "math-verify[antlr4-13-2]", "sympy": "sympy", "rich": "rich",
           "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "pytest": "pytest"}


def env() -> None:
    import platform

    import torch

    lines = [f"- python {platform.python_version()}, torch {torch.__version__}"]
    for name in ("transformers", "accelerate", "datasets", "peft", "vllm"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            from importlib.metadata import PackageNotFoundError, version
            try:
                lines.append(f"- {name} {version(name)}")
            except PackageNotFoundError:
                lines.append(f"- {name} (version unknown)")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                     f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        lines.append("- GPU: none (CUDA not available): the GPU parts are skipped")
    lines.append(f"- CPU cores: {os.cpu_count()}")
    print("\n".join(lines))


def missing() -> None:
    print(" ".join(pip for mod, pip in RUNTIME.items() if importlib.util.find_spec(mod) is None))


def metrics(run_dir: str) -> None:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    print("| step | time/step s | time/rollout s | time/update s | tokens/s | reward/mean | "
          "mismatch/logp_abs_max | loss/policy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r.get('time/step', float('nan')):.2f} | {r.get('time/rollout', float('nan')):.2f} | "
              f"{r.get('time/update', float('nan')):.2f} | {r.get('tokens_per_s', float('nan')):.1f} | "
              f"{r.get('reward/mean', float('nan')):.3f} | {r.get('mismatch/logp_abs_max', float('nan')):.2e} | "
              f"{r.get('loss/policy', float('nan')):.4g} |")


def ouro_step(work: Path, small: bool) -> int:
    """Random-weight Ouro-1.4B (OuroConfig() defaults; --small: 2 layers x hidden 64, same vocab and loops),
    then two `looprl train --config configs/ouro-1.4b-dapo17k.yaml` steps with the torch engine in bf16
    (the device image has no vLLM). Step 1 includes CUDA warm-up; step 2 is the number to read."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from vllm_cpu_rehearsal import REWARD_MODULE, make_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / ("ouro-small-random" if small else "ouro-1.4b-random")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (ckpt / "config.json").is_file():
        built = make_checkpoint(ckpt, device=device, small=small)
        print(f"- checkpoint: {built['parameters']:,} parameters, built and saved in {built['build_and_save_s']:.1f} s")
    (work / "devicereward.py").write_text(REWARD_MODULE)
    out = work / "train"
    new_tokens = "16" if small else "128"
    cmd = [sys.executable, "-m", "rl", "train", "--config", str(REPO / "configs/ouro-1.4b-dapo17k.yaml"),
           "--model", str(ckpt), "--engine", "torch", "--dtype", "bfloat16", "--special_tokens", "{}",
           "--prompt_suffix", "", "--data", "arith", "--data_limit", "64", "--rewards", "devicereward:digit_sum",
           "--accuracy_reward", "devicereward:digit_sum", "--overlong_buffer_len", "0", "--mask_truncated", "false",
           "--max_steps", "2", "--prompts_per_step", "2", "--num_generations", "4", "--max_new_tokens", new_tokens,
           "--max_prompt_length", "64", "--mini_batch_size", "8", "--micro_batch_size", "4",
           "--dynamic_sampling", "false", "--eval_every", "0", "--save_every", "0", "--report_to", "none",
           "--progress", "false", "--overwrite", "true", "--output_dir", str(out)]
    env_vars = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env_vars, capture_output=True, text=True)
    (work / "train.log").write_text(res.stdout + res.stderr)
    print(f"- `looprl train` (2 steps, 2 prompts x 4 samples x {new_tokens} new tokens, depth 4, bf16, torch engine,"
          f" gradient checkpointing): exit {res.returncode}, {time.perf_counter() - start:.1f} s wall")
    if res.returncode != 0:
        print("```\n" + res.stderr[-1500:] + "\n```")
        return 1
    print()
    metrics(str(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    sub.add_parser("missing")
    m = sub.add_parser("metrics")
    m.add_argument("run_dir")
    o = sub.add_parser("ouro-step")
    o.add_argument("work")
    o.add_argument("--small", action="store_true")
    args = p.parse_args()
    if args.cmd == "env":
        env()
    elif args.cmd == "missing":
        missing()
    elif args.cmd == "metrics":
        metrics(args.run_dir)
    else:
        return ouro_step(Path(args.work), args.small)
    return 0


if __name__ == "__main__":
    sys.exit(main())
