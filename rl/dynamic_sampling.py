"""DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts until full.

A group where every completion got the same reward has zero advantage everywhere: it costs a
forward/backward and contributes nothing but dilution of the token-level normaliser. DAPO keeps
sampling new prompts until `target` informative groups are collected or `max_rounds` rounds ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rl.advantages import zero_std_groups


@dataclass
class Group:
    """One prompt and its n completions, scored. `data` carries whatever the trainer needs later."""

    rewards: list[float]
    data: Any = None
    skipped: bool = False  # reward_on_error: skip_group dropped it (a reward function failed on a sample)
    version: int = 0  # the policy version (updates done) that sampled it: asynchronous rollouts' staleness


@dataclass
class SamplingResult:
    kept: list[Group]
    rounds: int
    groups_sampled: int
    zero_std_first_round: float  # fraction of zero-std groups in round 1 (comparable with/without DS)
    zero_std_all: float  # fraction over every scored (not skipped) group sampled this step
    all_groups: list[Group] = field(default_factory=list)  # every group sampled (for reward metrics)
    groups_skipped: int = 0  # sampled but dropped by reward_on_error: skip_group (never kept)


def collect_groups(sample_round: Callable[[int, int], list[Group]], target: int, *, enabled: bool,
                   max_rounds: int) -> SamplingResult:
    """Call `sample_round(round_index, num_prompts)` until `target` groups with reward variance are kept.

    Without dynamic sampling (`enabled=False`) one round of `target` prompts is returned as is.
    Later rounds ask for the deficit divided by the keep rate seen so far (at least the deficit),
    so a task where half the groups are informative needs about one refill, not log2(target).
    Surplus groups beyond `target` are dropped, in sampling order. Skipped groups (`Group.skipped`) count as
    sampled, are never kept and are left out of the zero-std fractions (they have no rewards to compare).
    """
    all_groups: list[Group] = []
    kept: list[Group] = []
    first_zero = 0.0
    rounds = 0
    want = target
    while True:
        groups = sample_round(rounds, want)
        rounds += 1
        all_groups.extend(groups)
        if not groups:
            break
        scored = [g for g in groups if not g.skipped]
        zero = _zero_std(scored)
        if rounds == 1:
            first_zero = sum(zero) / len(scored) if scored else 0.0
        if not enabled:
            kept = scored
            break
        kept.extend(g for g, z in zip(scored, zero) if not z)
        deficit = target - len(kept)
        if deficit <= 0 or rounds >= max_rounds:
            break
        keep_rate = max(len(kept), 1) / len(all_groups)
        want = max(deficit, math.ceil(deficit / keep_rate))
        want = min(want, 4 * target)  # cap one round's cost
    zero_all = _zero_std([g for g in all_groups if not g.skipped])
    return SamplingResult(
        kept=kept[:target],
        rounds=rounds,
        groups_sampled=len(all_groups),
        zero_std_first_round=first_zero,
        zero_std_all=sum(zero_all) / len(zero_all) if zero_all else 0.0,
        all_groups=all_groups,
        groups_skipped=sum(g.skipped for g in all_groups),
    )


def _zero_std(groups: list[Group]) -> list[bool]:
    """Per group: are all its rewards equal?"""
    if not groups:
        return []
    return zero_std_groups(torch.tensor([r for g in groups for r in g.rewards]), len(groups[0].rewards)).tolist()
