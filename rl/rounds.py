"""One rollout round of a step: the prompts' completions sampled, decoded, scored and cut into groups.

The one code path for the synchronous trainer (`Trainer._sample_and_score`) and the asynchronous
producer (rl/async_rollout.py), so both take the same prompts, sample with the same seeds, score the
same way and agree over processes the same way (the caller says how its processes reduce and gather).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewards.guard import RewardFunctionError
from rl.batch import Sample
from rl.config import TrainConfig
from rl.dynamic_sampling import Group
from rollout import SamplingParams
from rollout.speculative import accumulate_stats, spec_config


def step_seed(seed: int, step: int, round_: int, rank: int) -> int:
    """The rollout seed of one (step, dynamic-sampling round, process)."""
    return (seed * 1_000_003 + step * 10_007 + round_ * 101 + rank) % (2**31 - 1)


def sampling_params(cfg: TrainConfig, depth: int, step: int, round_: int, rank: int) -> SamplingParams:
    """What one round samples: the config's sampling keys and the (step, round, process) seed."""
    return SamplingParams(n=cfg.num_generations, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, ignore_eos=cfg.ignore_eos,
                          seed=step_seed(cfg.seed, step, round_, rank),
                          speculative=spec_config(cfg.rollout_draft_depth, cfg.rollout_num_draft, depth),
                          exit_rule=cfg.exit_rule())


def generate_and_score(worker, scorer, tokenizer, dataset, prompt_ids, indices: list[int], params: SamplingParams,
                       timers: dict[str, float]) -> list[Sample]:
    """Sample `params.n` completions of each prompt of `indices`, decode and score them (prompt-major).

    Adds the rollout and reward seconds to `timers` (and speculative decoding's counts); raises what
    `Scorer.score` raises (RewardFunctionError, RewardInterrupted)."""
    t0 = time.perf_counter()
    rollout = worker.generate([prompt_ids(i) for i in indices], params)
    t1 = time.perf_counter()
    accumulate_stats(timers, rollout.stats)  # speculative rollouts: drafted / accepted counts
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completion_ids]
    samples = scorer.score(indices, [dataset[i] for i in indices], rollout, texts)
    timers["rollout"] += t1 - t0
    timers["reward"] += time.perf_counter() - t1
    return samples


def to_groups(samples: list[Sample], n: int, version: int = 0) -> list[Group]:
    """Prompt-major samples as groups of n; a group holding a `skip` sample is skipped (reward_on_error:
    skip_group). `version`: the policy version that sampled them (asynchronous rollouts)."""
    return [Group(rewards=[s.reward for s in samples[g:g + n]], data=samples[g:g + n],
                  skipped=any(s.skip for s in samples[g:g + n]), version=version)
            for g in range(0, len(samples), n)]


@dataclass
class RoundRoles:
    """What a round runs with: the rollout worker, the Scorer, the prompts, and this process's place.

    any_true(flag) -> bool: the flag OR-ed over processes; gather(groups) -> every process's groups, in
    process order (both the identity with one process)."""

    cfg: TrainConfig
    depth: int
    worker: Any
    scorer: Any
    tokenizer: Any
    dataset: Any
    prompt_ids: Any
    sampler: Any
    rank: int = 0
    world: int = 1
    any_true: Callable[[bool], bool] = bool
    gather: Callable[[list[Group]], list[Group]] = list


def sample_round(roles: RoundRoles, step: int, round_: int, want: int, timers: dict[str, float],
                 version: int = 0) -> list[Group]:
    """Sample `want` prompts (rounded up to split over processes; every process takes the same ones and
    rolls out its share), score them, and return every process's groups. A reward function failing on
    one process (reward_on_error: raise) raises RewardFunctionError on all of them."""
    want = math.ceil(want / roles.world) * roles.world
    indices = roles.sampler.take(want)  # identical on every process (same seed and position)
    local = indices[roles.rank::roles.world]
    params = sampling_params(roles.cfg, roles.depth, step, round_, roles.rank)
    try:
        samples, error = generate_and_score(roles.worker, roles.scorer, roles.tokenizer, roles.dataset,
                                            roles.prompt_ids, local, params, timers), None
    except RewardFunctionError as e:  # every process stops with it (and checkpoints together)
        samples, error = [], e
    if roles.any_true(error is not None):
        raise error or RewardFunctionError("a reward function failed on another process (its line names it)")
    groups = to_groups(samples, roles.cfg.num_generations, version)  # reward_on_error: skip_group marks groups
    return roles.gather(groups) if roles.world > 1 else groups
