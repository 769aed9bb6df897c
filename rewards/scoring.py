"""The one scoring call that the trainer and `looprl eval` share.

Completions are scored in TRL's convention: everything by keyword (rewards.call), dataset columns as
keyword lists, and completions as assistant messages when the prompts are chat messages. Error policies and
time limits of reward functions belong in `rewards.call`, so both callers get them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rewards.registry import RewardFn, call


def as_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list[Any]:
    """TRL's convention: a chat prompt (list of messages) gets an assistant-message completion."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def score_completions(fn: RewardFn, prompts: Sequence[Any], texts: Sequence[str], *,
                      columns: Mapping[str, Sequence[Any]], completion_ids: Sequence[Sequence[int]],
                      truncated: Sequence[bool], max_completion_length: int) -> list[float | None]:
    """One reward function over samples (one entry each: prompt, text, columns[...]); None = not applicable."""
    return call(fn, list(prompts), as_completions(prompts, texts), **{k: list(v) for k, v in columns.items()},
                completion_ids=[list(c) for c in completion_ids], max_completion_length=max_completion_length,
                truncated=list(truncated))
