"""Hard time limits and the reusable worker pool: a stuck verification is cut off, counted, and scored
as wrong; a crashing or raising task never takes the run down; the pool survives and is reused."""

from __future__ import annotations

import os
import threading
import time

import pytest

import rewards
from rewards.math import get_pool, verify_batch
from rewards.pool import WorkerPool

PATHOLOGICAL = "Answer: $9^{9^{9^{9}}}$"  # sympy tries to evaluate this power for ever


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(num_workers=1) as p:
        yield p


def test_injected_slow_task_hits_the_limit_quickly(pool: WorkerPool) -> None:
    start = time.monotonic()
    results = pool.map(time.sleep, [(60,), (0.01,)], timeout=0.5)
    assert results[0].timed_out and not results[0].ok and "timed out after 0.5 s" in results[0].error
    assert results[1].ok and not results[1].timed_out
    assert time.monotonic() - start < 15
    assert pool.restarts >= 1


def test_raising_and_crashing_tasks_become_errors(pool: WorkerPool) -> None:
    raised = pool.map(int, [("not a number",)], timeout=10)[0]
    assert not raised.ok and not raised.timed_out and raised.error.startswith("ValueError")
    restarts = pool.restarts
    died = pool.map(os._exit, [(3,)], timeout=10)[0]
    assert not died.ok and "died" in died.error
    assert pool.restarts == restarts + 1
    assert pool.map(abs, [(-2,)], timeout=10)[0].value == 2  # the pool carries on


def test_pathological_answer_times_out_and_is_counted() -> None:
    rewards.pop_counters()
    before = rewards.counters().get("timeouts", 0)
    logged: dict[str, float] = {}
    start = time.monotonic()
    scores = rewards.get("dapo_math", timeout=1.0)(None, [PATHOLOGICAL, "Answer: 5", "Answer: 2^3"],
                                                   ground_truth=["5", "5", "8"], log_metric=logged.__setitem__)
    assert scores == [-1.0, 1.0, 1.0]
    assert time.monotonic() - start < 20
    assert rewards.counters()["timeouts"] == before + 1
    assert logged["rewards/timeouts"] == 1.0
    assert rewards.pop_counters()["rewards/timeouts"] == 1.0
    verdict = rewards.explain(PATHOLOGICAL, "5", timeout=1.0)
    assert (verdict.correct, verdict.path) == (False, "timeout")


def test_pool_is_reused_across_calls() -> None:
    verify_batch(["Answer: \\sqrt{4}"], ["2"])
    first = get_pool()
    pids = [w.process.pid for w in first._workers]
    verify_batch(["Answer: \\sqrt{9}", "Answer: 2^4"], ["3", "16"])
    assert get_pool() is first
    assert [w.process.pid for w in first._workers] == pids


def test_symbolic_check_works_off_the_main_thread() -> None:
    """math-verify's own signal timeout fails in threads; ours does not depend on signals."""
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(verify_batch(["Answer: \\frac{\\sqrt{2}}{2}"],
                                                                     ["\\frac{1}{\\sqrt{2}}"], timeout=20)))
    thread.start()
    thread.join(60)
    assert out and out[0].correct and out[0].path in ("symbolic", "cached")


def test_configure_validates() -> None:
    with pytest.raises(ValueError, match="workers"):
        rewards.configure(workers=0)
    with pytest.raises(ValueError, match="timeout"):
        rewards.configure(timeout=0)


def test_a_worker_that_cannot_start_is_a_clear_error() -> None:
    with WorkerPool(num_workers=1, preload=("no_such_module_for_looprl",)) as broken:
        with pytest.raises(RuntimeError, match="could not start: ModuleNotFoundError"):
            broken.map(abs, [(1,)], timeout=5)
