"""Advantage estimators, as a registry (`@register_advantage("name")`, config key `advantage_estimator`).

One signature: rewards [N] in prompt-major order (N = groups * group_size), the group size and the config
key `scale_rewards` -> advantages [N], one per completion (broadcast over its tokens by the loss).
The built-in "grpo" is group-relative: each completion's reward minus its group's mean, optionally scaled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

ZERO_STD_TOL = 1e-6  # a group whose rewards span less than this is "all equal" (fp32 noise is not signal)


class AdvantageFn(Protocol):
    def __call__(self, rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor: ...


ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an estimator under `name` (the value of config key `advantage_estimator`)."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def get_advantage(name: str) -> AdvantageFn:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"config key 'advantage_estimator': unknown estimator {name!r} "
                         f"(registered: {', '.join(ADVANTAGES)})") from None


@register_advantage("grpo")
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [N] in prompt-major order (N = groups * group_size) -> advantages [N].

    scale_rewards: "group" divides by each group's std (GRPO), "batch" by the std of the whole batch
    (more robust for small groups), "none" keeps the raw centred rewards (Dr. GRPO).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else torch.zeros(())
        centred = centred / (std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"config key 'scale_rewards': unknown value {scale_rewards!r}")
    return centred.view(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [groups]: True where every reward of the group is equal (no learning signal)."""
    grouped = rewards.float().view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) <= ZERO_STD_TOL
