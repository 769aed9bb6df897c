"""Long completions: the update's peak memory and time vs completion length, and rollout speed vs context.

    python benchmarks/long_completions.py                        # the docs/BENCHMARKS.md table (slow: ~1 h CPU)
    python benchmarks/long_completions.py --lengths 256,1024 --arms plain,both --rollout-contexts 256,1024

Update part: `Policy.update` (forward at depth T, DAPO loss, backward, AdamW step) on one step of
synthetic samples, `--rows` rows of a 64-token prompt + a completion of exactly L tokens (what
`ignore_eos: true` samples), on a small looped model (hidden 256, 4 layers, T = 4, ~3.7M parameters),
fp32, one torch thread. Each (length, arm) runs in a FRESH subprocess, so its peak RSS (ru_maxrss) is
that configuration's alone; `base` is the same process's RSS before the update (python + torch + the
model), `peak` the maximum over the process. Arms:
  plain   today's defaults: micro_batch_size 256, micro_batch_tokens 0, gradient_checkpointing false
  budget  micro_batch_tokens = --budget
  ckpt    gradient_checkpointing true (one checkpoint per layer application)
  both    budget + ckpt
  both-mmap  both, with MALLOC_MMAP_THRESHOLD_=131072 (glibc keeps less freed memory: lower RSS)
Also printed per arm: the update's loss and grad_norm (the same across arms up to fp32 noise).

Checkpoint design part: one forward+backward of 1 x --design-tokens tokens with no checkpointing, one
checkpoint per layer application (what `gradient_checkpointing: true` does) and one per loop, each in a
fresh process, with glibc's default malloc and with MALLOC_MMAP_THRESHOLD_=131072; gradients must agree.

Rollout part: TorchRolloutWorker on the same model with ignore_eos (full-length), batch `--rollout-batch`,
decode tokens/s measured after a prompt of C tokens (C = --rollout-contexts), i.e. each new token attends
over C + t cached positions in each of the T x L cache slots; the growth of the per-token time with C is
the attention's share (the matmuls per token do not depend on C).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this file's folder is sys.path[0] and "rollout" would resolve to benchmarks/rollout.py.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

PROMPT_LEN = 64
# The config: hidden 256, 4 layers, T = 4; vocab 1000 -> 3.72M parameters (untied head).
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1000, total_ut_steps=4, max_position_embeddings=16384)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=100, total_ut_steps=4, max_position_embeddings=1024)
# arm: (micro_batch_tokens on, gradient_checkpointing on, extra environment of the child process)
# both-mmap: glibc malloc's mmap threshold fixed at 128 KiB: freed activation buffers go back to the OS at
# once instead of staying in the heap (the dynamic threshold grows to 32 MiB after the first large free).
ARMS = {"plain": (False, False, {}), "budget": (True, False, {}), "ckpt": (False, True, {}),
        "both": (True, True, {}), "both-mmap": (True, True, {"MALLOC_MMAP_THRESHOLD_": "131072"})}
# Peak bytes per padded token of one micro-batch (measured on the small model with default malloc):
# the update's live activations; used only to skip configurations that would not fit in free memory.
BYTES_PER_TOKEN = {False: 550e3, True: 250e3}  # keyed by gradient_checkpointing


def build_model(path: str, size: str) -> int:
    """Save a random looped model at `path`; returns its parameter count."""
    from looped import OuroConfig, OuroForCausalLM

    torch.manual_seed(0)
    model = OuroForCausalLM(OuroConfig(pad_token_id=0, eos_token_id=1, **(SMALL if size == "small" else TINY)))
    model.save_pretrained(path)
    return model.num_parameters()


def synthetic_samples(rows: int, completion_len: int, vocab: int, seed: int = 0):
    """`rows` full-length samples (what an ignore_eos step trains on) with random advantages."""
    from rl.batch import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(rows):
        ids = torch.randint(2, vocab, (PROMPT_LEN + completion_len,), generator=g).tolist()
        samples.append(Sample(prompt_index=0, prompt_ids=ids[:PROMPT_LEN], completion_ids=ids[PROMPT_LEN:],
                              rollout_logprobs=[0.0] * completion_len, truncated=True, reward=float(i % 2),
                              fn_rewards={}, correct=None, text="", advantage=float(torch.randn((), generator=g))))
    return samples


def make_policy(model_path: str, completion_len: int, budget: int, ckpt: bool, **overrides):
    """A Policy as `looprl train` builds it (one CPU process), for the given budget / checkpointing."""
    from accelerate import Accelerator

    from rl.config import TrainConfig
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    cfg = TrainConfig(model=model_path, max_new_tokens=completion_len, micro_batch_tokens=budget,
                      gradient_checkpointing=ckpt, torch_threads=1, **overrides)
    return Policy(cfg, Accelerator(cpu=True), model_path, use_tis=False, self_distill=SelfDistillConfig(),
                  pad_id=0)


def rss_gb() -> float:
    """This process's current resident set (Linux /proc), GB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def run_update(model_path: str, length: int, budget: int, ckpt: bool, rows: int, steps: int) -> dict:
    """One configuration, in this process: seconds per update, base and peak RSS, loss, grad_norm."""
    torch.set_num_threads(1)
    policy = make_policy(model_path, length, budget, ckpt)
    vocab = policy.module.config.vocab_size
    samples = synthetic_samples(rows, length, vocab)
    base = rss_gb()
    cpu, wall, metrics = [], [], {}
    for step in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = policy.update(samples, step)
        cpu.append(time.process_time() - start_cpu)  # this process only: robust to other jobs' load
        wall.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    micro = len(policy._shards(samples))
    return {"length": length, "budget": budget, "ckpt": ckpt, "micro_batches": micro, "base_gb": base,
            "peak_gb": peak, "cpu_s_per_step": min(cpu), "wall_s_per_step": min(wall),
            "loss": metrics["loss/policy"], "grad_norm": metrics["grad_norm"]}


def child(args) -> int:
    """`--child`: one configuration in a fresh process; prints one JSON line."""
    budget = args.budget if ARMS[args.arms][0] else 0
    print(json.dumps(run_update(args.model_path, int(args.lengths), budget, ARMS[args.arms][1], args.rows,
                                args.steps)))
    return 0


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1e6


def estimated_gb(length: int, arm: str, args) -> float:
    """A rough peak for the skip rule: bytes per token x the padded tokens of the largest micro-batch."""
    on_budget, ckpt, _ = ARMS[arm]
    width = PROMPT_LEN + length
    rows = max(1, min(args.rows, args.budget // width)) if on_budget else args.rows
    return BYTES_PER_TOKEN[ckpt] * rows * width / 1e9 + 0.5


def update_table(model_path: str, lengths: list[int], arms: list[str], args) -> list[dict]:
    rows = []
    print(f"{'L':>6} {'arm':>9} {'micro':>5} {'base GB':>8} {'peak GB':>8} {'cpu s':>8} {'wall s':>8} "
          f"{'loss':>12} {'grad_norm':>10}", flush=True)
    for length in lengths:
        for arm in arms:
            need, free = estimated_gb(length, arm, args), available_gb()
            if f"{arm}@{length}" in args.skip.split(",") or need > free - args.headroom_gb:
                print(f"{length:>6} {arm:>9}  skipped (estimated peak {need:.1f} GB; {free:.1f} GB available)",
                      flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model-path", model_path,
                   "--lengths", str(length), "--arms", arm, "--budget", str(args.budget), "--rows",
                   str(args.rows), "--steps", str(args.steps)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", **ARMS[arm][2]}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{length:>6} {arm:>9}  failed (exit {proc.returncode}): "
                      f"{proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["arm"] = arm
            rows.append(r)
            print(f"{length:>6} {arm:>9} {r['micro_batches']:>5} {r['base_gb']:>8.2f} {r['peak_gb']:>8.2f} "
                  f"{r['cpu_s_per_step']:>8.1f} {r['wall_s_per_step']:>8.1f} {r['loss']:>12.8f} "
                  f"{r['grad_norm']:>10.6f}", flush=True)
    return rows


def rollout_table(model_path: str, contexts: list[int], batch: int, new_tokens: int) -> list[dict]:
    """Decode tokens/s after a C-token prompt (ignore_eos), this process's CPU time."""
    from rl.model_io import load_model
    from rollout import SamplingParams, TorchRolloutWorker

    torch.set_num_threads(1)
    model = load_model(model_path, "--model-path", dtype=torch.float32)
    worker = TorchRolloutWorker(model, eos_token_id=1, pad_token_id=0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    rows, base = [], None
    print(f"{'context':>8} {'prefill s':>10} {'decode tok/s':>13} {'ms/token':>9} {'vs shortest':>12}", flush=True)
    for context in contexts:
        vocab = model.config.vocab_size
        prompts = [[2 + (i * 7 + row) % (vocab - 2) for i in range(context)] for row in range(batch)]
        prefill_only = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, ignore_eos=True)
        start = time.process_time()
        worker.generate(prompts, prefill_only)
        prefill = time.process_time() - start
        start = time.process_time()
        out = worker.generate(prompts, params)
        decode = time.process_time() - start - prefill
        produced = sum(len(c) for c in out.completion_ids) - batch  # the first token comes with the prefill
        if decode <= 0:  # toy sizes: the decode is below the timer's noise
            print(f"{context:>8} {prefill:>10.2f}  (decode below timer noise)", flush=True)
            continue
        ms = 1e3 * decode / max(produced, 1) * batch  # per decode step (one token for every row)
        base = base or ms
        rows.append({"context": context, "prefill_s": prefill, "tokens_per_s": produced / decode,
                     "ms_per_step": ms})
        print(f"{context:>8} {prefill:>10.2f} {produced / decode:>13.1f} {ms:>9.2f} {ms / base:>11.2f}x",
              flush=True)
    return rows


def one_design(model_path: str, tokens: int, design: str) -> dict:
    """`--child-design`: one forward+backward over `tokens` tokens with checkpoints per `design`
    (none | layer: per layer application, what gradient_checkpointing does | loop: one per loop)."""
    from torch.utils.checkpoint import checkpoint

    from looped.hf_compat import enable_activation_checkpointing
    from rl.model_io import load_model

    torch.set_num_threads(1)
    model = load_model(model_path, "--model-path", dtype=torch.float32)
    if design == "layer":
        enable_activation_checkpointing(model)
    model.train(design == "layer")  # transformers checkpoints layers in train mode only
    if design == "loop":  # layer 0 runs the whole stack of its loop inside one checkpoint, the rest pass through
        forwards = [layer.forward for layer in model.model.layers]

        def stack(hidden, **kwargs):
            return checkpoint(lambda h: _run_all(forwards, h, kwargs), hidden, use_reentrant=False)

        model.model.layers[0].forward = stack
        for layer in model.model.layers[1:]:
            layer.forward = lambda hidden, **kwargs: hidden
    ids = torch.randint(2, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=tokens)
    out.logits.float().log_softmax(-1).mean().backward()
    grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024  # bytes
    grad = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None) ** 0.5
    return {"design": design, "kb_per_token": grow / 1e3 / tokens, "grad_norm": grad}


def _run_all(forwards, hidden, kwargs):
    for forward in forwards:
        hidden = forward(hidden, **kwargs)
    return hidden


def design_table(model_path: str, tokens: int) -> list[dict]:
    """Peak growth per token of each checkpoint design, each in a fresh process, default and fixed malloc."""
    rows = []
    print(f"checkpoint design, one forward+backward of 1 x {tokens} tokens (peak RSS growth per token)", flush=True)
    print(f"{'design':>7} {'malloc':>8} {'KB/token':>9} {'grad norm':>14}", flush=True)
    for malloc, env in (("default", {}), ("mmap128k", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        for design in ("none", "layer", "loop"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child-design", design, "--model-path", model_path,
                   "--design-tokens", str(tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **env})
            if proc.returncode != 0:
                print(f"{design:>7} {malloc:>8}  failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = {**json.loads(proc.stdout.strip().splitlines()[-1]), "malloc": malloc}
            rows.append(r)
            print(f"{design:>7} {malloc:>8} {r['kb_per_token']:>9.1f} {r['grad_norm']:>14.9f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "tiny"], help="tiny: smoke test only")
    parser.add_argument("--lengths", default="256,1024,4096,8192", help="completion lengths (comma list)")
    parser.add_argument("--arms", default="plain,budget,ckpt,both", help=f"comma list of {list(ARMS)}")
    parser.add_argument("--budget", type=int, default=8192, help="micro_batch_tokens of the budget arms")
    parser.add_argument("--rows", type=int, default=8, help="samples per step")
    parser.add_argument("--steps", type=int, default=1, help="updates per configuration (min time kept)")
    parser.add_argument("--skip", default="plain@8192,ckpt@8192",
                        help="arm@length pairs not to run (default: the 8,192 arms without a budget, ~37 and "
                             "~17 GB by the per-token peaks)")
    parser.add_argument("--headroom-gb", type=float, default=3.0,
                        help="also skip a configuration whose estimated peak exceeds MemAvailable minus this")
    parser.add_argument("--rollout-contexts", default="256,1024,4096,8192",
                        help="prompt lengths of the rollout part (empty: skip it)")
    parser.add_argument("--rollout-batch", type=int, default=2)
    parser.add_argument("--rollout-new-tokens", type=int, default=32)
    parser.add_argument("--design-tokens", type=int, default=1920,
                        help="tokens of the checkpoint-design comparison (0: skip it)")
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-design", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.child_design:
        print(json.dumps(one_design(args.model_path, args.design_tokens, args.child_design)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "model")
        params = build_model(model_path, args.size)
        print(f"model: {args.size}, {params / 1e6:.2f}M parameters, T = 4, fp32, 1 thread; {args.rows} rows of "
              f"{PROMPT_LEN} prompt + L completion tokens; budget arms: micro_batch_tokens {args.budget}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        lengths = [int(x) for x in args.lengths.split(",") if x]
        report = {"update": update_table(model_path, lengths, args.arms.split(","), args)}
        if args.design_tokens:
            report["designs"] = design_table(model_path, args.design_tokens)
        contexts = [int(x) for x in args.rollout_contexts.split(",") if x]
        if contexts:
            report["rollout"] = rollout_table(model_path, contexts, args.rollout_batch, args.rollout_new_tokens)
    report["load_average_end"] = os.getloadavg()[0]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
