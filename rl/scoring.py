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
from rl.accuracy import AccuracyError, accuracy_kwargs, split_reward_kwargs, verdicts
from rl.batch import Sample
from rl.config import ConfigError, TrainConfig
from rollout import Rollout


def _resolve(key: str, specs: list, where: str) -> int | None:
    """The position in `specs` a user's name refers to (rewards.resolve_reward_key); ConfigError when it
    names several."""
    try:
        return rewards.resolve_reward_key(key, specs, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class Scorer:
    """Weighted reward functions of a run (config keys rewards, reward_weights, reward_kwargs, ...)."""

    def __init__(self, cfg: TrainConfig, columns: list[str], warn: Callable[[str], None] | None = None):
        self.max_new_tokens = cfg.max_new_tokens
        self.columns = columns  # dataset columns passed to every function by keyword (TRL's convention)
        self.fns = self._build(cfg)
        self.guard = RewardGuard(cfg.reward_on_error, cfg.reward_timeout, **({"warn": warn} if warn else {}))
        self.accuracy_key, self.accuracy_fn, self.accuracy_kwargs = None, None, {}
        if cfg.accuracy_reward:
            position = None if callable(cfg.accuracy_reward) else _resolve(
                cfg.accuracy_reward, self.specs, "config key 'accuracy_reward'")
            try:  # its options (rl/accuracy.py): reward_kwargs[accuracy_reward], else the rewards' verifier options
                self.accuracy_kwargs = accuracy_kwargs(self.specs, cfg.reward_kwargs, cfg.accuracy_reward)
            except ValueError as e:
                raise ConfigError(f"config key 'accuracy_reward': {e}") from None
            self._no_column_clash(rewards.reward_name(cfg.accuracy_reward), self.accuracy_kwargs)
            if position is not None:  # one of the rewards: its scores are reused
                self.accuracy_key = self.names[position]
            else:  # a callable (Python API) or a name not among the rewards is scored on its own
                self.accuracy_key = rewards.reward_name(cfg.accuracy_reward)
                try:
                    self.accuracy_fn = rewards.get(cfg.accuracy_reward, **self.accuracy_kwargs)
                except ValueError as e:
                    raise ConfigError(f"config key 'accuracy_reward': {e}") from None

    def _build(self, cfg: TrainConfig) -> list[tuple[str, Any, float]]:
        """(id, function with its reward_kwargs bound, weight) by position in `rewards`. The id
        (rewards.reward_ids) is unique, so two functions named alike never overwrite each other."""
        self.specs = specs = cfg.reward_specs()
        weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(cfg.rewards)
        weights += [1.0] * (len(specs) - len(weights))  # overlong_penalty added by overlong_buffer_len
        try:
            own_kwargs, _ = split_reward_kwargs(specs, cfg.reward_kwargs, cfg.accuracy_reward)
            options = rewards.options_by_position(specs, own_kwargs, "config key 'reward_kwargs'")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        fns = []
        for name, spec, opts, weight in zip(rewards.reward_ids(specs), specs, options, weights):
            if spec == "overlong_penalty":
                opts.setdefault("buffer_len", cfg.overlong_buffer_len)
                opts.setdefault("penalty_factor", cfg.overlong_penalty)
            self._no_column_clash(name, opts)
            try:  # the registry binds the options (functools.partial, keeping the name)
                fn = rewards.get(spec, **opts)
            except (KeyError, ValueError, ImportError, AttributeError) as e:
                raise ConfigError(f"config key 'rewards': {e}") from None
            fns.append((name, fn, float(weight)))
        return fns

    def _no_column_clash(self, name: str, opts: dict[str, Any]) -> None:
        """An option named like a dataset column would be overridden by the column at every call (both
        arrive by keyword): refused, naming the option, the function and the column."""
        try:
            rewards.check_column_clash(name, opts, self.columns)
        except ValueError as e:
            raise ConfigError(f"config key 'reward_kwargs': {e}") from None

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
                correct=None if correct[j] is None else float(correct[j]), text=texts[j], skip=skip[j],
                token_depths=list(rollout.token_depths[j]) if rollout.token_depths is not None else None))
        return samples
