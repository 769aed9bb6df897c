"""Calling user reward functions safely: checked results, an error policy, a timeout, clean Ctrl-C.

User code is the most common failure of an RL job, and each of its failures used to surface far from
its cause (a None as "std and var only support floating point", a NaN as a non-finite *loss*, a
hang as a frozen run). `RewardGuard` calls every function through one door and turns each problem
into one line naming the function, the first bad sample and what was wrong, then applies the
user's policy (`reward_on_error`):

- raise: stop with that line (RewardFunctionError);
- zero: the bad samples score 0 for that function, with a warning;
- skip_group: the bad samples are flagged; the trainer drops every group holding one.

Timeout (`reward_timeout`): the call runs in a daemon worker thread and the caller waits up to the
deadline. A thread rather than a subprocess pool because reward functions receive live objects
(closures, bound options, TRL callables, tokenizer-side state) that generally cannot be pickled,
and a thread costs microseconds per call. The price: Python cannot kill a thread, so a timed-out
call is abandoned (it may keep a core busy); after `max_abandoned` abandoned calls the guard stops
regardless of the policy. Without a timeout the function runs on the calling thread, which keeps
functions that use `signal.alarm` (math-verify's default timeout, used by TRL's accuracy_reward)
working; such functions cannot run under `reward_timeout`.

Ctrl-C / SIGTERM during a call raises RewardInterrupted right away (the hung function is abandoned),
after letting the previous handler see the signal, so the trainer can checkpoint at the last
completed step and exit. No torch here.
"""

from __future__ import annotations

import math
import numbers
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rewards.registry import invoke

POLICIES = ("raise", "zero", "skip_group")


class RewardFunctionError(ValueError):
    """A reward function misbehaved; the message names it, the first bad sample and the problem."""


class RewardInterrupted(Exception):
    """SIGINT/SIGTERM arrived while a reward function ran; the step's results are incomplete."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_scores(name: str, scores: Any, n: int) -> tuple[list[float | None], list[int], str | None]:
    """Validate one function's result for `n` completions.

    Returns (scores as floats/None, indices of bad samples, first problem as text or None). None is
    valid: TRL's "not applicable", skipped when summing. A wrong type or count makes every sample bad.
    """
    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__iter__"):
        return [None] * n, list(range(n)), (f"reward {name!r}: returned {type(scores).__name__} "
                                            f"{_show(scores)}, expected a list of {n} numbers")
    scores = list(scores)
    if len(scores) != n:
        return [None] * n, list(range(n)), (f"reward {name!r}: returned {len(scores)} scores for {n} "
                                            "completions (one per completion expected)")
    out: list[float | None] = []
    bad: list[int] = []
    problem = None
    for i, value in enumerate(scores):
        if value is None:
            out.append(None)
            continue
        what = None
        if hasattr(value, "item") and not isinstance(value, numbers.Real):  # a 0-d tensor / array
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            what = f"is {type(value).__name__} {_show(value)}, not a number"
        elif not math.isfinite(float(value)):
            what = f"is {float(value)}"
        if what is None:
            out.append(float(value))
            continue
        out.append(None)
        bad.append(i)
        problem = problem or f"reward {name!r}: sample {i}: score {what}"
    if len(bad) > 1:
        problem = f"{problem} ({len(bad)} of {n} samples bad)"
    return out, bad, problem


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@contextmanager
def _interrupts_raise() -> Iterator[None]:
    """While inside: SIGINT/SIGTERM first reach the previous handler, then raise RewardInterrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum, frame):
        before = previous.get(signum)
        if callable(before):
            try:
                before(signum, frame)
            except KeyboardInterrupt:
                pass
        raise RewardInterrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


class RewardGuard:
    """Calls reward functions with checks, a policy and an optional per-call timeout (see module doc)."""

    def __init__(self, on_error: str = "raise", timeout: float | None = None, *,
                 warn: Callable[[str], None] = _stderr, max_abandoned: int = 4,
                 hint: str = "; set reward_on_error: zero or skip_group to continue past it") -> None:
        if on_error not in POLICIES:
            raise ValueError(f"reward_on_error must be one of {', '.join(POLICIES)}, got {on_error!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"reward_timeout must be > 0, got {timeout}")
        self.on_error, self.timeout, self.warn, self.max_abandoned = on_error, timeout, warn, max_abandoned
        self.abandoned = 0
        self.hint = hint  # appended to a raised error: how to get past it (the trainer's policy key)
        self._counts = {"errors": 0, "bad_samples": 0}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ one call

    def _invoke(self, name: str, fn: Callable, prompts: list, completions: list, columns: dict) -> Any:
        if self.timeout is None:
            return invoke(fn, prompts, completions, **columns)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = invoke(fn, prompts, completions, **columns)
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
        deadline = time.monotonic() + self.timeout
        thread.start()
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(min(0.05, max(0.0, deadline - time.monotonic())))  # short waits: signals get through
        if thread.is_alive():
            self.abandoned += 1
            raise TimeoutError(f"no result after {self.timeout:g}s (reward_timeout)")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def score(self, name: str, fn: Callable, prompts: list, completions: list,
              **columns: Any) -> tuple[list[float | None], list[int]]:
        """One function's scores for all completions, and the indices flagged for skip_group."""
        n = len(completions)
        try:
            with _interrupts_raise():
                raw = self._invoke(name, fn, prompts, completions, columns)
            scores, bad, problem = check_scores(name, raw, n)
        except RewardInterrupted:
            raise
        except Exception as e:
            scores, bad = [None] * n, list(range(n))
            what = str(e).splitlines()[0] if str(e) else ""
            kind = "timed out" if isinstance(e, TimeoutError) else f"raised {type(e).__name__}"
            problem = f"reward {name!r} {kind}{f': {what}' if what else ''} (on samples 0..{n - 1})"
        if self.abandoned >= self.max_abandoned:
            raise RewardFunctionError(f"reward {name!r}: {self.abandoned} calls timed out and still run in "
                                      "abandoned threads; stopping")
        if problem is None:
            return scores, []
        return self._apply_policy(name, problem, scores, bad)

    def _apply_policy(self, name: str, problem: str, scores: list[float | None],
                      bad: list[int]) -> tuple[list[float | None], list[int]]:
        if self.on_error == "raise":
            raise RewardFunctionError(problem + self.hint)
        self._counts["errors"] += 1
        self._counts["bad_samples"] += len(bad)
        action = "scored 0" if self.on_error == "zero" else "their groups skipped"
        self._warn_once(name + problem.split(":")[0], f"WARNING: {problem}; {action} (reward_on_error: "
                                                      f"{self.on_error}; warned once, counted in rewards/fn_errors)")
        if self.on_error == "zero":
            bad_set = set(bad)
            return [0.0 if i in bad_set else s for i, s in enumerate(scores)], []
        return scores, bad

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    # ------------------------------------------------------------------ all functions of a step

    def score_all(self, fns: Sequence[tuple[str, Callable]], prompts: list, completions: list,
                  **columns: Any) -> tuple[dict[str, list[float | None]], list[bool]]:
        """Scores of every (name, fn) and a per-sample skip flag (reward_on_error: skip_group).

        A sample that no function scored (all returned None) is a problem of its own: a sum over
        nothing would silently make it reward 0.
        """
        n = len(completions)
        per_fn: dict[str, list[float | None]] = {}
        skip = [False] * n
        for name, fn in fns:
            per_fn[name], bad = self.score(name, fn, prompts, completions, **columns)
            for i in bad:
                skip[i] = True
        if per_fn:
            unscored = [i for i in range(n) if not skip[i] and all(s[i] is None for s in per_fn.values())]
            if unscored:
                names = ", ".join(repr(name) for name in per_fn)
                problem = (f"reward {names}: sample {unscored[0]}: returned None (no function scored it; "
                           f"{len(unscored)} of {n} samples)")
                first = next(iter(per_fn))
                per_fn[first], bad = self._apply_policy(first, problem, per_fn[first], unscored)
                for i in bad:
                    skip[i] = True
        if any(skip):  # the trainer drops their groups and counts them (rewards/skipped_samples)
            for scores in per_fn.values():
                for i in range(n):
                    if skip[i]:
                        scores[i] = None
        return per_fn, skip

    def pop_counters(self) -> dict[str, float]:
        """Counts since the last pop, keyed for logging; then reset."""
        out = {"rewards/fn_errors": float(self._counts["errors"]),
               "rewards/fn_bad_samples": float(self._counts["bad_samples"])}
        self._counts = dict.fromkeys(self._counts, 0)
        return out
