"""Self-speculative vs plain fixed-depth decoding: tokens/s of TorchRolloutWorker, same model, same process.

    python benchmarks/speculative.py                                   # tiny + large, defaults below
    python benchmarks/speculative.py --models tiny,distilled,large --distilled runs/sd/final --repeats 5

Models: `tiny` = the shipped rl/assets/tiny-ouro (trained on arith, T=4); `distilled` = a checkpoint
after `looprl train --self_distill_coef 1.0 ...` (--distilled DIR); `large` = a random-init Ouro
(h512, 6 layers, vocab 2048, T=4) where matmul FLOPs dominate a batch-64 step on CPU.
Workloads: `decode` = no stop tokens, --max_new tokens per row (steady-state decoding); `rl` = stop at
EOS, 16 new tokens (the default `looprl train` job; tiny/distilled only, arith prompts).
Batch b = max(1, b // 8) prompts x min(b, 8) samples (1 = 1x1, 8 = 1x8, 64 = 8x8), temperature 1.
Engines: `plain` (depth-T decoding) and `dDkK` (draft depth D, K drafted tokens per verification).
Every configuration runs --repeats times, interleaved (plain, d1k2, ..., plain, d1k2, ...), and the
MEDIAN is reported, because the machine is shared and single runs are noisy. `speedup` = median over
repeats of (spec tok/s / plain tok/s of the same repeat). `accept` = accepted / drafted tokens;
`tok/verify` = tokens emitted per row per verification pass (= 1 + K * accept).
Break-even: a round emits tok/verify tokens and costs c plain steps, so speculative wins iff
tok/verify > c; with c = tok/verify / speedup measured here, the break-even accept rate is (c - 1) / K.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this file's folder is sys.path[0]; keep "rollout" resolving to the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


@dataclass
class Run:
    model: str
    workload: str
    batch: int
    engine: str
    tokens: list[int]
    wall: list[float]
    cpu: list[float]
    accept: list[float]
    per_verify: list[float]


def load_models(names: list[str], distilled: str | None) -> dict[str, tuple[torch.nn.Module, object]]:
    """name -> (model, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looped import OuroConfig, OuroForCausalLM  # also registers the Ouro architecture with transformers
    from rl.data import EMBEDDED_MODEL

    models = {}
    for name in names:
        if name in ("tiny", "distilled"):
            path = str(EMBEDDED_MODEL) if name == "tiny" else distilled
            if not path:
                raise SystemExit("--models distilled needs --distilled DIR (a looprl train output's final/)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            models[name] = (model, AutoTokenizer.from_pretrained(path))
        elif name == "large":
            torch.manual_seed(0)
            config = OuroConfig(
                vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=8, total_ut_steps=4, max_position_embeddings=1024,
                pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.02,
            )
            models[name] = (OuroForCausalLM(config).eval(), None)
        else:
            raise SystemExit(f"unknown model {name!r} (tiny, distilled, large)")
    return models


def make_prompts(tokenizer, vocab: int, batch: int) -> tuple[list[list[int]], int]:
    """(prompts, n): arith prompts through the chat template for trained models, random ids otherwise."""
    num_prompts, n = max(1, batch // 8), min(batch, 8)
    if tokenizer is not None:
        from rl.data import load_prompts
        from rl.prompts import encode_prompts

        data = load_prompts("arith", split="test", limit=num_prompts)
        return encode_prompts(tokenizer, list(data["prompt"])), n
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(16, 33, (num_prompts,), generator=g)
    return [torch.randint(4, vocab, (int(m),), generator=g).tolist() for m in lens], n


def run_once(worker, prompts, params) -> tuple[int, float, float, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = worker.generate(prompts, params)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return out.num_completion_tokens, wall, cpu, out.stats.get("accept_rate", float("nan")), \
        out.stats.get("tokens_per_verify", 1.0)


def bench(args) -> list[Run]:
    from rollout import SamplingParams, SpecConfig, TorchRolloutWorker

    specs = [tuple(int(x) for x in s.split(":")) for s in args.specs.split(",") if s]
    engines = [("plain", None)] + [(f"d{d}k{k}", SpecConfig(d, k)) for d, k in specs]
    runs: list[Run] = []
    for name, (model, tokenizer) in load_models(args.models.split(","), args.distilled).items():
        worker = TorchRolloutWorker(model)
        eos = worker.eos_token_ids
        workloads = [("decode", [], args.max_new)]
        if tokenizer is not None and eos:
            workloads.append(("rl", None, 16))
        for workload, stops, max_new in workloads:
            for batch in [int(b) for b in args.batches.split(",")]:
                prompts, n = make_prompts(tokenizer, model.config.vocab_size, batch)
                table = {label: Run(name, workload, batch, label, [], [], [], [], []) for label, _ in engines}
                worker.generate(prompts, SamplingParams(n=n, max_new_tokens=4, seed=0))  # warm-up
                for repeat in range(args.repeats):
                    for label, spec in engines:
                        params = SamplingParams(n=n, max_new_tokens=max_new, temperature=1.0, seed=repeat,
                                                stop_token_ids=stops, speculative=spec)
                        tokens, wall, cpu, accept, per_verify = run_once(worker, prompts, params)
                        r = table[label]
                        r.tokens.append(tokens)
                        r.wall.append(wall)
                        r.cpu.append(cpu)
                        r.accept.append(accept)
                        r.per_verify.append(per_verify)
                runs += table.values()
                print(f"# done {name} {workload} batch {batch}", file=sys.stderr, flush=True)
    return runs


def report(runs: list[Run], args) -> str:
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), fp32, "
        f"repeats {args.repeats} (median), load average at end {os.getloadavg()[0]:.1f}",
        "",
        "| model | workload | batch | engine | tokens | tok/s (wall) | tok/s (CPU) | accept | tok/verify "
        "| speedup (wall) | speedup (CPU) | break-even accept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(r.model, r.workload, r.batch): r for r in runs if r.engine == "plain"}
    for r in runs:
        base = plain[(r.model, r.workload, r.batch)]
        wall_rates = [t / w for t, w in zip(r.tokens, r.wall)]
        cpu_rates = [t / c for t, c in zip(r.tokens, r.cpu)]
        cells = [r.model, r.workload, str(r.batch), r.engine, str(int(statistics.median(r.tokens))),
                 f"{statistics.median(wall_rates):.0f}", f"{statistics.median(cpu_rates):.0f}"]
        if r.engine == "plain":
            cells += ["-", "1.00", "1.00x", "1.00x", "-"]
        else:
            base_wall = [t / w for t, w in zip(base.tokens, base.wall)]
            base_cpu = [t / c for t, c in zip(base.tokens, base.cpu)]
            speed = statistics.median(a / b for a, b in zip(wall_rates, base_wall))
            speed_cpu = statistics.median(a / b for a, b in zip(cpu_rates, base_cpu))
            per_verify = statistics.median(r.per_verify)
            k = int(r.engine.split("k")[1])
            cost = per_verify / speed_cpu  # plain steps per speculative round (CPU time: less noisy)
            breakeven = (cost - 1) / k
            cells += [f"{statistics.median(r.accept):.2f}", f"{per_verify:.2f}", f"{speed:.2f}x",
                      f"{speed_cpu:.2f}x", f"{breakeven:.2f}" if breakeven <= 1 else f">1 ({breakeven:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matmul_scaling(hidden: int = 512, out: int = 3072, rows=(1, 3, 5, 9, 64), seconds: float = 0.3) -> str:
    """Time of one [M, hidden] x [hidden, out] linear (the large model's fused q|k|v) vs M. A verification
    pass multiplies M by k+1; it is cheap only where this time barely grows with M (memory/overhead bound)."""
    weight = torch.randn(out, hidden)
    cells = []
    for m in rows:
        x = torch.randn(m, hidden)
        for _ in range(5):
            torch.nn.functional.linear(x, weight)
        iters, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            torch.nn.functional.linear(x, weight)
            iters += 1
        cells.append(f"M={m}: {(time.process_time() - start) / iters * 1e6:.0f} us")
    return f"linear [M, {hidden}] x [{hidden}, {out}] CPU time: " + ", ".join(cells)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,large", help="comma list of tiny, distilled, large")
    p.add_argument("--distilled", default=None, help="model dir after a self-distillation run")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--specs", default="1:2,1:4,2:2,2:4", help="draft_depth:num_draft pairs")
    p.add_argument("--max_new", type=int, default=48, help="new tokens per row in the decode workload")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = report(bench(args), args) + "\n\n" + matmul_scaling()
    print(text)
    return text


if __name__ == "__main__":
    main()
