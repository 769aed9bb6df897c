"""Synchronous vs asynchronous rollouts (issue 23): the default job at max_staleness 0, 1 and 2, side by side.

For each seed and each max_staleness: `looprl train` of the default job (plus --train_args) for --steps
steps, one run after another (never two at once: they would share the cores). Reported per run: the job's
wall time (process start to exit), the trainer's seconds per step (mean time/step, startup excluded), the
speedup over max_staleness 0 of the same seed (both measures), the final training accuracy (mean of the
last tenth of steps), and async/staleness_mean and dropped groups; then means over seeds. With
--eval_limit N each final model is also evaluated greedily at the model's depth on the first N `arith` test
prompts (`looprl eval`), and each max_staleness is compared with the baseline on the same seed: the paired
difference in points, mean ± sd and its 95 % t interval (the protocol of docs/EXPERIMENTS.md). Writes
summary.json, summary.md and reward_vs_wallclock.png (training reward and accuracy against the trainer's
cumulative wall time, one line per run) under --out.

Usage (CPU, the full comparison; ~3 runs x 3 seeds of the default job):
    HF_HUB_OFFLINE=1 python benchmarks/async_rollouts.py --steps 300 --seeds 0,1,2 --staleness 0,1,2 \\
        --out runs/async_bench [--eval_limit 500]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/ is not a package; as a script its own dir would shadow the `rollout` package
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

DEFAULT_TRAIN_ARGS = "--eval_every 0 --progress false"


def train(run_dir: Path, seed: int, steps: int, staleness: int, extra: list[str], threads: int) -> float:
    """One `looprl train` run; returns its wall time in seconds (interpreter start to exit)."""
    cmd = [sys.executable, "-m", "rl", "train", "--output_dir", str(run_dir), "--overwrite", "--seed", str(seed),
           "--max_steps", str(steps), "--max_staleness", str(staleness), *extra]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def evaluate(run_dir: Path, limit: int, threads: int) -> float:
    """Greedy accuracy of run_dir/final at the model's own depth on the first `limit` arith test prompts."""
    out = run_dir / "eval.json"
    cmd = [sys.executable, "-m", "rl", "eval", "--model", str(run_dir / "final"), "--data", "arith", "--limit",
           str(limit), "--out", str(out), "--no_progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    depths = json.loads(out.read_text())["depths"]
    return depths[max(depths, key=int)]["accuracy"]


def paired_cell(diffs: list[float]) -> str:
    """exit_policy_experiment.paired_cell (mean ± sd [95 % t interval]); benchmarks/ is not a package."""
    spec = importlib.util.spec_from_file_location("exit_policy_experiment", HERE / "exit_policy_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paired_cell(diffs)


def run_facts(run_dir: Path, wall: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    tenth = max(1, len(rows) // 10)
    clock, t = [], 0.0
    for r in rows:
        t += r["time/step"]
        clock.append(t)
    acc = [r["accuracy"] for r in rows if isinstance(r.get("accuracy"), (int, float))]
    return {"wall_s": wall, "s_per_step": clock[-1] / len(rows), "steps": len(rows),
            "final_accuracy": statistics.fmean(acc[-tenth:]) if acc else float("nan"),
            "staleness_mean": statistics.fmean(r.get("async/staleness_mean", 0.0) for r in rows),
            "dropped_stale": sum(r.get("async/dropped_stale", 0.0) for r in rows),
            "wait_rollout_s": statistics.fmean(r.get("time/wait_rollout", 0.0) for r in rows),
            "weight_sync_s": statistics.fmean(r.get("time/weight_sync", 0.0) for r in rows),
            "curve": {"clock_s": clock, "reward": [r["reward/mean"] for r in rows],
                      "accuracy": [r.get("accuracy") for r in rows]}}


def _smooth(values: list[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - width + 1):i + 1] if v is not None]
        out.append(statistics.fmean(window) if window else float("nan"))
    return out


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {0: "tab:blue", 1: "tab:orange", 2: "tab:green", 3: "tab:red"}
    for _, facts in sorted(runs.items()):
        k = facts["max_staleness"]
        curve = facts["curve"]
        width = max(1, len(curve["reward"]) // 20)
        for ax, key in zip(axes, ("reward", "accuracy")):
            ax.plot(curve["clock_s"], _smooth(curve[key], width), color=colours.get(k, None), alpha=0.8,
                    label=f"max_staleness {k}" if facts["seed"] == min(r["seed"] for r in runs.values()) else None)
    for ax, key in zip(axes, ("training reward (smoothed)", "training accuracy (smoothed)")):
        ax.set_xlabel("trainer wall time (s, startup excluded)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("sync (max_staleness 0) vs async rollouts: one line per (max_staleness, seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_table(runs: dict[str, dict], staleness: list[int], seeds: list[int]) -> str:
    """Held-out accuracy per max_staleness and its paired difference from the baseline (same seed)."""
    lines = ["| max_staleness | seeds | test accuracy (mean ± sd) | minus max_staleness "
             f"{staleness[0]}, points [95 % CI] | per seed |", "|---|---|---|---|---|"]
    for k in staleness:
        accs = [runs[f"k{k}_s{s}"]["test_accuracy"] for s in seeds]
        diffs = [100 * (a - runs[f"k{staleness[0]}_s{s}"]["test_accuracy"]) for a, s in zip(accs, seeds)]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {k} | {len(seeds)} | {statistics.fmean(accs):.3f} ± {sd:.3f} | "
                     f"{paired_cell(diffs) if k != staleness[0] else '-'} | "
                     f"{', '.join(f'{a:.3f}' for a in accs)} |")
    return "\n".join(lines)


def table(summary: dict) -> str:
    lines = ["| max_staleness | seeds | job wall s | s/step | speedup (wall) | speedup (s/step) | final accuracy "
             "| staleness mean | dropped groups | wait s/step | weight sync s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, row in summary["by_staleness"].items():
        lines.append(f"| {k} | {row['seeds']} | {row['wall_s']:.1f} | {row['s_per_step']:.3f} | "
                     f"{row['speedup_wall']:.2f}x | {row['speedup_step']:.2f}x | {row['final_accuracy']:.3f} "
                     f"+- {row['final_accuracy_sd']:.3f} | {row['staleness_mean']:.2f} | {row['dropped_stale']:.0f} | "
                     f"{row['wait_rollout_s']:.3f} | {row['weight_sync_s']:.4f} |")
    return "\n".join(lines)


def summarize(runs: dict[str, dict], staleness: list[int], seeds: list[int]) -> dict:
    by_k = {}
    for k in staleness:
        mine = [runs[f"k{k}_s{s}"] for s in seeds]
        base = [runs[f"k{staleness[0]}_s{s}"] for s in seeds]
        accs = [r["final_accuracy"] for r in mine]
        by_k[str(k)] = {
            "seeds": len(mine),
            "wall_s": statistics.fmean(r["wall_s"] for r in mine),
            "s_per_step": statistics.fmean(r["s_per_step"] for r in mine),
            "speedup_wall": statistics.fmean(b["wall_s"] / r["wall_s"] for b, r in zip(base, mine)),
            "speedup_step": statistics.fmean(b["s_per_step"] / r["s_per_step"] for b, r in zip(base, mine)),
            "final_accuracy": statistics.fmean(accs),
            "final_accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "staleness_mean": statistics.fmean(r["staleness_mean"] for r in mine),
            "dropped_stale": sum(r["dropped_stale"] for r in mine),
            "wait_rollout_s": statistics.fmean(r["wait_rollout_s"] for r in mine),
            "weight_sync_s": statistics.fmean(r["weight_sync_s"] for r in mine),
        }
    return {"baseline": staleness[0], "by_staleness": by_k}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (the default job: 300)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--staleness", default="0,1,2", help="max_staleness values; the first is the baseline")
    ap.add_argument("--train_args", default=DEFAULT_TRAIN_ARGS, help="more `looprl train` arguments, for every run")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--out", default="runs/async_bench")
    ap.add_argument("--eval_limit", type=int, default=0,
                    help="> 0: evaluate each final model on that many arith test prompts (500: all) and pair them")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    staleness = [int(k) for k in args.staleness.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in seeds:  # seeds outer: a machine that slows down over time hits every arm alike
        for k in staleness:
            run_dir = out / f"k{k}_s{seed}"
            wall = train(run_dir, seed, args.steps, k, shlex.split(args.train_args), args.threads)
            runs[run_dir.name] = {"max_staleness": k, "seed": seed, **run_facts(run_dir, wall)}
    summary = summarize(runs, staleness, seeds)
    text = table(summary)
    if args.eval_limit:  # after every run: evaluation never shares the cores with a timed run
        for name, facts in runs.items():
            facts["test_accuracy"] = evaluate(out / name, args.eval_limit, args.threads)
        summary["eval_table"] = eval_table(runs, staleness, seeds)
        text += f"\n\ngreedy test accuracy at the model's depth ({args.eval_limit} arith test prompts):\n\n"
        text += summary["eval_table"]
    (out / "summary.json").write_text(json.dumps({"args": vars(args), **summary, "runs": runs}, indent=1) + "\n")
    (out / "summary.md").write_text(text + "\n")
    plot(runs, out / "reward_vs_wallclock.png")
    print(text)
    print(f"curves: {out / 'reward_vs_wallclock.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
