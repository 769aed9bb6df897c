"""The one scoring call that the trainer and `looprl eval` share.

Completions are scored in TRL's convention: everything by keyword (rewards.call), dataset columns as
keyword lists, and completions as assistant messages when the prompts are chat messages. Every call goes
through a `rewards.guard.RewardGuard`, so both callers get the same checks (NaN, None for every function,
wrong count or type), the same error policy (`reward_on_error`) and the same time limit (`reward_timeout`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rewards.guard import RewardGuard
from rewards.registry import RESERVED_COLUMNS, RewardFn, reward_name  # noqa: F401  (re-exported)


def as_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list[Any]:
    """TRL's convention: a chat prompt (list of messages) gets an assistant-message completion."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def _keywords(columns: Mapping[str, Sequence[Any]], completion_ids: Sequence[Sequence[int]],
              truncated: Sequence[bool], max_completion_length: int) -> dict[str, Any]:
    return {**{k: list(v) for k, v in columns.items()}, "completion_ids": [list(c) for c in completion_ids],
            "max_completion_length": max_completion_length, "truncated": list(truncated)}


def strict_guard() -> RewardGuard:
    """No error policy, no time limit: any bad result is a RewardFunctionError naming the function."""
    return RewardGuard("raise", None, hint="")


def score_completions(fn: RewardFn, prompts: Sequence[Any], texts: Sequence[str], *,
                      columns: Mapping[str, Sequence[Any]], completion_ids: Sequence[Sequence[int]],
                      truncated: Sequence[bool], max_completion_length: int, guard: RewardGuard | None = None,
                      name: str | None = None) -> list[float | None]:
    """One reward function over samples (one entry each: prompt, text, columns[...]); None = not applicable.

    Under reward_on_error: skip_group a bad sample comes back as None (only `score_functions` reports
    which samples to skip)."""
    guard = guard or strict_guard()
    scores, _ = guard.score(name or reward_name(fn), fn, list(prompts), as_completions(prompts, texts),
                            **_keywords(columns, completion_ids, truncated, max_completion_length))
    return scores


def score_functions(fns: Sequence[tuple[str, RewardFn]], prompts: Sequence[Any], texts: Sequence[str], *,
                    columns: Mapping[str, Sequence[Any]], completion_ids: Sequence[Sequence[int]],
                    truncated: Sequence[bool], max_completion_length: int, guard: RewardGuard | None = None
                    ) -> tuple[dict[str, list[float | None]], list[bool]]:
    """Every (name, fn) over the same samples, and per sample whether its group must be skipped
    (reward_on_error: skip_group). A sample that no function scored is a problem too (RewardGuard.score_all)."""
    guard = guard or strict_guard()
    return guard.score_all(list(fns), list(prompts), as_completions(prompts, texts),
                           **_keywords(columns, completion_ids, truncated, max_completion_length))
