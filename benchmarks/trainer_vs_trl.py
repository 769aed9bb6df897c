"""Seconds per GRPO step: looprl's trainer vs TRL's GRPOTrainer (no vLLM), same model, same job, CPU.

Both trainers get the same standard HF causal LM (a small Qwen2 built here, random weights, saved to
a temp dir with the char-level tokenizer of the embedded model), the same `arith` prompts (the same
rows; each run walks them once, in its own order), the same group size, completion length,
temperature, loss (DAPO token-level, clip 0.2/0.28, no KL, one update per step) and the same cheap
reward function (so reward time does not dominate). looprl runs at depth 1 with its torch engine and
without dynamic sampling, so both do one rollout round per step.

Per-step wall time: looprl's own `time/step` metric; TRL's time between successive `on_step_end`
callbacks. The first step of each run is warm-up and dropped; runs alternate (looprl, TRL, TRL,
looprl, ...) and the table reports the median over all timed steps.

With --max-staleness k >= 1 looprl runs with asynchronous rollouts (a second process samples the next
steps while the trainer updates; TRL's GRPOTrainer stays synchronous): its s/step is then the trainer's
step, about max(update, rollout + reward) once the two overlap.

    python benchmarks/trainer_vs_trl.py [--steps 6] [--repeats 2] [--prompts 8] [--group 8] [--max-new-tokens 32]
        [--max-staleness 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, where benchmarks/rollout.py would
# shadow the `rollout` package; the installed packages must win.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# One intra-op thread: on a shared 2-core box torch's default threads spin-wait and tiny models slow
# down 10x or more; --threads still sets torch.set_num_threads for both trainers alike.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REWARD_NAME = "bench_digit_fraction"


def digit_fraction(prompts, completions, **kwargs) -> list[float]:
    """Share of digit characters: cheap, continuous (groups never have zero spread), same for both."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def build_model_dir(out: Path, hidden: int, layers: int, seed: int) -> Path:
    """A small standard Qwen2 causal LM + the embedded model's char tokenizer, saved as an HF dir."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.make_tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).float()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_looprl(model_dir: Path, args, out_dir: Path) -> dict:
    import rewards
    from rl.config import build_config, validate
    from rl.train import Trainer

    if REWARD_NAME not in rewards.available():
        rewards.register(REWARD_NAME)(digit_fraction)
    cfg = build_config({
        "model": str(model_dir), "depth": 1, "engine": "torch", "dtype": "float32",
        "data": "arith", "data_limit": args.prompts * args.steps,
        "rewards": [REWARD_NAME], "accuracy_reward": "", "max_staleness": args.max_staleness,
        "num_generations": args.group, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
        "loss_type": "dapo", "eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, "num_iterations": 1,
        "scale_rewards": "group", "dynamic_sampling": False, "mask_truncated": False,
        "lr": args.lr, "max_grad_norm": 1.0, "max_steps": args.steps, "prompts_per_step": args.prompts,
        "micro_batch_size": args.prompts * args.group, "seed": args.seed, "output_dir": str(out_dir),
        "save_every": 0, "log_samples": 0, "progress": False, "mismatch_warn": 1.0, "eval_every": 0,
    }, where="benchmark")
    if args.max_staleness:  # scored in a spawned process: it imports the function (this script is re-imported
        cfg.rewards = [digit_fraction]  # there) but does not see this process's registrations
    validate(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > 0]  # a step-0 row is an eval baseline, not a training step
    return {
        "step_s": [r["time/step"] for r in rows],
        "len_mean": statistics.mean(r["completion/len_mean"] for r in rows),
        "rollout_s": [r["time/rollout"] for r in rows],
        "reward_s": [r["time/reward"] for r in rows],
        "update_s": [r["time/update"] for r in rows],
    }


def run_trl(model_dir: Path, args, out_dir: Path) -> dict:
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl.data import load_prompts

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = [time.perf_counter()]

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())

    dataset = load_prompts("arith", limit=args.prompts * args.steps)
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, use_vllm=False, bf16=False, seed=args.seed,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1, scale_rewards="group",
        mask_truncated_completions=False, learning_rate=args.lr, lr_scheduler_type="constant",
        max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        log_completions=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=digit_fraction, args=config, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer],
    )
    # TRL's rollout phase (HF generate + rewards + advantages), timed around its own method, so the
    # table can say where each trainer's step goes; the update is the rest of the step.
    gen_s: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*a, **kw):
        t0 = time.perf_counter()
        out = generate_and_score(*a, **kw)
        gen_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions = timed_generate_and_score
    timer.marks = [time.perf_counter()]
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": steps, "len_mean": statistics.mean(lengths) if lengths else float("nan"),
            "rollout_s": gen_s[:len(steps)], "update_s": [s - g for s, g in zip(steps, gen_s)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="steps per trainer (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs per trainer, alternating which goes first")
    p.add_argument("--max-staleness", type=int, default=0,
                   help="looprl's max_staleness (>= 1: asynchronous rollouts; TRL stays synchronous)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is dropped as warm-up)")
    torch.set_num_threads(args.threads)

    ours: dict[str, list] = {}
    theirs: dict[str, list] = {}

    def add(pool: dict, run: dict) -> None:  # pool timed steps (drop each run's warm-up step)
        for key, values in run.items():
            pool.setdefault(key, []).extend(values[1:] if isinstance(values, list) else [values])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "model", args.hidden, args.layers, args.seed)
        params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            model_dir).parameters())
        for rep in range(args.repeats):  # alternate the order so a drifting machine load hits both alike
            order = ("looprl", "trl") if rep % 2 == 0 else ("trl", "looprl")
            for name in order:
                if name == "looprl":
                    add(ours, run_looprl(model_dir, args, tmp / f"looprl-{rep}"))
                else:
                    add(theirs, run_trl(model_dir, args, tmp / f"trl-{rep}"))

    ours_s = statistics.median(ours["step_s"])
    trl_s = statistics.median(theirs["step_s"])
    print(f"\nQwen2 {params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers), "
          f"{args.prompts} prompts x {args.group} completions x <= {args.max_new_tokens} new tokens, "
          f"fp32, CPU {platform.machine()} x {args.threads} thread(s), median of {len(ours['step_s'])} timed steps "
          f"each ({args.repeats} alternating runs x {args.steps - 1})")
    print(f"{'trainer':<26}{'s/step':>9}{'mean completion len':>22}{'vs TRL':>9}")
    print(f"{'TRL 1.x GRPOTrainer':<26}{trl_s:>9.2f}{statistics.mean(theirs['len_mean']):>22.1f}{1.0:>9.2f}")
    name = f"looprl (async k={args.max_staleness})" if args.max_staleness else "looprl (torch engine)"
    print(f"{name:<26}{ours_s:>9.2f}{statistics.mean(ours['len_mean']):>22.1f}{ours_s / trl_s:>9.2f}")
    parts = {k: statistics.median(ours[f"{k}_s"]) for k in ("rollout", "reward", "update")}
    print("looprl step parts (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    if theirs.get("rollout_s"):
        trl_parts = {k: statistics.median(theirs[f"{k}_s"]) for k in ("rollout", "update")}
        print("TRL step parts (median s): rollout (generate + rewards) "
              f"{trl_parts['rollout']:.2f}, update {trl_parts['update']:.2f}")
    print(f"all steps (s): looprl {[round(s, 2) for s in ours['step_s']]}  TRL {[round(s, 2) for s in theirs['step_s']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
