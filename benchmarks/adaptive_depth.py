"""Adaptive per-token depth vs fixed depth T: rollout tokens/s side by side in one process (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_depth.py                     # tiny + large, batch 1, 8, 64
    python benchmarks/adaptive_depth.py --checkpoint runs/sd/final --rule confidence --threshold 0.6

For each model and batch size the torch rollout worker (fused Ouro decode step) samples the same prompts
(temperature 1, `--max_new_tokens` tokens each, no stop token so both arms produce the same token count)
once at fixed depth T and once under the exit rule; arms alternate over `--repeats` runs and the best
wall time of each is kept. Reported: tokens/s of both, speedup, the adaptive run's mean depth, and
`speedup / (T / mean_depth)`: the fraction of the ideal saving (all compute scaling with loops run)
that the decode step actually realises (prefill, the rule's own readout and the K/V rule's projections are the rest).
Models: `tiny` = the shipped embedded model on arith prompts (rule `--rule`/`--threshold`, default
confidence 0.6); `large` = a random-init Ouro config (hidden 384, 4 layers, GQA 8/2, T = 4) on random
prompts under the `gate` rule at q = `--gate_q` (a random model is never confident; its gate is ~0.5 per
loop); `--checkpoint` adds a trained (e.g. self-distilled) model on arith prompts under `--rule`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))  # as a script, this folder would shadow `rollout`
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def arith_prompts(model_dir: str, count: int) -> list[list[int]]:
    from rl.data import load_prompts
    from rl.model_io import load_tokenizer
    from rl.prompts import encode_prompts

    tokenizer = load_tokenizer(model_dir, "--checkpoint")
    data = load_prompts("arith", split="test", limit=count)
    return encode_prompts(tokenizer, list(data["prompt"]))


def large_model():
    from looped import OuroConfig, OuroForCausalLM

    torch.manual_seed(0)
    config = OuroConfig(vocab_size=2048, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, total_ut_steps=4,
                        max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    return OuroForCausalLM(config).eval()


def measure(worker, prompts, params, repeats: int) -> tuple[float, float]:
    """(best tokens/s, mean depth) of `repeats` generate() calls."""
    best, depth = 0.0, float(worker.depth)
    for _ in range(repeats):
        start = time.perf_counter()
        rollout = worker.generate(prompts, params)
        elapsed = time.perf_counter() - start
        best = max(best, rollout.num_completion_tokens / elapsed)
        if rollout.token_depths is not None:
            flat = [d for row in rollout.token_depths for d in row]
            depth = sum(flat) / len(flat)
    return best, depth


def main(argv: list[str] | None = None) -> int:
    from looped.facts import max_depth
    from rl.data import EMBEDDED_MODEL
    from rl.model_io import load_model
    from rollout import ExitRule, SamplingParams, make_worker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,large", help="comma list of tiny, large")
    p.add_argument("--checkpoint", default=None, help="also a trained model directory (e.g. self-distilled)")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--rule", default="confidence", choices=["confidence", "gate"])
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--gate_q", type=float, default=0.6, help="gate q of the random-init model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    cases = []
    for name in filter(None, args.models.split(",")):
        if name == "tiny":
            cases.append(("tiny", load_model(str(EMBEDDED_MODEL), "tiny", dtype=torch.float32),
                          arith_prompts(str(EMBEDDED_MODEL), max(batches)), ExitRule(args.rule, args.threshold)))
        elif name == "large":
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, 2048, (16,), generator=g).tolist() for _ in range(max(batches))]
            cases.append(("large", large_model(), prompts, ExitRule("gate", args.gate_q)))
        else:
            raise SystemExit(f"--models: unknown model {name!r} (tiny, large)")
    if args.checkpoint:
        cases.append((os.path.basename(os.path.normpath(args.checkpoint)) or "checkpoint",
                      load_model(args.checkpoint, "--checkpoint", dtype=torch.float32),
                      arith_prompts(args.checkpoint, max(batches)), ExitRule(args.rule, args.threshold)))

    print(f"adaptive vs fixed-depth rollouts, {args.threads} thread(s), {args.max_new_tokens} new tokens per row, "
          f"temperature 1, best of {args.repeats}")
    print("| model | rule | batch | fixed tok/s | adaptive tok/s | speedup | mean depth | T/mean depth | "
          "speedup / ideal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, model, prompts, rule in cases:
        T = max_depth(model)
        worker = make_worker("torch", depth=T, model=model, pad_token_id=0)
        for batch in batches:
            common = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0, stop_token_ids=[])
            chosen = prompts[:batch]
            worker.generate(chosen, SamplingParams(**common))  # warm-up (and the fused step's check)
            fixed = adaptive = (0.0, float(T))
            for _ in range(args.repeats):  # interleaved: both arms see the same machine load
                f = measure(worker, chosen, SamplingParams(**common), 1)
                a = measure(worker, chosen, SamplingParams(**common, exit_rule=rule), 1)
                fixed, adaptive = max(fixed, f), (max(adaptive[0], a[0]), a[1])
            speedup = adaptive[0] / fixed[0]
            ideal = T / adaptive[1]
            print(f"| {name} | {rule.kind} {rule.threshold:g} | {batch} | {fixed[0]:.0f} | {adaptive[0]:.0f} | "
                  f"{speedup:.2f}x | {adaptive[1]:.2f} | {ideal:.2f}x | {speedup / ideal:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
