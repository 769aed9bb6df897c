"""rewards.guard: every way a user reward function misbehaves ends in one line naming the function, the
first bad sample and the problem, or follows reward_on_error; a hung function is bounded by reward_timeout;
a signal inside a reward function stops it at once."""

import math
import os
import signal
import time

import pytest

from rewards.guard import RewardFunctionError, RewardGuard, RewardInterrupted, check_scores

COMPLETIONS = ["a", "b", "c", "d"]


def fixed(values):
    def fn(prompts, completions, **kw):
        return values

    fn.__name__ = "my_fn"
    return fn


def boom(prompts, completions, **kw):
    raise KeyError("answer")


def hang(prompts, completions, **kw):
    time.sleep(30)
    return [1.0] * len(completions)


@pytest.mark.parametrize("values,expect", [
    ([1.0, None, 2, 0.5], None),  # None = not applicable (TRL), ints are fine
    ([1.0, float("nan"), 1.0, float("inf")], "sample 1: score is nan (2 of 4 samples bad)"),
    ([1.0, 1.0, "0.5", 1.0], "sample 2: score is str '0.5', not a number"),
    ([1.0, 1.0], "returned 2 scores for 4 completions"),
    (None, "returned NoneType None, expected a list of 4 numbers"),
    ("1111", "returned str '1111'"),
    ([True, 1.0, 1.0, 1.0], "sample 0: score is bool True"),
])
def test_check_scores_names_function_sample_and_problem(values, expect):
    scores, bad, problem = check_scores("my_fn", values, 4)
    assert len(scores) == 4
    if expect is None:
        assert problem is None and bad == [] and scores == [1.0, None, 2.0, 0.5]
    else:
        assert problem.startswith("reward 'my_fn'") and expect in problem and "\n" not in problem
        assert bad


@pytest.mark.parametrize("fn,expect", [
    (boom, "reward 'boom' raised KeyError: 'answer' (on samples 0..3)"),
    (fixed([1.0, None, None, None]), None),  # a None some other function scores is fine: covered below
    (fixed([1.0, math.nan, 1.0, 1.0]), "sample 1: score is nan"),
])
def test_raise_policy_is_one_line(fn, expect):
    guard = RewardGuard("raise")
    if expect is None:
        assert guard.score("my_fn", fn, [None] * 4, COMPLETIONS)[0] == [1.0, None, None, None]
        return
    with pytest.raises(RewardFunctionError) as info:
        guard.score(fn.__name__, fn, [None] * 4, COMPLETIONS)
    assert expect in str(info.value) and "reward_on_error" in str(info.value) and "\n" not in str(info.value)


def test_all_none_sample_is_an_error_unless_another_function_scores_it():
    guard = RewardGuard("raise")
    half = fixed([1.0, None, 1.0, None])
    with pytest.raises(RewardFunctionError, match=r"reward 'a': sample 1: returned None .*2 of 4"):
        guard.score_all([("a", half)], [None] * 4, COMPLETIONS)
    per_fn, skip = guard.score_all([("a", half), ("b", fixed([0.0] * 4))], [None] * 4, COMPLETIONS)
    assert per_fn["a"] == [1.0, None, 1.0, None] and skip == [False] * 4


def test_zero_and_skip_group_policies_warn_once_and_count():
    warnings = []
    guard = RewardGuard("zero", warn=warnings.append)
    nan_fn = fixed([1.0, math.nan, 1.0, 1.0])
    for _ in range(2):
        per_fn, skip = guard.score_all([("my_fn", nan_fn)], [None] * 4, COMPLETIONS)
        assert per_fn["my_fn"] == [1.0, 0.0, 1.0, 1.0] and skip == [False] * 4
    assert len(warnings) == 1 and "sample 1" in warnings[0] and "scored 0" in warnings[0]
    assert guard.pop_counters()["rewards/fn_errors"] == 2

    guard = RewardGuard("skip_group", warn=warnings.append)
    per_fn, skip = guard.score_all([("boom", boom), ("ok", fixed([1.0] * 4))], [None] * 4, COMPLETIONS)
    assert skip == [True] * 4 and per_fn["ok"] == [None] * 4  # skipped samples carry no score
    assert guard.pop_counters()["rewards/fn_bad_samples"] == 4


def test_timeout_bounds_a_hung_function_and_stops_after_repeated_hangs():
    guard = RewardGuard("zero", timeout=0.3, warn=lambda m: None, max_abandoned=2)
    start = time.monotonic()
    scores, _ = guard.score("hang", hang, [None] * 4, COMPLETIONS)
    assert scores == [0.0] * 4 and time.monotonic() - start < 5
    with pytest.raises(RewardFunctionError, match="2 calls timed out"):
        guard.score("hang", hang, [None] * 4, COMPLETIONS)
    with pytest.raises(RewardFunctionError, match=r"reward 'hang' timed out: no result after 0.3s"):
        RewardGuard("raise", timeout=0.3).score("hang", hang, [None] * 4, COMPLETIONS)


@pytest.mark.parametrize("timeout", [None, 5.0])  # on the main thread, and in the worker thread
def test_signal_inside_a_reward_function_interrupts_it(timeout):
    seen = []

    def trainer_handler(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, trainer_handler)

    def hang_after_signal(prompts, completions, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return [1.0] * len(completions)

    try:
        start = time.monotonic()
        with pytest.raises(RewardInterrupted):
            RewardGuard(timeout=timeout).score("h", hang_after_signal, [None] * 4, COMPLETIONS)
        assert time.monotonic() - start < 5
        assert seen == [signal.SIGTERM]  # the previous handler (the trainer's) saw it too
        assert signal.getsignal(signal.SIGTERM) is trainer_handler  # and is back in place
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_cli_prints_the_verifier_reason_only_for_verifier_functions(capsys):
    from rl.reward_cli import main

    assert main(["--fn", "overlong_penalty", "--completion", "x" * 9, "--answer", "1",
                 "--option", "max_completion_length=10", "--option", "buffer_len=4"]) == 0
    out = capsys.readouterr().out
    assert "score: -0.75" in out and "reason" not in out and "extracted" not in out
    assert main(["--fn", "math_accuracy", "--completion", "Answer: 1", "--answer", "1"]) == 0
    assert "reason:" in capsys.readouterr().out


def test_the_one_scoring_call_goes_through_the_guard():
    """rewards.scoring (trainer's Scorer and eval alike): strict by default, the run's policy when given."""
    from rewards.scoring import score_completions, score_functions

    nan_second = fixed([1.0, float("nan"), 0.0, 1.0])
    common = dict(columns={}, completion_ids=[[1]] * 4, truncated=[False] * 4, max_completion_length=8)
    with pytest.raises(RewardFunctionError, match=r"^reward 'my_fn': sample 1: score is nan$"):
        score_completions(nan_second, [None] * 4, COMPLETIONS, **common)  # eval: no trainer hint
    guard = RewardGuard("zero", warn=lambda m: None)
    assert score_completions(nan_second, [None] * 4, COMPLETIONS, guard=guard, **common) == [1.0, 0.0, 0.0, 1.0]
    per_fn, skip = score_functions([("my_fn", nan_second)], [None] * 4, COMPLETIONS,
                                   guard=RewardGuard("skip_group", warn=lambda m: None), **common)
    assert skip == [False, True, False, False] and per_fn["my_fn"][1] is None
