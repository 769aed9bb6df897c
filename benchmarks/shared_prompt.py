"""The update's forward + backward with each group's prompt run once (rl/shared_prompt.py) vs the plain one.

One micro-batch of `prompts x group` rows (random tokens, completions of random lengths up to --completion),
collated as the update collates it, on the shipped looped model (depth 4) and on a small standard Qwen2
(depth 1). Each repeat runs both forms on the same batch, alternating which goes first; the table reports
the median ms per forward + backward, the ratio plain / shared (the speedup), and the largest |Δ logprob|
between the two forms on the trained tokens.

    python benchmarks/shared_prompt.py [--cases 7:4,7:32,128:32] [--prompts 8] [--group 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# benchmarks/rollout.py would shadow the `rollout` package: the installed packages must win
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def models() -> dict:
    """name -> (model, forward kwargs): the shipped looped model and a standard LM of similar size."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.data import EMBEDDED_MODEL
    from rl.model_io import load_model

    looped = load_model(EMBEDDED_MODEL, "benchmark").eval()
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=looped.config.vocab_size, hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=1024)).eval()
    return {"tiny-ouro (T=4)": (looped, {"depth": 4}), "qwen2 2.4M": (qwen, {})}


def batch(prompts: int, group: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> dict:
    from rl.batch import Sample, collate

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(group):
            n = int(torch.randint(max(1, completion_len // 2), completion_len + 1, (1,), generator=g))
            rows.append(Sample(0, prompt, torch.randint(3, vocab, (n,), generator=g).tolist(), [0.0] * n, False,
                               0.0, {}, None, ""))
    return collate(rows, 0, mask_truncated=False)


def step(model, b: dict, kwargs: dict, shared: bool) -> tuple[float, torch.Tensor]:
    """One forward + backward of the summed trained-token logprobs; (seconds, logprobs)."""
    from rl.losses import token_logprobs
    from rl.shared_prompt import distinct_prompts, update_forward

    ids, attn, p_len = b["input_ids"], b["attention_mask"], b["prompt_len"]
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    rows = distinct_prompts(ids, attn, p_len) if shared else None
    out = update_forward(model, ids, attn, p_len, rows, **kwargs)
    logp, _ = token_logprobs(out.logits[:, :-1], ids[:, p_len:], 1.0)
    (logp * b["completion_mask"]).sum().backward()
    return time.perf_counter() - t0, logp.detach()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="7:4,7:32,128:32",
                   help="prompt_len:max_completion_len pairs (7:4 is the default job's shape: its completions "
                        "average ~3.6 tokens)")
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts in the micro-batch")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]

    print(f"{args.prompts} prompts x {args.group} completions per micro-batch, fp32, {args.threads} thread(s), "
          f"median of {args.repeats} repeats (both forms each repeat, alternating order)")
    print("| model | prompt | completion <= | plain ms | shared ms | speedup | max abs dlogp |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, kwargs) in models().items():
        for prompt_len, completion_len in cases:
            b = batch(args.prompts, args.group, prompt_len, completion_len, model.config.vocab_size, seed=0)
            times: dict[bool, list[float]] = {False: [], True: []}
            step(model, b, kwargs, False)  # warm-up
            for rep in range(args.repeats):
                for shared in ((False, True) if rep % 2 == 0 else (True, False)):
                    times[shared].append(step(model, b, kwargs, shared)[0])
            _, plain_lp = step(model, b, kwargs, False)
            _, shared_lp = step(model, b, kwargs, True)
            gap = float((plain_lp - shared_lp).abs()[b["completion_mask"] > 0].max())
            plain_ms, shared_ms = (1000 * statistics.median(times[s]) for s in (False, True))
            print(f"| {name} | {prompt_len} | {completion_len} | {plain_ms:.1f} | {shared_ms:.1f} | "
                  f"{plain_ms / shared_ms:.2f}x | {gap:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
