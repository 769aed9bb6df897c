"""Forward throughput of the Ouro looped model at depth 1..T.

Why: a looped model's cost should grow linearly with the number of loops (the same layers run
again); embeddings and the lm_head are paid once. This prints tokens/s per depth and the time
ratio vs depth 1 measured in the same process (ideal: ratio == depth, minus the fixed head cost).

    python benchmarks/model_forward.py                 # small + medium, CPU, depths 1..4
    python benchmarks/model_forward.py --device cuda --dtype bfloat16 --configs medium,ouro-1.4b
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from looped import OuroConfig, OuroForCausalLM

CONFIGS = {
    # name: (config kwargs, batch, seq_len)
    "tiny": (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=100), 2, 32),  # the embedded model's shape (smoke test)
    "small": (dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=2048), 2, 128),
    "medium": (dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=8192), 2, 128),
    "ouro-1.4b": (dict(), 4, 1024),  # real Ouro-1.4B shape, random weights (GPU only)
}


def time_forward(model: OuroForCausalLM, ids: torch.Tensor, depth: int, repeats: int) -> float:
    """Median seconds per no-grad forward (no cache, like scoring)."""
    def sync():
        if ids.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        model(ids, depth=depth)  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, depth=depth)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,medium", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--max-depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable numbers on a shared machine; 0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    header = f"{'config':<10} {'params':>8} {'B x S':>9} {'depth':>5} {'ms/fwd':>9} {'tok/s':>9} {'time ratio':>10} {'ms/extra loop':>13}"
    print(header)
    print("-" * len(header))
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"--configs: unknown config {name!r}; choose from {sorted(CONFIGS)}")
        kwargs, batch, seq = CONFIGS[name]
        torch.manual_seed(0)
        config = OuroConfig(total_ut_steps=args.max_depth, **kwargs)
        model = OuroForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=args.device)
        base = None
        for depth in range(1, args.max_depth + 1):
            seconds = time_forward(model, ids, depth, args.repeats)
            base = base or seconds
            # constant marginal cost per extra loop == cost linear in depth (embed + lm_head are paid once)
            marginal = f"{(seconds - base) * 1e3 / (depth - 1):>13.1f}" if depth > 1 else f"{'-':>13}"
            print(f"{name:<10} {params / 1e6:>7.1f}M {batch:>3} x {seq:<4} {depth:>5} {seconds * 1e3:>9.1f} "
                  f"{batch * seq / seconds:>9.0f} {seconds / base:>10.2f} {marginal}")
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
