"""Long completions: micro_batch_tokens and gradient_checkpointing bound the update's memory and change
nothing else (same gradients, same loss); ignore_eos samples full-length completions end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from looped import OuroConfig, OuroForCausalLM
from rl.batch import Sample
from rl.config import TrainConfig
from rl.policy import Policy
from rl.self_distill import SelfDistillConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ouro") / "model"
    torch.manual_seed(0)
    OuroForCausalLM(OuroConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, total_ut_steps=3, pad_token_id=0,
                               eos_token_id=1, max_position_embeddings=128)).save_pretrained(path)
    return str(path)


def _samples() -> list[Sample]:
    """12 rows of varied prompt and completion lengths (so the budget cuts them several ways)."""
    rng = random.Random(0)
    rows = []
    for i in range(12):
        p, c = rng.randint(3, 9), rng.choice([1, 4, 9, 17, 30])
        rows.append(Sample(prompt_index=i // 4, prompt_ids=[rng.randint(2, 63) for _ in range(p)],
                           completion_ids=[rng.randint(2, 63) for _ in range(c)],
                           rollout_logprobs=[-4.0] * c, truncated=c == 30, reward=0.0, fn_rewards={},
                           correct=None, text="", advantage=rng.uniform(-1.5, 1.5)))
    return rows


def _update(model_dir: str, **keys):
    """One Policy.update of _samples(); returns (the gradient the optimizer applied, metrics, policy)."""
    cfg = TrainConfig(model=model_dir, depth=3, max_new_tokens=32, torch_threads=1, **keys)
    policy = Policy(cfg, Accelerator(cpu=True), model_dir, use_tis=False, self_distill=SelfDistillConfig(),
                    pad_id=0)
    grads: dict[str, torch.Tensor] = {}
    step = policy._optimizer_step

    def capture(finite, n):
        grads.update({name: p.grad.detach().clone() for name, p in policy.module.named_parameters()
                      if p.grad is not None})  # the exit gate gets none without a gate loss
        return step(finite, n)

    policy._optimizer_step = capture
    metrics = policy.update(_samples(), 0)
    return grads, metrics, policy


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])  # token and sequence normalisers
def test_budget_and_checkpointing_give_the_same_gradients(model_dir, loss_type):
    plain, plain_metrics, policy = _update(model_dir, loss_type=loss_type)
    assert len(policy._shards(_samples())) == 1  # micro_batch_size 256: one micro-batch
    for keys in ({"micro_batch_tokens": 64}, {"gradient_checkpointing": True},
                 {"micro_batch_tokens": 64, "gradient_checkpointing": True}):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            grads, metrics, policy = _update(model_dir, loss_type=loss_type, **keys)
        if "micro_batch_tokens" in keys:
            assert len(policy._shards(_samples())) > 3
        assert grads.keys() == plain.keys()
        for name in plain:
            scale = float(plain[name].abs().max())  # fp32 summation-order noise, relative to the tensor
            assert float((grads[name] - plain[name]).abs().max()) <= 1e-5 * scale + 1e-9, (keys, name)
        for key in ("loss/policy", "grad_norm", "entropy", "mismatch/kl"):
            assert metrics[key] == pytest.approx(plain_metrics[key], rel=1e-5, abs=1e-7), (keys, key)
    assert plain_metrics["loss/policy"] != 0.0 and len(plain) > 10


def test_a_sample_longer_than_the_budget_runs_alone_said_once(model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, policy = _update(model_dir, micro_batch_tokens=20, num_iterations=2)
    said = [w for w in caught if "micro_batch_tokens 20" in str(w.message)]
    assert len(said) == 1 and "longer than the budget" in str(said[0].message)
    plan = policy._shards(_samples())
    assert all(len(c) == 1 for c in plan if sum(len(s.prompt_ids) + len(s.completion_ids) for s in c) > 20)


REWARD_MODULE = '''
def char_codes(prompts, completions, **kw):
    """A reward with variance on full-length random text: (sum of character codes) mod 3."""
    return [float(sum(map(ord, c if isinstance(c, str) else c[0]["content"])) % 3) for c in completions]
'''


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True)
    (out.parent / "lcreward.py").write_text(REWARD_MODULE)
    cmd = [sys.executable, "-m", "rl", "train", "--max_steps", "2", "--eval_every", "0", "--progress", "false",
           "--prompts_per_step", "2", "--num_generations", "4", "--max_new_tokens", "12", "--ignore_eos", "true",
           "--rewards", "lcreward:char_codes",
           "--output_dir", str(out / "run"), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(out.parent), str(REPO)])}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ignore_eos_full_length_job_same_loss_with_budget_and_checkpointing(tmp_path):
    plain = _train(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    bounded = _train(tmp_path / "bounded", "--micro_batch_tokens", "12", "--gradient_checkpointing", "true")
    assert bounded.returncode == 0, bounded.stderr[-2000:]
    assert bounded.stderr.count("longer than the budget") == 1  # every row is over 12 tokens: said once
    a, b = _metrics(tmp_path / "plain"), _metrics(tmp_path / "bounded")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["completion/len_mean"] == rb["completion/len_mean"] == 12  # ignore_eos: full length
        assert ra["completion/truncated_frac"] == 1.0
        assert ra["sampling/groups_kept"] > 0  # an update ran
        for key in ("loss/policy", "grad_norm", "reward/mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key


def test_eval_ignore_eos_runs_every_completion_to_max_new_tokens(tmp_path):
    def run(*extra):
        out = tmp_path / f"eval{len(extra)}.json"
        proc = subprocess.run([sys.executable, "-m", "rl", "eval", "--data", "arith", "--limit", "3", "--depths",
                               "4", "--max_new_tokens", "10", "--no_progress", "--out", str(out), *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(out.read_text())

    stops, full = run(), run("--ignore_eos")
    assert stops["depths"]["4"]["len_mean"] < 10  # the embedded model answers and stops at EOS
    assert full["ignore_eos"] is True and stops["ignore_eos"] is False
    assert full["depths"]["4"]["len_mean"] == 10 and full["depths"]["4"]["truncated_frac"] == 1.0
