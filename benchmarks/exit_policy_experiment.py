"""Head-to-head on the embedded task (issue 15): DAPO on exit T vs self-distillation vs the exit-weighted
policy term (RLTT-style) vs both, optionally with the Stage-II gate fit.

For each arm and seed: `looprl train` from the embedded model (same budget; the arms differ only in the
keys listed in ARMS), then the final model is evaluated exactly as benchmarks/self_distill_experiment.py
does (fixed-depth greedy accuracy at every depth, max-prob early exit at several thresholds with the
mean depth used, teacher-forced exit alignment), plus the run's median wall time per step and the exit
gate's mean distribution p(t) at the first and last step (exit/p_mean_t{t}).

Issue 22 (adaptive per-token depth): the arms fixed_T (today's default), adaptive (rollouts under the
confidence exit rule at --tau, the update at each token's own depth), adaptive_mismatch (the same rollouts,
updated at fixed T: allow_depth_mismatch) and adaptive_sd (adaptive + self-distillation 0.3 ramped over 100
steps); every arm is also evaluated under that rule (accuracy and mean depth, the deployed regime), and
their table adds the median rollout time per step and the run means of mismatch/logp_abs_max and
rollout/mean_depth from metrics.jsonl:
    HF_HUB_OFFLINE=1 python benchmarks/exit_policy_experiment.py --arms fixed_T,adaptive,adaptive_mismatch,\
        adaptive_sd --seeds 0,1,2,3,4 --steps 200 --tau 0.8 --reference fixed_T --out runs/adaptive_exp \
        --figure docs/figures/adaptive_depth.png

Usage (CPU; arms and seeds run one after another; re-running skips finished (arm, seed) pairs):
    HF_HUB_OFFLINE=1 python benchmarks/exit_policy_experiment.py --seeds 0,1,2,3,4 --steps 200 \\
        --out runs/exit_policy_exp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# benchmarks/ is not a package; as a script its own dir would shadow the `rollout` package
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

ARMS: dict[str, list[str]] = {
    "dapo": [],
    "dapo_sd": ["--self_distill_coef", "{coef}"],
    "dapo_exits_gate": ["--policy_exits", "all", "--policy_exit_weights", "gate"],
    "dapo_exits_prog": ["--policy_exits", "all", "--policy_exit_weights", "progressive"],
    "dapo_exits_sd": ["--policy_exits", "all", "--policy_exit_weights", "progressive", "--self_distill_coef", "{coef}"],
    "dapo_exits_gatefit": ["--policy_exits", "all", "--policy_exit_weights", "gate", "--gate_loss_coef", "1.0"],
    "dapo_exits_gatefit_fast": ["--policy_exits", "all", "--policy_exit_weights", "gate", "--gate_loss_coef", "1.0",
                                "--gate_lr", "1e-2"],
    # self-distillation recipes (issue 15 item 4): a weaker coefficient, and the same ramped in
    "dapo_sd_c0.1": ["--self_distill_coef", "0.1"],
    "dapo_sd_c0.3": ["--self_distill_coef", "0.3"],
    "dapo_sd_c0.3_w100": ["--self_distill_coef", "0.3", "--self_distill_warmup_steps", "100"],
    "dapo_sd_c1_w200": ["--self_distill_coef", "1.0", "--self_distill_warmup_steps", "200"],
    "dapo_sd_c0.1_w150": ["--self_distill_coef", "0.1", "--self_distill_warmup_steps", "150"],
    # the algorithm ablation of docs/EXPERIMENTS.md "GRPO vs DAPO" (run with the default job's --train_args)
    "dapo_no_ds": ["--dynamic_sampling", "false"],
    "grpo": ["--loss_type", "grpo", "--eps_high", "0.2", "--dynamic_sampling", "false"],
    # adaptive per-token depth (issue 22): (a) fixed depth T, (b) rollouts under the confidence rule at tau with
    # the matched per-token-depth update, (c) the same rollouts updated at fixed T (the mismatch Ouro had),
    # (d) (b) + the self-distillation ramp
    "fixed_T": [],
    "adaptive": ["--rollout_exit_rule", "confidence", "--rollout_exit_threshold", "{tau}"],
    "adaptive_mismatch": ["--rollout_exit_rule", "confidence", "--rollout_exit_threshold", "{tau}",
                          "--allow_depth_mismatch", "true"],
    "adaptive_sd": ["--rollout_exit_rule", "confidence", "--rollout_exit_threshold", "{tau}",
                    "--self_distill_coef", "0.3", "--self_distill_warmup_steps", "100"],
    # LoRA on every linear of the shared block vs full fine-tuning (issue 24); lr 1e-3 chosen on seeds 0-2
    "lora_r8": ["--lora_rank", "8", "--lr", "1e-3"],
    "lora_r32": ["--lora_rank", "32", "--lr", "1e-3"],
}
ADAPTIVE_ARMS = "fixed_T,adaptive,adaptive_mismatch,adaptive_sd"
DEFAULT_ARMS = "dapo,dapo_sd,dapo_exits_gate,dapo_exits_prog,dapo_exits_sd"
DEFAULT_TRAIN_ARGS = "--prompts_per_step 16 --lr 2e-4 --eval_every 0 --progress false"


def _sd_module():
    """benchmarks/self_distill_experiment.py (its evaluation and table are reused unchanged)."""
    spec = importlib.util.spec_from_file_location("bench_self_distill_experiment", HERE / "self_distill_experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def train(run_dir: Path, seed: int, steps: int, arm_args: list[str], extra: list[str],
          threads: int) -> tuple[float, float]:
    """Run `looprl train`; returns (wall seconds, peak RSS in MiB of the training process and its children)."""
    cmd = [sys.executable, "-m", "rl", "train", "--output_dir", str(run_dir), "--seed", str(seed),
           "--max_steps", str(steps), *extra, *arm_args]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN accumulates over runs)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def run_facts(run_dir: Path) -> dict:
    """Median time/step and rollout time/step, the gate's mean p(t) at the first and last logged step, and the
    run means of mismatch/logp_abs_max and rollout/mean_depth (loops per sampled token)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    gate = {}
    for name, row in (("first", rows[0]), ("last", rows[-1])):
        gate[name] = [row[k] for k in sorted(k for k in row if k.startswith("exit/p_mean_t"))]

    def mean_of(key):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.mean(values) if values else None

    return {"time_step_median": statistics.median(r["time/step"] for r in rows), "gate_p": gate,
            "time_rollout_median": statistics.median(r["time/rollout"] for r in rows),
            "mismatch_max_mean": mean_of("mismatch/logp_abs_max"), "rollout_depth_mean": mean_of("rollout/mean_depth")}


def adaptive_table(grouped: dict[str, list[dict]], facts: dict[str, dict], depth: int, tau: float) -> str:
    """The adaptive-depth arms (issue 22): deep accuracy, accuracy and mean depth under the confidence rule at tau
    (the deployed regime, greedy, through the rollout worker), and the training run's rollout time per step,
    mean rollout depth and mean rollout/update mismatch; mean ± sd over seeds."""
    from statistics import mean

    def msd(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return f"{mean(xs):.3g}" + (f" ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else "")

    head = ["arm", "seeds", f"acc d{depth}", f"acc rule τ={tau}", "eval mean depth", "rollout s/step (median)",
            "train rollout mean depth", "mismatch max (mean over steps)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in grouped.items():
        arm_facts = [f for k, f in facts.items() if k.split("/")[0] == arm]
        ee = [r["early_exit"].get(tau) for r in runs if tau in r["early_exit"]]
        lines.append(" | ".join([
            f"| {arm}", str(len(runs)), msd([r["fixed"][depth] for r in runs]), msd([e["accuracy"] for e in ee]),
            msd([e["depth_mean"] for e in ee]), msd([f.get("time_rollout_median") for f in arm_facts]),
            msd([f.get("rollout_depth_mean") for f in arm_facts]),
            msd([f.get("mismatch_max_mean") for f in arm_facts])]) + " |")
    return "\n".join(lines)


def figure(grouped: dict[str, list[dict]], base: dict, depth: int, path: Path) -> Path:
    """Accuracy vs loops used per token: fixed depths (lines) and max-prob early exit (markers), seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    depths = list(range(1, depth + 1))
    ax.plot(depths, [base["fixed"][d] for d in depths], color="grey", linestyle=":", label="pre-RL, fixed depth")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, runs) in enumerate(grouped.items()):
        c = colors[i % len(colors)]
        ax.plot(depths, [statistics.mean(r["fixed"][d] for r in runs) for d in depths], color=c, alpha=0.6,
                label=f"{arm} (n={len(runs)}), fixed depth")
        taus = sorted(runs[0]["early_exit"])
        xs = [statistics.mean(r["early_exit"][t]["depth_mean"] for r in runs) for t in taus]
        ys = [statistics.mean(r["early_exit"][t]["accuracy"] for r in runs) for t in taus]
        ax.plot(xs, ys, color=c, marker="o", linestyle="--", linewidth=0.8)  # early-exit curve
    ax.set_xlabel("loops per token (fixed depth: solid; mean depth of max-prob early exit: dashed, dots)")
    ax.set_ylabel("greedy accuracy, arith test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (the 95 % interval's multiplier, p = 0.975) by bisection on its CDF, itself Simpson's
    rule over the density: no scipy for one constant per table."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_cell(diffs: list[float], digits: int = 1) -> str:
    """Mean ± sd of paired differences and their 95 % t interval: `+1.2 ± 2.0 [-0.2, +2.6]`."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.{digits}f}"
    sd = statistics.stdev(diffs)
    half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return f"{mean:+.{digits}f} ± {sd:.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def _paired_rows(by_seed: dict[str, dict[str, dict]], reference: str, columns, digits: int = 1) -> list[str]:
    """One row per arm: `columns` are (header, value(run)) pairs; each cell is the arm's value minus the
    reference arm's on the same seed (paired_cell)."""
    lines = ["| " + " | ".join(["arm - " + reference, "seeds", *(h for h, _ in columns)]) + " |",
             "|" + "---|" * (len(columns) + 2)]
    ref = by_seed[reference]
    for arm, runs in by_seed.items():
        seeds = sorted((s for s in runs if s in ref), key=int)
        if arm == reference or not seeds:
            continue
        cells = [paired_cell([value(runs[s]) - value(ref[s]) for s in seeds], digits) for _, value in columns]
        lines.append(f"| {arm} | {','.join(seeds)} | " + " | ".join(cells) + " |")
    return lines


def paired_table(by_seed: dict[str, dict[str, dict]], reference: str, depth: int, thresholds) -> str:
    """Each arm minus the reference arm on the same seed: mean ± sd of the per-seed differences and the 95 %
    interval of their mean (Student t, n - 1 degrees of freedom). The seed-to-seed spread of the arms
    themselves is larger than that of their difference; a claim holds when its interval excludes 0 on seeds
    that were not used to choose the arm. Three tables: accuracy (points) at depth T and under max-prob early
    exit at each τ; the mean depth that early exit used (loops per token); the exits' KL to the last exit."""
    acc = [(f"Δ acc d{depth} (points) [95 % CI]", lambda r: 100 * r["fixed"][depth])]
    acc += [(f"Δ EE τ={t}", lambda r, t=t: 100 * r["early_exit"][t]["accuracy"]) for t in thresholds]
    depths = [(f"Δ EE depth τ={t} (loops)", lambda r, t=t: r["early_exit"][t]["depth_mean"]) for t in thresholds]
    kl = [(f"Δ KL(p{depth}‖p{t}) (nats)", lambda r, t=t: r["alignment"][f"exit/kl_t{t}"]) for t in range(1, depth)]
    tables = [_paired_rows(by_seed, reference, acc), _paired_rows(by_seed, reference, depths, 2)]
    if all("alignment" in r for runs in by_seed.values() for r in runs.values()):
        tables.append(_paired_rows(by_seed, reference, kl, 3))
    return "\n\n".join("\n".join(t) for t in tables)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--coef", type=float, default=1.0, help="self_distill_coef of the *_sd arms")
    p.add_argument("--tau", type=float, default=0.8, help="confidence threshold of the adaptive* arms' exit rule "
                                                          "(rollouts, and the eval of every arm at it)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)} (issue 22: "
                                                        f"{ADAPTIVE_ARMS})")
    p.add_argument("--out", default="runs/exit_policy_exp")
    p.add_argument("--limit", type=int, default=500, help="arith test prompts to evaluate")
    p.add_argument("--thresholds", default="0.6,0.7,0.8,0.9")
    p.add_argument("--gate_thresholds", default="", help="also early exit with the model's exit gate (rule "
                                                         "'gate', Ouro's CDF threshold q) at these q; finished "
                                                         "runs without it are re-evaluated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train_args", default=DEFAULT_TRAIN_ARGS, help="`looprl train` overrides shared by every arm")
    p.add_argument("--figure", default=None, help="also draw accuracy vs depth to this PNG")
    p.add_argument("--figure_arms", default="", help="comma list of the arms drawn (default: all in the table)")
    p.add_argument("--table_only", action="store_true", help="no new runs: table (and figure) from report.json")
    p.add_argument("--reference", default="dapo", help="arm the others are compared with seed by seed")
    p.add_argument("--merge", default="", help="comma list of other --out dirs (runs made in parallel) whose "
                                               "report.json runs join this table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sd = _sd_module()
    from rl.data import EMBEDDED_MODEL

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.tau not in thresholds:  # every arm is evaluated under the adaptive arms' rule
        thresholds = sorted(thresholds + [args.tau])
    gate_qs = [float(q) for q in filter(None, args.gate_thresholds.split(","))]
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.setdefault("runs", {})
    report.setdefault("facts", {})
    report["settings"] = {"steps": args.steps, "coef": args.coef, "tau": args.tau, "seeds": seeds, "limit": args.limit,
                          "train_args": args.train_args, "arms": {a: ARMS[a] for a in arms}}
    if "base" not in report or (gate_qs and "early_exit_gate" not in report["base"]):
        report["base"] = sd.evaluate(str(EMBEDDED_MODEL), args.limit, thresholds, gate_thresholds=gate_qs)
    for seed in seeds:  # seeds outermost: a partial run still compares every arm
        for arm in arms:
            key, run_dir = f"{arm}/{seed}", out / f"{arm}_s{seed}"
            if key in report["runs"] and gate_qs and "early_exit_gate" not in report["runs"][key]:
                report["runs"][key] = sd.evaluate(str(run_dir / "final"), args.limit, thresholds,
                                                  gate_thresholds=gate_qs)
                report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            if key in report["runs"] or args.table_only:
                continue
            arm_args = [a.format(coef=args.coef, tau=args.tau) for a in ARMS[arm]]
            wall, peak_rss_mib = train(run_dir, seed, args.steps, arm_args, args.train_args.split(), args.threads)
            report.setdefault("train_s", {})[key] = wall
            report["facts"][key] = {**run_facts(run_dir), "peak_rss_mib": peak_rss_mib}
            report["runs"][key] = sd.evaluate(str(run_dir / "final"), args.limit, thresholds, gate_thresholds=gate_qs)
            report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(key, json.dumps(report["runs"][key]["fixed"]), flush=True)
    for other in filter(None, args.merge.split(",")):
        if not (Path(other) / "report.json").is_file():
            p.error(f"--merge {other}: no report.json there (no finished run yet?)")
        extra = json.loads((Path(other) / "report.json").read_text())
        for part in ("runs", "facts", "train_s"):
            report.setdefault(part, {}).update(extra.get(part, {}))
    for r in [report["base"], *report["runs"].values()]:  # JSON turned the int/float keys into strings
        r["fixed"] = {int(k): v for k, v in r["fixed"].items()}
        r["early_exit"] = {float(k): v for k, v in r["early_exit"].items()}
        if "early_exit_gate" in r:
            r["early_exit_gate"] = {float(k): v for k, v in r["early_exit_gate"].items()}
    grouped: dict[str, list[dict]] = {}
    by_seed: dict[str, dict[str, dict]] = {}
    for key, r in report["runs"].items():
        arm, seed = key.split("/")
        grouped.setdefault(arm, []).append(r)
        by_seed.setdefault(arm, {})[seed] = r
    depth = max(report["base"]["fixed"])
    md = sd.table(grouped, report["base"], depth, thresholds)
    times = ["| arm | median time/step (s) | peak RSS (MiB) | gate p(t) first step | gate p(t) last step |",
             "|---|---|---|---|---|"]
    for arm in grouped:
        facts = [f for k, f in report["facts"].items() if k.split("/")[0] == arm]
        med = statistics.mean(f["time_step_median"] for f in facts)
        rss = [f["peak_rss_mib"] for f in facts if "peak_rss_mib" in f]  # runs recorded before it have none
        rss_cell = f"{min(rss):.0f}-{max(rss):.0f}" if rss else "-"
        fmt = lambda ps: " / ".join(f"{x:.2f}" for x in ps)  # noqa: E731
        times.append(f"| {arm} | {med:.2f} | {rss_cell} | {fmt(facts[0]['gate_p']['first'])} | "
                     f"{fmt(facts[0]['gate_p']['last'])} |")
    md = md + "\n\n" + "\n".join(times)
    if any(a in grouped for a in ADAPTIVE_ARMS.split(",")):
        md = md + "\n\n" + adaptive_table(grouped, report["facts"], depth, args.tau)
    if args.reference in by_seed:
        md = md + "\n\n" + paired_table(by_seed, args.reference, depth, thresholds)
    gated = {arm: [r for r in runs if "early_exit_gate" in r] for arm, runs in grouped.items()}
    gated = {arm: runs for arm, runs in gated.items() if runs}
    if gated:  # early exit by the model's own gate (meaningful once the gate is fitted)
        qs = sorted(next(iter(gated.values()))[0]["early_exit_gate"])
        rows = [("base (pre-RL)", [report["base"]])] if "early_exit_gate" in report["base"] else []
        lines = ["| arm | seeds | " + " | ".join(f"gate q={q}: acc / depth" for q in qs) + " |",
                 "|---|---|" + "---|" * len(qs)]
        for arm, runs in rows + list(gated.items()):
            cells = []
            for q in qs:
                got = [r["early_exit_gate"][q] for r in runs]
                depth_mean = statistics.mean(g["depth_mean"] for g in got)
                cells.append(f"{sd.mean_sd([g['accuracy'] for g in got])} / {depth_mean:.2f}")
            lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
        md = md + "\n\n" + "\n".join(lines)
    print(md)
    (out / "table.md").write_text(md + "\n")
    if args.figure:
        drawn = {a: grouped[a] for a in args.figure_arms.split(",") if a in grouped} if args.figure_arms else grouped
        print(f"wrote {figure(drawn, report['base'], depth, Path(args.figure))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
