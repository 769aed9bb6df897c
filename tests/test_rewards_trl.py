"""TRL interop: TRL's reward functions plug into looprl's convention, and ours into TRL's GRPOTrainer.

Separate file because importing TRL's trainer takes seconds.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import rewards


def test_trl_accuracy_reward_plugs_into_looprl() -> None:
    """TRL's own reward function, by import path, called the way our trainer calls rewards."""
    fn = rewards.get("trl.rewards:accuracy_reward")
    chats = [[{"role": "assistant", "content": "so \\boxed{\\frac{1}{3}}"}],
             [{"role": "assistant", "content": "so \\boxed{\\frac{1}{2}}"}]]
    scores = rewards.call(fn, [[{"role": "user", "content": "q"}]] * 2, chats, ground_truth=["\\frac{1}{3}"] * 2,
                          completion_ids=[[1, 2], [3]], max_completion_length=16, truncated=[False, False])
    assert scores == [1.0, 0.0]


def test_looprl_rewards_plug_into_trl_grpo_trainer(tmp_path) -> None:
    """Our functions through TRL's own GRPOTrainer._calculate_rewards, on a real trainer (tiny Qwen2)."""
    pytest.importorskip("torch")
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import get_callable_name

    from rl.make_tiny import build_tokenizer

    funcs = [rewards.get("dapo_math"), rewards.get("format"),
             rewards.get("overlong_penalty", max_completion_length=8, buffer_len=4)]
    assert [get_callable_name(f) for f in funcs] == ["dapo_math", "format_reward", "overlong_penalty"]
    tokenizer = build_tokenizer()
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [[{"role": "user", "content": "What is 2+3?"}]] * 2
    inputs = [{"prompt": p, "ground_truth": "5"} for p in prompts]
    trainer = GRPOTrainer(
        model=str(tmp_path), reward_funcs=funcs, processing_class=tokenizer, train_dataset=Dataset.from_list(inputs),
        args=GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", bf16=False,
                        per_device_train_batch_size=2, num_generations=2, max_completion_length=8))
    completions = [[{"role": "assistant", "content": "Answer: 5"}], [{"role": "assistant", "content": "Answer: 6"}]]
    out = trainer._calculate_rewards(inputs, prompts, completions, [[0] * 7, [0] * 3])
    assert out.tolist() == [[1.0, 1.0, -0.75], [-1.0, 1.0, 0.0]]
    assert trainer._pending_metrics["rewards/timeouts"] == [0.0]  # our log_metric calls reach TRL's log


def test_our_rewards_accept_everything_trl_passes() -> None:
    """TRL's GRPOTrainer adds trainer_state / log_extra / log_metric keywords; ours must take them."""
    extra: dict[str, list] = {}
    scores = rewards.get("math_accuracy")(
        prompts=["q"], completions=["Answer: 3"], completion_ids=[[1]], ground_truth=["3"],
        trainer_state=SimpleNamespace(global_step=3), log_extra=extra.__setitem__, log_metric=lambda k, v: None)
    assert scores == [1.0]
    assert extra == {"extracted_answer": ["3"]}
