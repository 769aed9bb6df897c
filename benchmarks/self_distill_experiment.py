"""RL only vs RL + self-distillation on the embedded task (issue 7, item 4).

For each arm and seed: `looprl train` from the embedded model (same settings, only
`self_distill_coef` differs), then evaluate the final model on the arith test split:
  * greedy accuracy when decoding the whole answer at each fixed depth t = 1..T (rl.evaluate);
  * confidence-based early exit (the rollout worker's exit rule "confidence", greedy: each token is read
    from the first loop whose max softmax probability reaches tau, else loop T; rollout/exit_rules.py)
    -> accuracy and mean depth used;
  * teacher-forced exit alignment on the model's own depth-T greedy answers (rl.self_distill.exit_metrics).
The pre-RL embedded model is evaluated the same way, for the "RL gain retained" column.

Usage (CPU; arms run one after another):
    HF_HUB_OFFLINE=1 python benchmarks/self_distill_experiment.py --seeds 0,1 --steps 40 --coef 0.5
    python benchmarks/self_distill_experiment.py --eval_only          # re-evaluate existing runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Run as a script, benchmarks/ is sys.path[0] and its benchmark files (e.g. rollout.py) would shadow
# the packages of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

THRESHOLDS = (0.5, 0.7, 0.9)


def train(run_dir: Path, seed: int, steps: int, coef: float, extra: list[str], threads: int) -> float:
    """One `looprl train` run in a subprocess (isolated memory, same code path as a user)."""
    cmd = [sys.executable, "-m", "rl", "train", "--output_dir", str(run_dir), "--seed", str(seed),
           "--max_steps", str(steps), "--self_distill_coef", str(coef), *extra]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - start


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import looped  # noqa: F401  (registers the Ouro classes with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


@torch.no_grad()
def alignment(model, prompt_ids, completions, batch_size: int = 64) -> dict[str, float]:
    """exit_metrics teacher-forced on (prompt + completion), over the completion predictions only."""
    from rl.self_distill import exit_metrics

    pad = 0 if model.config.pad_token_id is None else model.config.pad_token_id
    sums: dict[str, float] = {}
    count = 0
    for i in range(0, len(prompt_ids), batch_size):
        rows = [list(p) + list(c) for p, c in zip(prompt_ids[i:i + batch_size], completions[i:i + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        mask = torch.zeros_like(attn, dtype=torch.bool)
        for b, c in enumerate(completions[i:i + batch_size]):
            # position j predicts token j+1, so the completion (the last len(c) tokens) is predicted
            # from positions width-len(c)-1 .. width-2
            mask[b, width - len(c) - 1:width - 1] = True
        out = model(ids, attention_mask=attn, output_exits=True)
        n = int(mask.sum())
        for k, v in exit_metrics(out.exit_hidden_states, model.lm_head, mask, out.exit_probs).items():
            sums[k] = sums.get(k, 0.0) + v * n
        count += n
    return {k: v / count for k, v in sums.items()}


def evaluate(model_dir: str, limit: int, thresholds=THRESHOLDS, max_new_tokens: int = 16,
             batch_size: int = 64, gate_thresholds=()) -> dict:
    """Fixed-depth accuracy, early-exit accuracy vs mean depth, and exit alignment of one model.
    `gate_thresholds`: also early exit with the model's own gate (rule "gate", Ouro's CDF threshold q)."""
    import rewards
    from looped.facts import max_depth
    from rl.data import load_prompts
    from rl.evaluate import evaluate_depths
    from rl.prompts import encode_prompts
    from rollout import ExitRule, SamplingParams, make_worker

    model, tokenizer = load(model_dir)
    depth = max_depth(model)
    data = load_prompts("arith", split="test", limit=limit)
    score = rewards.get("math_accuracy")
    fixed = evaluate_depths(model, tokenizer, data, list(range(1, depth + 1)), max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
    result = {"fixed": {int(d): m["accuracy"] for d, m in fixed.items()}, "early_exit": {}}
    prompt_ids = encode_prompts(tokenizer, data["prompt"])
    eos = tokenizer.eos_token_id
    gold = [str(g) for g in data["ground_truth"]]

    worker = make_worker("torch", depth=depth, model=model, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)

    def decode(threshold, rule="confidence"):
        """Greedy decoding through the rollout worker; threshold None = every token at depth T."""
        exit_rule = ExitRule(rule, threshold) if threshold is not None else None
        comps, depths = [], []
        for i in range(0, len(prompt_ids), batch_size):
            r = worker.generate(prompt_ids[i:i + batch_size], SamplingParams(
                n=1, max_new_tokens=max_new_tokens, temperature=0.0, exit_rule=exit_rule))
            comps += r.completion_ids
            depths += r.token_depths or [[depth] * len(c) for c in r.completion_ids]
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in comps]
        acc = [float(s or 0.0) for s in score(list(data["prompt"]), texts, ground_truth=gold)]
        flat = [x for row in depths for x in row]
        return comps, sum(acc) / len(acc), sum(flat) / len(flat)

    for tau in thresholds:
        _, acc, mean_depth = decode(tau)
        result["early_exit"][tau] = {"accuracy": acc, "depth_mean": mean_depth}
    if gate_thresholds:
        result["early_exit_gate"] = {}
        for q in gate_thresholds:
            _, acc, mean_depth = decode(q, rule="gate")
            result["early_exit_gate"][q] = {"accuracy": acc, "depth_mean": mean_depth}
    deep_comps, deep_acc, _ = decode(None)  # always loop T (checks the decoder against the fixed-depth eval)
    result["deep_greedy_check"] = deep_acc
    result["alignment"] = alignment(model, prompt_ids, deep_comps, batch_size)
    return result


def mean_sd(values: list[float]) -> str:
    if any(v != v for v in values):  # NaN: e.g. no deep-exit gain to retain
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def table(results: dict, base: dict | None, depth: int, thresholds) -> str:
    """Markdown table: one row per arm, mean±sd over seeds."""
    head = ["arm", "seeds"] + [f"acc d{t}" for t in range(1, depth + 1)]
    head += [f"EE τ={tau}: acc / depth" for tau in thresholds]
    head += [f"KL t{t}" for t in range(1, depth)] + [f"accept t{t}" for t in range(1, depth)]
    if base:
        head.append(f"gain kept d{depth - 1}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = ([("base (pre-RL)", [base])] if base else []) + [(arm, runs) for arm, runs in results.items()]
    for arm, runs in rows:
        runs = [r for r in runs if r]
        cells = [arm, str(len(runs))]
        cells += [mean_sd([r["fixed"][t] for r in runs]) for t in range(1, depth + 1)]
        for tau in thresholds:
            acc = mean_sd([r["early_exit"][tau]["accuracy"] for r in runs])
            dep = statistics.mean(r["early_exit"][tau]["depth_mean"] for r in runs)
            cells.append(f"{acc} / {dep:.2f}")
        cells += [mean_sd([r["alignment"][f"exit/kl_t{t}"] for r in runs]) for t in range(1, depth)]
        cells += [mean_sd([r["alignment"][f"exit/accept_t{t}"] for r in runs]) for t in range(1, depth)]
        if base:
            if arm.startswith("base"):
                cells.append("-")
            else:
                kept = []
                for r in runs:
                    gain_deep = r["fixed"][depth] - base["fixed"][depth]
                    gain = r["fixed"][depth - 1] - base["fixed"][depth - 1]
                    kept.append(gain / gain_deep if gain_deep > 0 else float("nan"))
                cells.append(mean_sd(kept))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--coef", type=float, default=0.5, help="self_distill_coef of the RL + SD arm")
    p.add_argument("--arms", default="rl,rl_sd")
    p.add_argument("--out", default="runs/self_distill_exp")
    p.add_argument("--limit", type=int, default=200, help="arith test prompts to evaluate")
    p.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
    p.add_argument("--eval_only", action="store_true", help="skip training; evaluate existing run dirs")
    p.add_argument("--threads", type=int, default=1, help="torch threads for eval and training")
    p.add_argument("--train_args", default="", help="extra `looprl train` overrides, e.g. '--lr 1e-4'")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # the 2-core box is shared: oversubscribed threads crawl
    from rl.data import EMBEDDED_MODEL

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    coefs = {"rl": 0.0, "rl_sd": args.coef}
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.setdefault("runs", {})
    report["settings"] = {"steps": args.steps, "coef": args.coef, "seeds": seeds, "limit": args.limit,
                          "train_args": args.train_args}
    if "base" not in report:
        start = time.perf_counter()
        report["base"] = evaluate(str(EMBEDDED_MODEL), args.limit, thresholds)
        print(f"base evaluated in {time.perf_counter() - start:.0f}s", flush=True)
    for arm in args.arms.split(","):
        for seed in seeds:
            run_dir = out / f"{arm}_s{seed}"
            key = f"{arm}/{seed}"
            if not args.eval_only:
                elapsed = train(run_dir, seed, args.steps, coefs[arm], args.train_args.split(), args.threads)
                report.setdefault("train_s", {})[key] = elapsed
            report["runs"][key] = evaluate(str(run_dir / "final"), args.limit, thresholds)
            report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(key, json.dumps(report["runs"][key]["fixed"]), flush=True)
    # JSON round trips turn int/float keys into strings: normalise for the table.
    norm = {}
    for r in [report["base"], *report["runs"].values()]:
        r["fixed"] = {int(k): v for k, v in r["fixed"].items()}
        r["early_exit"] = {float(k): v for k, v in r["early_exit"].items()}
    for key, r in report["runs"].items():
        norm.setdefault(key.split("/")[0], []).append(r)
    depth = max(report["base"]["fixed"])
    md = table(norm, report["base"], depth, thresholds)
    print(md)
    (out / "table.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
