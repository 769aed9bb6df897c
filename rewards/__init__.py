"""Reward functions, registry and math verification. No torch here.

    import rewards
    fn = rewards.get("dapo_math")                      # or "package.module:function"
    fn(prompts=prompts, completions=completions, ground_truth=[...])   # TRL's convention -> list[float]
    rewards.call(fn, prompts, completions, ground_truth=[...])         # same, + `solution` alias, checks
    rewards.score_completions(fn, prompts, texts, columns=..., ...)  # the trainer's and eval's one scoring call
    rewards.pop_counters()                             # {"rewards/timeouts": ..., "rewards/errors": ...}
    rewards.reward_ids(["a:reward", "b:reward"])       # a run's unique names: ["a:reward", "b:reward"]

Built-ins: dapo_math (+1/-1), math_accuracy (1/0), overlong_penalty (DAPO soft punishment), format.
Verifier options of dapo_math / math_accuracy (policy="exact"|"rounded", numeric_precision, decimal_comma,
fallback): `rewards.policy`. Checking the verifier on labelled rows: `rewards.report` (`looprl reward --report`).
"""

from rewards import builtin  # noqa: F401  (registers the built-in reward functions)
from rewards.builtin import completion_text
from rewards.math import configure, counters, explain, extract_answer, is_equivalent, pop_counters, shutdown
from rewards.registry import (
    UnknownRewardError,
    available,
    call,
    check_column_clash,
    get,
    options_by_position,
    register,
    resolve_reward_key,
    reward_ids,
    reward_name,
)
from rewards.scoring import score_completions

__all__ = ["get", "call", "register", "reward_name", "reward_ids", "resolve_reward_key", "options_by_position",
           "available", "UnknownRewardError", "check_column_clash", "completion_text",
           "extract_answer", "is_equivalent", "score_completions", "explain", "counters", "pop_counters",
           "configure", "shutdown"]
