"""Rollout/update logprob mismatch of a LoRA-adapted looped model, by loop depth and dtype.

For each dtype (rollout and update in the same dtype) and depth t = 1..T: the torch rollout worker
(fused decode step, adapter included) samples n completions of one prompt at depth t, then the
model's own forward scores them at depth t (fp32 log-softmax, as the trainer does); the table gives
max and mean |logp_rollout - logp_update| over the sampled tokens. The adapter's B factors are set
random (a fresh adapter is zero), so its delta takes part in every loop.

    python benchmarks/lora_mismatch.py                                   # the embedded model
    python benchmarks/lora_mismatch.py --ouro-1.4b --n 2 --new 8 --dtypes float32   # Ouro-1.4B's config, random
                                                                      # weights; one dtype per process
    python benchmarks/lora_mismatch.py --ouro-1.4b --n 2 --new 8 --dtypes float32 --depths 4   # one cell

Results: docs/EXPERIMENTS.md ("LoRA vs full fine-tuning").
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(args):
    from transformers import AutoModelForCausalLM

    import looped  # noqa: F401
    from looped import OuroConfig, OuroForCausalLM

    torch.manual_seed(0)  # the random weights and the adapter's A factors (peft draws them): same every run
    if args.ouro_1_4b:  # OuroConfig()'s defaults are Ouro-1.4B's architecture
        config = OuroConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if args.num_layers:
            config.num_hidden_layers = args.num_layers
        return OuroForCausalLM(config).eval()
    return AutoModelForCausalLM.from_pretrained(ROOT / "rl" / "assets" / "tiny-ouro").eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ouro-1.4b", dest="ouro_1_4b", action="store_true")
    parser.add_argument("--num-layers", type=int, default=0, help="override num_hidden_layers (1.4B: 24)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random adapter B factors")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--n", type=int, default=8, help="completions sampled per (dtype, depth)")
    parser.add_argument("--new", type=int, default=16, help="max new tokens")
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--depths", default="", help="comma list of depths to measure (default 1..T); each "
                                                     "depth's cell is the same whichever others run")
    args = parser.parse_args(argv)

    from rl.config import TrainConfig
    from rl.lora import apply_lora
    from rl.losses import token_logprobs
    from rollout import SamplingParams
    from rollout.torch_worker import TorchRolloutWorker

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model = build(args)
    apply_lora(model, TrainConfig(lora_rank=args.rank))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * args.b_std)
    depth_max = model.config.total_ut_steps
    depths = [int(d) for d in args.depths.split(",")] if args.depths else list(range(1, depth_max + 1))
    if not all(1 <= d <= depth_max for d in depths):
        parser.error(f"--depths {args.depths}: each must be in 1..{depth_max}")
    vocab = model.config.vocab_size
    prompt = [int(t) for t in torch.randint(3, min(vocab, 100), (args.prompt_len,), generator=gen)]
    print(f"model built + adapter in {time.perf_counter() - t0:.1f} s; T = {depth_max}, rank {args.rank}, "
          f"B std {args.b_std}, n {args.n}, {args.new} new tokens")
    print("| dtype | depth | max abs diff | mean abs diff | s |")
    print("|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        # one dtype per process (--dtypes bfloat16) converts in place: no second copy of a large model
        m = model if dtype == torch.float32 else (model.to(dtype) if len(args.dtypes.split(",")) == 1
                                                  else copy.deepcopy(model).to(dtype))
        for depth in depths:
            t1 = time.perf_counter()
            worker = TorchRolloutWorker(m, depth=depth, eos_token_id=[], pad_token_id=0)
            ro = worker.generate([prompt], SamplingParams(n=args.n, max_new_tokens=args.new, temperature=1.0, seed=depth))
            ids = torch.tensor([prompt + c for c in ro.completion_ids])
            with torch.no_grad():
                logits = m(input_ids=ids, depth=depth, use_cache=False).logits[:, len(prompt) - 1:-1]
            logp, _ = token_logprobs(logits, ids[:, len(prompt):], 1.0)
            diff = (logp.double() - torch.tensor(ro.logprobs, dtype=torch.float64)).abs()
            print(f"| {dtype_name} | {depth} | {diff.max():.3g} | {diff.mean():.3g} | {time.perf_counter() - t1:.1f} |",
                  flush=True)
        if m is not model:
            del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
