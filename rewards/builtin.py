"""Built-in reward functions, in TRL's convention: `fn(prompts, completions, **kwargs) -> list[float]`.

Completions may be strings or chat-message lists (`[{"role": "assistant", "content": ...}]`);
dataset columns arrive as keyword lists. The math rewards read the gold answer from `ground_truth`, else
`answer`, else `solution` (its `\\boxed{}` answer; a worked solution without one is refused): the rule
is `rewards.gold`, shared with the data loader. The trainer adds `completion_ids`, `max_completion_length`,
`truncated`; TRL adds `log_metric` / `log_extra`, which we use when present (timeouts, extracted answers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from rewards.gold import gold_column
from rewards.math import _ANCHOR, Verdict, extract_answer, verify_batch
from rewards.policy import Policy, from_options, resolve
from rewards.registry import register


def completion_text(completion: Any) -> str:
    """Text of one completion: a string, a message dict, or a list of messages (contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and "content" in completion:
        return str(completion["content"])
    if isinstance(completion, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "\n".join(str(m["content"]) for m in completion)
    raise ValueError(f"completion must be a string or a list of chat messages with 'content', "
                     f"got {type(completion).__name__}: {str(completion)[:80]!r}")


def _verdicts(fn_name: str, completions: Sequence[Any] | None, kwargs: dict[str, Any],
              timeout: float | None, policy: Policy) -> list[Verdict]:
    if completions is None:
        raise ValueError(f"{fn_name}: no completions given")
    texts = [completion_text(c) for c in completions]
    verdicts = verify_batch(texts, gold_column(fn_name, len(texts), kwargs), timeout=timeout, policy=policy)
    log_metric: Callable | None = kwargs.get("log_metric")
    if callable(log_metric):  # TRL's GRPOTrainer hook; our trainer reads rewards.pop_counters() instead
        log_metric("rewards/timeouts", float(sum(v.path == "timeout" for v in verdicts)))
        log_metric("rewards/errors", float(sum(v.path == "error" for v in verdicts)))
    log_extra: Callable | None = kwargs.get("log_extra")
    if callable(log_extra):
        log_extra("extracted_answer", [v.extracted or "[none]" for v in verdicts])
    return verdicts


@register("dapo_math")
def dapo_math(prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, *,
              timeout: float | None = None, policy: str | None = None, numeric_precision: int | None | str = "preset",
              decimal_comma: bool | None = None, fallback: str | None = None, **kwargs: Any) -> list[float]:
    """DAPO's score: +1.0 when the final answer equals the gold answer, -1.0 otherwise (also when no
    answer was found, or verification timed out / failed). Verifier options: `rewards.policy`."""
    chosen = resolve(policy, numeric_precision=numeric_precision, decimal_comma=decimal_comma, fallback=fallback,
                     where="dapo_math")
    return [1.0 if v.correct else -1.0 for v in _verdicts("dapo_math", completions, kwargs, timeout, chosen)]


@register("math_accuracy")
def math_accuracy(prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, *,
                  timeout: float | None = None, policy: str | None = None,
                  numeric_precision: int | None | str = "preset", decimal_comma: bool | None = None,
                  fallback: str | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the final answer equals the gold answer, else 0.0 (the usual accuracy metric).
    Verifier options: `rewards.policy`."""
    chosen = resolve(policy, numeric_precision=numeric_precision, decimal_comma=decimal_comma, fallback=fallback,
                     where="math_accuracy")
    return [1.0 if v.correct else 0.0 for v in _verdicts("math_accuracy", completions, kwargs, timeout, chosen)]


def _check_verifier_options(name: str, **options: Any) -> None:
    """dapo_math / math_accuracy: a bad policy value is refused when the options are bound (registry.get)."""
    if options.get("timeout") is not None and (isinstance(options["timeout"], bool)
                                               or not isinstance(options["timeout"], (int, float))
                                               or options["timeout"] <= 0):
        raise ValueError(f"{name}: timeout must be a positive number of seconds, got {options['timeout']!r}")
    from_options(options, where=name)


dapo_math.check_options = lambda **o: _check_verifier_options("dapo_math", **o)
math_accuracy.check_options = lambda **o: _check_verifier_options("math_accuracy", **o)


@register("overlong_penalty")
def overlong_penalty(prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, *,
                     completion_ids: Sequence[Sequence[int]] | None = None,
                     max_completion_length: int | None = None, buffer_len: int | None = None,
                     penalty_factor: float = 1.0, **kwargs: Any) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to `max_completion_length - buffer_len` tokens, then
    linearly down to `-penalty_factor` at the limit (and beyond, clamped)."""
    if completion_ids is None:
        raise ValueError("overlong_penalty: needs completion_ids (token ids of each completion)")
    if not isinstance(max_completion_length, int) or max_completion_length < 1:
        raise ValueError(f"overlong_penalty: max_completion_length must be a positive int, "
                         f"got {max_completion_length!r}")
    if not isinstance(buffer_len, int) or not 0 < buffer_len <= max_completion_length:
        raise ValueError(f"overlong_penalty: buffer_len must be an int in 1..max_completion_length "
                         f"({max_completion_length}), got {buffer_len!r}")
    if penalty_factor < 0:
        raise ValueError(f"overlong_penalty: penalty_factor must be >= 0, got {penalty_factor!r}")
    free = max_completion_length - buffer_len
    scores = []
    for ids in completion_ids:
        over = len(ids) - free
        scores.append(0.0 if over <= 0 else -min(over / buffer_len, 1.0) * penalty_factor)
    return scores


_BOXED = re.compile(r"\\boxed\s*\{\s*[^\s}]")


@register("format")
def format_reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, *,
                  style: str = "answer_line", **kwargs: Any) -> list[float]:
    """1.0 when the response follows the answer format, else 0.0.

    style "answer_line" (DAPO's prompt): the last non-empty line is `Answer: <something extractable>`;
    "boxed": the response has a non-empty `\\boxed{}`; "any": some final answer can be extracted.
    """
    _check_style(style)
    if completions is None:
        raise ValueError("format: no completions given")
    scores = []
    for completion in completions:
        text = completion_text(completion)
        if style == "boxed":
            ok = bool(_BOXED.search(text))
        elif style == "any":
            ok = extract_answer(text, fallback="none") is not None  # an explicit final answer only
        else:
            lines = [line for line in text.strip().split("\n") if line.strip()]
            last = lines[-1].strip().lstrip("*_#> ") if lines else ""
            anchor = _ANCHOR.match(last)
            ok = bool(anchor) and not last[: anchor.start()].strip() and extract_answer(last) is not None
        scores.append(1.0 if ok else 0.0)
    return scores


def _check_style(style: Any = "answer_line") -> None:
    if style not in ("answer_line", "boxed", "any"):
        raise ValueError(f"format: style must be 'answer_line', 'boxed' or 'any', got {style!r}")


format_reward.check_options = _check_style
