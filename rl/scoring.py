"""The reward role of the trainer: the configured reward functions, weighted, applied to one rollout.

Every function is called through `rewards.scoring` (the scoring call `looprl eval` uses too) and the
run's `RewardGuard` (checked results, reward_on_error, reward_timeout, Ctrl-C; rewards/guard.py); the
weighted sum is the sample's reward, and `accuracy_reward` (logged as `accuracy`) is either one of the
configured functions or scored on its own, with the options rl/accuracy.py gives it (the eval uses the same
function and options; its scores must be 1 / 0 / None). Under reward_on_error: skip_group a sample a function
failed on has `skip` set, and the trainer drops its group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import rewards
from rewards.guard import RewardGuard
from rewards.scoring import score_completions, score_functions
from rl.accuracy import AccuracyError, accuracy_kwargs, verdicts
from rl.batch import Sample
from rl.config import ConfigError, TrainConfig
from rollout import Rollout


class Scorer:
    """Weighted reward functions of a run (config keys rewards, reward_weights, reward_kwargs, ...)."""

    def __init__(self, cfg: TrainConfig, columns: list[str], warn: Callable[[str], None] | None = None):
        self.max_new_tokens = cfg.max_new_tokens
        self.columns = columns  # dataset columns passed to every function by keyword (TRL's convention)
        self.fns = self._build(cfg)
        self.guard = RewardGuard(cfg.reward_on_error, cfg.reward_timeout, **({"warn": warn} if warn else {}))
        names = [name for name, _, _ in self.fns]
        self.accuracy_key = rewards.reward_name(cfg.accuracy_reward) if cfg.accuracy_reward else None
        self.accuracy_fn = None
        # its options (checked by validate()): reward_kwargs[accuracy_reward], else the rewards' verifier options
        self.accuracy_kwargs = accuracy_kwargs(cfg.rewards, cfg.reward_kwargs, cfg.accuracy_reward) \
            if cfg.accuracy_reward else {}
        # a callable (Python API) is called as is; a name not among the rewards is scored on its own
        if cfg.accuracy_reward and (callable(cfg.accuracy_reward) or cfg.accuracy_reward not in names):
            self.accuracy_fn = rewards.get(cfg.accuracy_reward, **self.accuracy_kwargs)

    @staticmethod
    def _build(cfg: TrainConfig) -> list[tuple[str, Any, float]]:
        names = list(cfg.rewards)
        weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(names)
        if cfg.overlong_buffer_len and "overlong_penalty" not in names:
            names.append("overlong_penalty")
            weights.append(1.0)
        fns = []
        for name, weight in zip(names, weights):
            opts = dict(cfg.reward_kwargs.get(name, {}))
            if name == "overlong_penalty":
                opts.setdefault("buffer_len", cfg.overlong_buffer_len)
                opts.setdefault("penalty_factor", cfg.overlong_penalty)
            try:  # the registry binds the options (functools.partial, keeping the name)
                fn = rewards.get(name, **opts)
            except (KeyError, ValueError, ImportError, AttributeError) as e:
                raise ConfigError(f"config key 'rewards': {e}") from None
            fns.append((rewards.reward_name(name), fn, float(weight)))
        return fns

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.fns]

    def score(self, indices: list[int], rows: list[dict], rollout: Rollout, texts: list[str]) -> list[Sample]:
        """Samples of one rollout (prompt-major, n per prompt of `indices`/`rows`) with their rewards.
        Raises rewards.guard.RewardFunctionError (reward_on_error: raise) or RewardInterrupted (Ctrl-C)."""
        n = len(texts) // len(rows)
        truncated = [r == "length" for r in rollout.finish_reasons]
        prompts = [row["prompt"] for row in rows for _ in range(n)]
        columns = {col: [row[col] for row in rows for _ in range(n)] for col in self.columns}

        scoring = dict(columns=columns, completion_ids=rollout.completion_ids, truncated=truncated,
                       max_completion_length=self.max_new_tokens, guard=self.guard)
        per_fn, skip = score_functions([(name, fn) for name, fn, _ in self.fns], prompts, texts, **scoring)
        if self.accuracy_fn is not None:
            correct = score_completions(self.accuracy_fn, prompts, texts, name=self.accuracy_key, **scoring)
        elif self.accuracy_key:
            correct = per_fn[self.accuracy_key]
        else:
            correct = [None] * len(texts)
        try:
            correct = verdicts(correct, self.accuracy_key) if self.accuracy_key else correct
        except AccuracyError as e:
            raise ConfigError(f"config key 'accuracy_reward': {e}") from None
        samples = []
        for j in range(len(texts)):
            fn_r = {name: per_fn[name][j] for name, _, _ in self.fns}
            valid = [(w, fn_r[name]) for name, _, w in self.fns if fn_r[name] is not None]
            total = sum(w * float(v) for w, v in valid)  # None = "not applicable", like TRL's nansum
            samples.append(Sample(
                prompt_index=indices[j // n], prompt_ids=list(rollout.prompt_ids[j]),
                completion_ids=list(rollout.completion_ids[j]), rollout_logprobs=list(rollout.logprobs[j]),
                truncated=truncated[j], reward=total, fn_rewards=fn_r,
                correct=None if correct[j] is None else float(correct[j]), text=texts[j], skip=skip[j]))
        return samples
