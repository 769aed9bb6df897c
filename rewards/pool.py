"""A small, reusable process pool with a HARD per-task time limit.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop a task that never returns (a sympy
simplification of `9^{9^{9^9}}` runs for ever), and math-verify's own timeout uses `signal.alarm`,
which only works on the main thread of the main interpreter. Here each worker is one process talking
over a pipe; a task past its deadline gets its worker killed and replaced, and is reported as timed
out. Workers import the verifier modules and say "ready" before they receive work, so start-up time
never counts against a task's limit.

Start method: "fork" by default on POSIX. It starts in milliseconds and, unlike "spawn"/"forkserver",
does not re-run the user's `__main__` in every worker (a script without an `if __name__ == "__main__"`
guard would recurse, and `python -m rl` would re-import torch per worker). The workers only run
pure-Python sympy code, so forking a parent that holds torch threads is the same trade-off as a
torch DataLoader. Override with `LOOPRL_VERIFY_START_METHOD=spawn|forkserver`.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_READY = "__ready__"


@dataclass
class TaskResult:
    """Outcome of one task: `value` when ok, else `error` (a one-line message) and maybe `timed_out`."""

    ok: bool
    value: Any = None
    error: str | None = None
    timed_out: bool = False


def _worker_main(conn: Connection, preload: Sequence[str], parent_pid: int) -> None:
    """Worker loop: receive (fn, args), send back ("ok", value) or ("err", message). Never raises.
    Exits when the parent is gone (a forked child may hold copies of the parent's pipe ends).
    SIGINT/SIGTERM are ignored: Ctrl-C or `timeout`/Slurm signal the whole process group, and the parent
    decides (finishes its step, then closes the pool, which kills the workers); a forked worker would
    otherwise run the trainer's inherited handler or print a KeyboardInterrupt traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        for module in preload:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (a setup problem, e.g. math-verify missing: tell the parent)
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(_READY)
    while True:
        try:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, args = task
        try:
            if isinstance(fn, str):  # "module:function", resolved here so the parent needn't import it
                module_name, _, name = fn.partition(":")
                fn = getattr(importlib.import_module(module_name), name)
            conn.send(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001  (anything a verifier throws scores as an error)
            conn.send(("err", f"{type(exc).__name__}: {exc}"[:500]))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, preload: Sequence[str]) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, tuple(preload), os.getpid()),
                                   daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (result index, deadline) while busy

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """`num_workers` long-lived processes; `map(fn, args_list, timeout)` keeps all of them busy.

    `fn` must be picklable (a module-level function) or a "module:function" name. A task that exceeds
    `timeout` seconds, or whose worker dies, yields a failed TaskResult instead of an exception; the
    pool replaces the worker and carries on. The pool is meant to be created once and reused (see `rewards.math.get_pool`).
    """

    def __init__(self, num_workers: int = 2, start_method: str | None = None,
                 preload: Sequence[str] = ("rewards.pool", "rewards.symbolic"),
                 startup_timeout: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"WorkerPool: num_workers must be >= 1, got {num_workers}")
        default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(start_method or os.environ.get("LOOPRL_VERIFY_START_METHOD", default))
        self._preload = tuple(preload)
        self.num_workers = num_workers
        self.startup_timeout = startup_timeout
        self.restarts = 0
        self._workers = [_Worker(self._ctx, self._preload) for _ in range(num_workers)]
        # workers ignore SIGTERM: they must be gone before multiprocessing's own exit hook (registered
        # earlier, so run later) would terminate() and join() them for ever
        atexit.register(self.close)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self.restarts += 1
        fresh = _Worker(self._ctx, self._preload)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def map(self, fn: Callable[..., Any] | str, args_list: Sequence[tuple], timeout: float) -> list[TaskResult]:
        """Run fn(*args) for every args tuple; at most `timeout` seconds each, counted from dispatch.
        `fn` is a picklable callable or a "module:function" name that the workers import.
        An exception from a signal handler (Ctrl-C / SIGTERM in the trainer) propagates, never a failed task."""
        if self._workers is None:
            raise RuntimeError("WorkerPool.map called after close()")
        try:
            return self._map(fn, args_list, timeout)
        except BaseException:
            # interrupted mid-map: a busy worker computes a task nobody waits for, or holds half a message;
            # replacing it keeps the pool usable for the next call
            for worker in list(self._workers or []):
                if worker.task:
                    self._replace(worker)
            raise

    def _map(self, fn: Callable[..., Any] | str, args_list: Sequence[tuple], timeout: float) -> list[TaskResult]:
        results: list[TaskResult | None] = [None] * len(args_list)
        pending = deque(range(len(args_list)))
        started = time.monotonic()
        while pending or any(w.task for w in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    index = pending.popleft()
                    worker.task = (index, time.monotonic() + timeout)  # busy from the first byte written
                    try:
                        worker.conn.send((fn, args_list[index]))
                    except OSError as exc:  # the worker died since its last answer
                        results[index] = TaskResult(False, error=f"verifier worker died: {exc}")
                        self._replace(worker)
                        continue
                    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # unpicklable: nothing written
                        worker.task = None
                        results[index] = TaskResult(False, error=f"could not send task: {exc}")
                        continue
            now = time.monotonic()
            deadlines = [w.task[1] for w in self._workers if w.task]
            if not any(w.ready for w in self._workers) and now - started > self.startup_timeout:
                raise RuntimeError(f"verifier workers did not start within {self.startup_timeout:.0f} s")
            wait_for = max(0.0, min(deadlines) - now) if deadlines else 0.5
            ready_conns = wait([w.conn for w in self._workers], timeout=wait_for)
            for worker in list(self._workers):
                if worker.conn in ready_conns:
                    self._receive(worker, results)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task and now >= worker.task[1]:
                    index = worker.task[0]
                    results[index] = TaskResult(False, error=f"timed out after {timeout:g} s", timed_out=True)
                    self._replace(worker)
        return [r if r is not None else TaskResult(False, error="no result") for r in results]

    def _receive(self, worker: _Worker, results: list[TaskResult | None]) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (segfault, OOM kill, ...)
            if worker.task:
                results[worker.task[0]] = TaskResult(False, error="verifier worker died")
            self._replace(worker)
            return
        if message == _READY:
            worker.ready = True
            return
        if message[0] == "fatal":  # restarting would fail the same way: a setup error, not a bad item
            raise RuntimeError(f"verifier worker could not start: {message[1]}")
        if worker.task is None:
            return
        index = worker.task[0]
        worker.task = None
        status, payload = message
        results[index] = TaskResult(True, value=payload) if status == "ok" else TaskResult(False, error=payload)

    def close(self) -> None:
        if self._workers is None:
            return
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.process.join(timeout=1)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=1)
            worker.conn.close()
        self._workers = None
        atexit.unregister(self.close)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
