"""Full-size rehearsal of the vLLM engine on CPU: Ouro-1.4B's exact architecture, random weights.

Why: the vLLM lane's tests use a tiny model; this checks that a checkpoint of the real size and
layout (1,434,652,673 parameters, 24 layers x 4 loops, 16 heads x 128) goes through our vLLM model
and through one `looprl train --config configs/ouro-1.4b-dapo17k.yaml` step on a CPU machine, and
records what it costs: engine load time, weight-sync time for 1.43B parameters, peak memory (RSS)
and time per generated token. Not run in CI (minutes, and ~15 GB of RAM). Run it in the vLLM venv:

    tools/vllm_cpu_env.sh python benchmarks/vllm_cpu_rehearsal.py --work /tmp/rehearsal

Phases (each in its own process, so each peak RSS is its own):
  checkpoint  random bf16 weights with OuroConfig()'s defaults (= Ouro-1.4B), saved with a
              49,152-entry word-level tokenizer (the real one is not reachable offline);
  engine      VLLMRolloutWorker at depth 4 in bf16: load, generate, sync_weights from a bf16 model;
  train       one `looprl train --config configs/ouro-1.4b-dapo17k.yaml` step, tiny lengths and batch,
              on the `arith` prompts with a reward that varies on random text, and `--dtype bfloat16`
              (the job's fp32 master weights + AdamW need ~23 GB, more than this machine has).
Results go to <work>/rehearsal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # not benchmarks/: its rollout.py would shadow the rollout package
OURO_14B_PARAMS = 1_434_652_673
REWARD_MODULE = '''
def digit_sum(prompts, completions, **kw):
    """Varies on random text, so a group's rewards differ and the step runs an update."""
    text = lambda c: c if isinstance(c, str) else c[0]["content"]
    return [float(sum(map(ord, text(c))) % 3) for c in completions]

def is_zero(prompts, completions, **kw):
    """A 1 / 0 accuracy function (rl/accuracy.py refuses other values)."""
    return [float(r == 0) for r in digit_sum(prompts, completions)]
'''


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def make_checkpoint(path: Path, device: str = "cpu", small: bool = False) -> dict:
    """Random bf16 weights with Ouro-1.4B's config, built on `device`; `small`: 2 layers x hidden 64 (same
    vocab, heads layout and loops), a stand-in for checking a script, not for measuring."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from looped import OuroConfig, OuroForCausalLM

    start = time.perf_counter()
    chars = ["<pad>", "<bos>", "<eos>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    shrink = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=16) if small else {}
    config = OuroConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **shrink)  # the defaults are Ouro-1.4B
    filler = [f"<t{i}>" for i in range(config.vocab_size - len(chars))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(chars + filler)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char, one token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}",
        padding_side="left")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = OuroForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = model.num_parameters()
    if params != OURO_14B_PARAMS and not small:
        raise SystemExit(f"rehearsal: built {params:,} parameters, expected Ouro-1.4B's {OURO_14B_PARAMS:,}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"parameters": params, "build_and_save_s": time.perf_counter() - start,
            "checkpoint_gib": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30,
            "peak_rss_gib": peak_rss_gib()}


def engine_phase(path: Path, eager: bool) -> dict:
    import torch

    from looped import OuroForCausalLM
    from rollout import SamplingParams
    from rollout.vllm_worker import VLLMRolloutWorker

    out: dict = {"enforce_eager": eager}
    start = time.perf_counter()
    worker = VLLMRolloutWorker(str(path), 4, dtype="bfloat16", max_model_len=256, enforce_eager=eager, seed=0,
                               eos_token_id=2)
    out["engine_load_s"] = time.perf_counter() - start
    out["rss_after_load_gib"] = peak_rss_gib()

    def timed(prompts, new_tokens):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, stop_token_ids=[])
        start = time.perf_counter()
        rollout = worker.generate(prompts, params)
        assert all(len(c) == new_tokens for c in rollout.completion_ids)
        return time.perf_counter() - start

    for batch in (1, 4):
        prompts = [[5 + i + j for j in range(32)] for i in range(batch)]  # 32-token prompts
        timed(prompts, 2)  # warm-up
        prefill = timed(prompts, 1)
        full = timed(prompts, 17)
        out[f"batch{batch}_prefill_32_tokens_s"] = prefill
        out[f"batch{batch}_decode_s_per_step"] = (full - prefill) / 16  # one new token per sequence per step
        out[f"batch{batch}_decode_tokens_per_s"] = batch * 16 / (full - prefill)

    policy = OuroForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    syncs = []
    for _ in range(2):
        start = time.perf_counter()
        worker.sync_weights(policy)
        syncs.append(time.perf_counter() - start)
    out["sync_weights_s"] = syncs
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=[])
    out["greedy_after_sync"] = worker.generate([[5, 6, 7, 8]], greedy).completion_ids[0]
    out["peak_rss_gib"] = peak_rss_gib()
    worker.close()
    return out


def train_phase(path: Path, work: Path) -> dict:
    (work / "rehearsalreward.py").write_text(REWARD_MODULE)
    out_dir = work / "train"
    cmd = [sys.executable, "-m", "rl", "train", "--config", str(REPO / "configs/ouro-1.4b-dapo17k.yaml"),
           "--model", str(path), "--dtype", "bfloat16", "--special_tokens", "{}", "--prompt_suffix", "",
           "--data", "arith", "--data_limit", "16", "--rewards", "rehearsalreward:digit_sum",
           "--accuracy_reward", "rehearsalreward:is_zero", "--overlong_buffer_len", "0", "--mask_truncated", "false",
           "--max_steps", "1", "--prompts_per_step", "1", "--num_generations", "2", "--max_new_tokens", "8",
           "--max_prompt_length", "64", "--vllm_max_model_len", "128", "--mini_batch_size", "2",
           "--micro_batch_size", "2", "--dynamic_sampling", "false", "--eval_every", "0", "--save_every", "0",
           "--report_to", "none", "--progress", "false", "--overwrite", "true", "--output_dir", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = {"returncode": res.returncode, "wall_s": time.perf_counter() - start,
           "peak_rss_gib": peak_rss_gib(resource.RUSAGE_CHILDREN)}
    (work / "train.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        out["stderr_tail"] = res.stderr[-2000:]
        return out
    row = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    out["metrics"] = {k: v for k, v in row.items() if k.startswith(("time/", "mismatch/", "completion/", "loss/"))}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/looprl-rehearsal", help="checkpoint, logs and results go here")
    p.add_argument("--phase", choices=["all", "checkpoint", "engine", "train"], default="all")
    p.add_argument("--compile", action="store_true", help="engine phase: let vLLM compile (default eager)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ouro-1.4b-random"
    results_path = work / "rehearsal.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.phase == "checkpoint":
        results["checkpoint"] = make_checkpoint(ckpt)
    elif args.phase == "engine":
        results["engine"] = engine_phase(ckpt, eager=not args.compile)
    elif args.phase == "train":
        results["train"] = train_phase(ckpt, work)
    else:  # each phase in a fresh process, so each peak RSS is its own
        for phase in ("checkpoint", "engine", "train"):
            if phase == "checkpoint" and (ckpt / "config.json").is_file():
                continue
            extra = ["--compile"] if args.compile and phase == "engine" else []
            subprocess.run([sys.executable, __file__, "--work", str(work), "--phase", phase, *extra], check=True)
        print(results_path.read_text())
        return 0
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({args.phase: results[args.phase]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
