"""What "correct" means, once, for every number looprl reports: training's `accuracy`, the in-training
eval (`eval/accuracy_d{t}`) and `looprl eval` (accuracy, pass@k, maj@k).

- One function decides: `accuracy_reward` (default math_accuracy), called with one set of options
  (`accuracy_kwargs`): `reward_kwargs[accuracy_reward]` when given (allowed even when the function is
  not among `rewards`); else, when it is not among `rewards`, the verifier options (policy,
  numeric_precision, decimal_comma, fallback) that the run's reward functions set, if the accuracy
  function takes them. So `reward_kwargs: {dapo_math: {policy: rounded}}` makes the logged accuracy
  and the eval check with `policy: rounded` too; reward functions that set different verifier options
  are refused until reward_kwargs[accuracy_reward] chooses. `looprl eval --option KEY=VALUE` passes
  the same options.
- Its scores mean 1 = correct, 0 = wrong, None = unscored (a failed verification under
  reward_on_error: skip_group, or a function's "not applicable"). Any other value is refused in one
  line (`verdicts`); dapo_math (+1 / -1) is refused up front (`check_accuracy_name`).
- Unscored samples are left out of every estimate (accuracy, pass@k, maj@k) and counted:
  `accuracy/unscored_frac` in training, `unscored_frac` per depth in eval (`eval/unscored_frac_d{t}`).
- maj@k groups votes with the same verifier under the same options (`vote_classes`): answers it
  judges equal (`0.5`, `1/2`, `\\frac{1}{2}`) are one vote.

No torch here (rl/config.py's validation uses it).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import rewards
from rewards.math import verify_batch
from rewards.policy import OPTIONS, Policy
from rewards.registry import check_options, options_by_position, resolve_reward_key, reward_ids

# Built-ins that score right / wrong as +1 / -1, and the 1 / 0 function with the same verifier.
SIGNED = {"dapo_math": "math_accuracy"}


class AccuracyError(ValueError):
    """The accuracy function cannot define correct: it is a +1/-1 reward or returned a value other than 1/0/None."""


def check_accuracy_name(fn: Any) -> None:
    """Refuse a built-in whose scores are not 1 / 0, naming the 1 / 0 function that verifies the same way."""
    name = rewards.reward_name(fn)
    if name in SIGNED:
        raise AccuracyError(f"{name} scores +1 / -1, but accuracy counts 1 = correct, 0 = wrong; use "
                            f"{SIGNED[name]} (the same verifier, with the same options)")


def _takes_verifier_options(fn: Any) -> bool:
    try:
        params = inspect.signature(rewards.get(fn)).parameters
    except (TypeError, ValueError):
        return False
    return all(option in params for option in OPTIONS)


def split_reward_kwargs(specs: Sequence[Any], reward_kwargs: Mapping[str, Any], accuracy_reward: Any,
                        where: str = "config key 'reward_kwargs'") -> tuple[dict[str, Any], Any]:
    """`reward_kwargs` without the accuracy function's own entry, and that entry (None when absent).

    The entry is a key naming `accuracy_reward` while it is not among the reward functions `specs`
    (`reward_kwargs` allows it for that function alone); a key naming one of the rewards stays theirs."""
    if isinstance(accuracy_reward, str) and accuracy_reward in reward_kwargs \
            and resolve_reward_key(accuracy_reward, specs, where) is None:
        rest = {k: v for k, v in reward_kwargs.items() if k != accuracy_reward}
        return rest, reward_kwargs[accuracy_reward]
    return dict(reward_kwargs), None


def accuracy_kwargs(specs: Sequence[Any], reward_kwargs: Mapping[str, Mapping[str, Any]],
                    accuracy_reward: Any, where: str = "config key 'reward_kwargs'") -> dict[str, Any]:
    """The options the accuracy function is called with (rules in the module docstring); `specs` are the
    run's reward functions (TrainConfig.reward_specs()), whose options are resolved by position
    (rewards.options_by_position). Raises AccuracyError when the reward functions set different verifier
    options and none is chosen; ValueError (naming `where`) for a reward_kwargs key that names no function."""
    rest, own = split_reward_kwargs(specs, reward_kwargs, accuracy_reward, where)
    if own is not None:
        if not isinstance(own, Mapping):
            raise AccuracyError(f"{where}: options of {accuracy_reward!r} must be a mapping")
        try:  # an option it does not take, or a bad value: refused now, as for the rewards' own options
            check_options(rewards.get(accuracy_reward), own, rewards.reward_name(accuracy_reward))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return dict(own)
    per_fn = options_by_position(specs, rest, where)
    position = next((i for i, fn in enumerate(specs) if fn is accuracy_reward), None) \
        if callable(accuracy_reward) else resolve_reward_key(accuracy_reward, specs, where)
    if position is not None:
        return per_fn[position]  # one of the rewards: scored with that function's options
    ids = reward_ids(specs)
    found = {ids[i]: chosen for i, opts in enumerate(per_fn)
             if (chosen := {k: v for k, v in opts.items() if k in OPTIONS})}
    distinct = [dict(t) for t in {tuple(sorted(opts.items())) for opts in found.values()}]
    if not distinct or not _takes_verifier_options(accuracy_reward):
        return {}
    if len(distinct) > 1:
        raise AccuracyError(f"reward functions {', '.join(sorted(found))} verify with different options "
                            f"({'; '.join(f'{k}: {v}' for k, v in sorted(found.items()))}); choose the "
                            f"accuracy's with reward_kwargs: {{{rewards.reward_name(accuracy_reward)}: {{...}}}}")
    return distinct[0]


def verdicts(scores: Sequence[float | None], name: str) -> list[bool | None]:
    """Scores of the accuracy function as correct (True) / wrong (False) / unscored (None)."""
    out: list[bool | None] = []
    for i, score in enumerate(scores):
        if score is None:
            out.append(None)
        elif score == 1 or score == 0:
            out.append(score == 1)
        else:
            raise AccuracyError(f"{name!r} returned {score!r} for sample {i}; an accuracy function must return "
                                "1 (correct), 0 (wrong) or None (unscored)")
    return out


def unscored_frac(correct: Sequence[bool | float | None]) -> float:
    return sum(c is None for c in correct) / len(correct) if correct else 0.0


def vote_classes(groups: Sequence[Sequence[str | None]], policy: Policy | None = None) -> list[list[int | None]]:
    """Per group (one prompt's answers), a class label per answer: answers the math verifier judges
    equal under `policy` share a label; None (no answer extracted) casts no vote.

    Each distinct answer is checked against every distinct earlier answer of its group, the earlier one
    standing as the gold; equal pairs are joined, transitively. All pairs of all groups go to the
    verifier in one call (undecided ones to its worker pool, cached), so n answers cost n(n-1)/2 checks
    per prompt at most, most of them decided in microseconds.
    """
    distinct = [list(dict.fromkeys(a for a in answers if a is not None)) for answers in groups]
    pairs = [(g, i, j) for g, ds in enumerate(distinct) for j in range(len(ds)) for i in range(j)]
    equal = verify_batch([distinct[g][j] for g, _, j in pairs], [distinct[g][i] for g, i, _ in pairs],
                         policy=policy, extracted=True) if pairs else []
    parents = [list(range(len(ds))) for ds in distinct]

    def root(g: int, i: int) -> int:
        while parents[g][i] != i:
            i = parents[g][i]
        return i

    for (g, i, j), verdict in zip(pairs, equal):
        if verdict.correct:
            a, b = root(g, i), root(g, j)
            parents[g][max(a, b)] = min(a, b)
    out = []
    for g, answers in enumerate(groups):
        index = {a: k for k, a in enumerate(distinct[g])}
        out.append([None if a is None else root(g, index[a]) for a in answers])
    return out
