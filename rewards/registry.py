"""Name -> reward function registry, so configs can say `rewards: [dapo_math, overlong_penalty]`.

`get` also imports any `"package.module:function"`, which is how a TRL reward function (for example
`"trl.rewards:accuracy_reward"`) or a user's own function plugs in without registering.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable

RewardFn = Callable[..., list]
_REGISTRY: dict[str, RewardFn] = {}


class UnknownRewardError(ValueError):
    """A reward name that is neither registered nor an importable `pkg.module:function`."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: `@rewards.register("my_reward")` makes `rewards.get("my_reward")` return the function."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorate


def available() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def _working_dir_importable() -> None:
    """Make the current directory importable, as `python -m` does, so `rewards: [my_rewards:brevity]`
    finds my_rewards.py next to the config without PYTHONPATH. Appended: installed modules still win."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UnknownRewardError(f"reward {spec!r}: expected 'package.module:function'")
    _working_dir_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownRewardError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UnknownRewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UnknownRewardError(f"reward {spec!r} is not callable")
    return fn


def get(name: str | RewardFn, **options) -> RewardFn:
    """A reward function by registered name or `"package.module:function"`; a callable passes through.

    Keyword `options` are bound with functools.partial (the trainer passes per-function config keys
    this way); the result keeps the function's `__name__` for metric names.
    """
    if callable(name):
        fn = name
    elif not isinstance(name, str) or not name:
        raise UnknownRewardError(f"reward must be a name or a callable, got {name!r}")
    elif ":" in name:
        fn = _import(name)
    elif name in _REGISTRY:
        fn = _REGISTRY[name]
    else:
        raise UnknownRewardError(
            f"unknown reward {name!r}; registered: {', '.join(available())} "
            "(or give 'package.module:function')")
    if not options:
        return fn
    bound = functools.partial(fn, **options)
    functools.update_wrapper(bound, fn)
    return bound


def reward_name(spec: str | RewardFn) -> str:
    """The name metrics use: the function part of "pkg.mod:fn", a registered name, or a callable's __name__."""
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__)
    return str(spec).split(":")[-1]


def _accepts(fn: RewardFn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def invoke(fn: RewardFn, prompts: list, completions: list, **columns) -> object:
    """`fn`'s raw result, called as TRL does (see `call`), without checking it (rewards.guard checks)."""
    kwargs = dict(columns)
    if "ground_truth" in kwargs and "solution" not in kwargs and _accepts(fn, "solution"):
        kwargs["solution"] = kwargs["ground_truth"]
    return fn(prompts=prompts, completions=completions, **kwargs)


def call(fn: RewardFn, prompts: list, completions: list, **columns) -> list[float | None]:
    """Call any reward function as TRL's GRPOTrainer does: everything by keyword, because TRL's own
    functions do not take `prompts` positionally (`accuracy_reward(completions, solution, **kw)`).
    When the function has a `solution` parameter (TRL / open-r1) and only `ground_truth` is given,
    the gold answers are passed under both names. Checks one score per completion."""
    scores = list(invoke(fn, prompts, completions, **columns))
    if len(scores) != len(completions):
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions")
    return scores
