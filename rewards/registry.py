"""Name -> reward function registry, so configs can say `rewards: [dapo_math, overlong_penalty]`.

`get` also imports any `"package.module:function"`, which is how a TRL reward function (for example
`"trl.rewards:accuracy_reward"`) or a user's own function plugs in without registering.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
            close = difflib.get_close_matches(part, [n for n in dir(fn) if not n.startswith("_")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownRewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}{hint}")
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
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownRewardError(
            f"unknown reward {name!r}{hint}; registered: {', '.join(available())} "
            "(or give 'package.module:function')")
    if not options:
        return fn
    check_options(fn, options, reward_name(name))
    bound = functools.partial(fn, **options)
    functools.update_wrapper(bound, fn)
    return bound


def declared_options(fn: RewardFn) -> list[str] | None:
    """The options `fn` takes by name (its named parameters but `prompts` / `completions`); None when its
    signature cannot be read. Catch-all `**kwargs` does not count: it receives the dataset columns."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in named and p.name not in ("prompts", "completions")]


# Keywords every call passes itself (and TRL's own): a dataset column or an option may not take one of these
# names -- the call's keyword would override it.
RESERVED_COLUMNS = ("prompts", "completions", "completion", "completion_ids", "max_completion_length", "truncated",
                    "log_metric", "log_extra")


def check_column_clash(name: str, options: Mapping[str, Any], columns: Sequence[str],
                       passed: Sequence[str] = RESERVED_COLUMNS) -> None:
    """An option named like a dataset column, or like a keyword the caller passes itself (`passed`: the
    trainer's and eval's completion_ids, truncated, max_completion_length, ...), would be overridden at every
    call (all arrive by keyword): refused in one line naming the option, the function and what would win."""
    for key in options:
        if key in columns:
            raise ValueError(f"option {key!r} of reward {name!r} clashes with the dataset column {key!r} (columns "
                             "reach reward functions by keyword too, and the column would win); rename one of them")
        if key in passed:
            raise ValueError(f"option {key!r} of reward {name!r} has the name of a keyword every call passes "
                             f"itself ({', '.join(passed)}), which would win; rename the parameter")


def check_options(fn: RewardFn, options: Mapping[str, Any], name: str) -> None:
    """Refuse, in one line naming the option and the function, an option `fn` does not declare (a typo
    would otherwise vanish into `**kwargs`) or a value its own check (`fn.check_options`, set by the
    built-ins) refuses -- so a bad option fails when the run is configured, not at its first step."""
    declared = declared_options(fn)
    if declared is not None:
        for key in options:
            if key not in declared:
                close = difflib.get_close_matches(str(key), declared, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"reward {name!r} has no option {key!r}{hint}; its options: "
                                 f"{', '.join(declared) or 'none'}")
    check = getattr(fn, "check_options", None)
    if callable(check):
        check(**options)


def reward_name(spec: str | RewardFn) -> str:
    """A readable name for one function on its own (messages, `looprl eval`): the function part of
    "pkg.mod:fn", a registered name, or a callable's __name__ ("lambda" for a lambda). A run's list of
    functions is named by `reward_ids`, which also makes the names unique."""
    if callable(spec):
        name = getattr(spec, "__name__", None) or getattr(getattr(spec, "func", None), "__name__", None)
        name = name or type(spec).__name__
        return "lambda" if name == "<lambda>" else name
    return str(spec).split(":")[-1]


def _qualified(spec: str | RewardFn) -> str:
    """The spec as a config writes it: "pkg.mod:fn" / a registered name; a callable as "module:qualname"."""
    if callable(spec):
        fn = getattr(spec, "func", spec)  # a functools.partial names its function
        return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', reward_name(spec))}"
    return str(spec)


def reward_ids(specs: Sequence[str | RewardFn]) -> list[str]:
    """One unique, readable name per reward function, by position in `rewards` -- the identity used by
    metrics (`reward/<id>/mean`), samples.jsonl, `reward_kwargs` keys and error messages.

    The short name (`reward_name`) when it is unique in the list; else the qualified one ("mod_a:reward" vs
    "mod_b:reward"); a lambda is `lambda_<position>` (1-based); the same function listed twice gets
    "#1", "#2" (`format#1`, `format#2`). Two functions never share a name, so neither overwrites the other.
    """
    short = [f"lambda_{i}" if _is_lambda(s) else reward_name(s) for i, s in enumerate(specs, start=1)]
    names = [_qualified(s) if short.count(name) > 1 and not _is_lambda(s) else name
             for name, s in zip(short, specs)]
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}#{seen[name]}"
        ids.append(name)
    return ids


def _is_lambda(spec: str | RewardFn) -> bool:
    return callable(spec) and getattr(getattr(spec, "func", spec), "__name__", "") == "<lambda>"


def resolve_reward_key(key: str, specs: Sequence[str | RewardFn], where: str) -> int | None:
    """The position in `specs` that a name given by the user (a `reward_kwargs` key, `accuracy_reward`)
    refers to: its id (`reward_ids`), the spec as written, or its short name when only one function has
    it. None when it names none of them; ValueError (naming `where` and the candidates) when it names
    several, e.g. `reward` for both `mod_a:reward` and `mod_b:reward`."""
    ids = reward_ids(specs)
    exact = [i for i, name in enumerate(ids) if key == name]
    if exact:
        return exact[0]
    hits = [i for i, s in enumerate(specs) if key in (_qualified(s), reward_name(s))]
    if len(hits) > 1:
        raise ValueError(f"{where}: {key!r} names {len(hits)} reward functions "
                         f"({', '.join(ids[i] for i in hits)}); use one of those names")
    return hits[0] if hits else None


def options_by_position(specs: Sequence[str | RewardFn], reward_kwargs: Mapping[str, Any],
                        where: str = "reward_kwargs") -> list[dict[str, Any]]:
    """The options (`reward_kwargs`) of each function in `specs`, by position; each key is resolved by
    `resolve_reward_key`. ValueError naming `where` and the key for a key that names no function (with a
    close match), names several, repeats another key's function, or holds no mapping."""
    ids = reward_ids(specs)
    out: list[dict[str, Any]] = [{} for _ in specs]
    claimed: dict[int, str] = {}
    for key, opts in reward_kwargs.items():
        position = resolve_reward_key(str(key), specs, where)
        if position is None:
            close = difflib.get_close_matches(str(key), ids, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: {key!r} is not one of the rewards ({', '.join(ids)}){hint}")
        if not isinstance(opts, Mapping):
            raise ValueError(f"{where}: options of {key!r} must be a mapping")
        if position in claimed:
            raise ValueError(f"{where}: {claimed[position]!r} and {key!r} both name reward {ids[position]!r}")
        claimed[position], out[position] = str(key), dict(opts)
        if opts:  # an option the function does not take, or a value it refuses: now, not at step 1
            try:
                check_options(get(specs[position]), opts, ids[position])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return out


def _accepts(fn: RewardFn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def invoke(fn: RewardFn, prompts: list, completions: list, **columns) -> object:
    """`fn`'s raw result, called as TRL does (see `call`), without checking it (rewards.guard checks).
    An `async def` function (TRL accepts them) is run to completion here, one event loop per call."""
    # each function gets its own lists (and message dicts): one that edits them in place must not change
    # what the next function sees
    kwargs = {k: list(v) if isinstance(v, list) else v for k, v in columns.items()}
    prompts = list(prompts) if isinstance(prompts, list) else prompts
    completions = [[dict(m) if isinstance(m, dict) else m for m in c] if isinstance(c, list) else c
                   for c in completions]
    if "ground_truth" in kwargs and "solution" not in kwargs and _accepts(fn, "solution"):
        kwargs["solution"] = list(kwargs["ground_truth"])
    result = fn(prompts=prompts, completions=completions, **kwargs)
    return _await(result) if inspect.isawaitable(result) else result


def _await(awaitable) -> object:
    async def wait():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop in this thread
        return asyncio.run(wait())
    with ThreadPoolExecutor(1) as pool:  # called from inside a running loop (a notebook): a fresh thread's loop
        return pool.submit(asyncio.run, wait()).result()


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
