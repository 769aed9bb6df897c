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


def test_looprl_rewards_plug_into_trl_grpo_trainer() -> None:
    """Our functions through TRL's own GRPOTrainer._calculate_rewards (a stand-in trainer object)."""
    torch = pytest.importorskip("torch")
    from trl import GRPOTrainer

    funcs = [rewards.get("dapo_math"), rewards.get("format"),
             rewards.get("overlong_penalty", max_completion_length=8, buffer_len=4)]
    from trl.trainer.utils import get_callable_name

    names = [get_callable_name(f) for f in funcs]
    assert names == ["dapo_math", "format_reward", "overlong_penalty"]
    metrics: dict[str, list[float]] = {}
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]), state=SimpleNamespace(global_step=0),
        reward_funcs=funcs, reward_processing_classes=[None] * 3, reward_func_names=names, environments=None,
        _log_completion_extra=lambda *a: None, _log_metric=lambda k, v: metrics.setdefault(k, []).append(v))
    prompts = [[{"role": "user", "content": "What is 2+3?"}]] * 2
    completions = [[{"role": "assistant", "content": "Answer: 5"}], [{"role": "assistant", "content": "Answer: 6"}]]
    inputs = [{"prompt": p, "ground_truth": "5"} for p in prompts]
    ids = [[0] * 7, [0] * 3]
    out = GRPOTrainer._calculate_rewards(fake, inputs, prompts, completions, ids)
    assert out.tolist() == [[1.0, 1.0, -0.75], [-1.0, 1.0, 0.0]]
    assert metrics["rewards/timeouts"] == [0.0]




def test_our_rewards_accept_everything_trl_passes() -> None:
    """TRL's GRPOTrainer adds trainer_state / log_extra / log_metric keywords; ours must take them."""
    extra: dict[str, list] = {}
    scores = rewards.get("math_accuracy")(
        prompts=["q"], completions=["Answer: 3"], completion_ids=[[1]], ground_truth=["3"],
        trainer_state=SimpleNamespace(global_step=3), log_extra=extra.__setitem__, log_metric=lambda k, v: None)
    assert scores == [1.0]
    assert extra == {"extracted_answer": ["3"]}
