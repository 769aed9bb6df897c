"""The asynchronous rollout process's handle (max_staleness >= 1): spawn it, send it the run, take its step
batches, stop it. No torch at import, on purpose: `looprl train` spawns the process right after its config
check, before it imports torch itself, so the child's interpreter start and imports (seconds) run while
the trainer's do (`spawn_early` / `claim`). What runs inside the process is rl/async_rollout.py.

- Not a daemon: a daemon may not start processes, and reward code there may (the math verifier's pool).
  `close()` stops it; it is registered with atexit, ahead of multiprocessing's own exit hook (which joins
  non-daemon children), so an interpreter that exits without `close()` does not wait on it forever.
- Spawn re-imports the launching script in the child. A script that trains at top level (no
  `if __name__ == "__main__":`) would start a second run there: `refuse_training_here()`, called first by
  `Trainer`, ends that child at once with one line naming the guard, and the trainer says the same.
- The run (the ProducerSpec and the shared weight buffers) goes through a pipe after the spawn, so the
  spawn's own payload stays small and the parent never blocks writing it to a child that died.
"""

from __future__ import annotations

import atexit
import os
import sys
import time

from rewards.guard import RewardFunctionError

PROCESS_NAME = "looprl-rollout"


class ProducerFailed(RuntimeError):
    """The producer process failed or died (the trainer stops with this one line)."""


class RolloutProcess:
    """The spawned producer and what it shares with the trainer: the step-batch queue (max_staleness + 1
    deep), the stop event, the weight buffers' lock and version counter, the pipe the run goes through."""

    def __init__(self, max_staleness: int):
        import multiprocessing

        self.ctx = ctx = multiprocessing.get_context("spawn")
        self.max_staleness = max_staleness
        self.lock = ctx.Lock()  # a lock travels only at spawn: made with the process, the buffers later
        self.version = ctx.Value("q", -1, lock=False)
        self.queue = ctx.Queue(maxsize=max_staleness + 1)
        self.stop = ctx.Event()
        self.killed = False  # close() had to kill it
        inbox, self.outbox = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child_main, name=PROCESS_NAME, daemon=False,
                                   args=(inbox, self.lock, self.version, self.queue, self.stop, os.getpid()))
        atexit.register(self.close)  # runs before multiprocessing's own exit hook, which would join it
        try:
            self.process.start()
        except (BrokenPipeError, EOFError, ConnectionError) as e:  # it died reading its start-up data
            self.close()
            raise ProducerFailed(f"the rollout process exited while starting ({type(e).__name__}){_spawn_hint()}"
                                 ) from None
        finally:
            inbox.close()  # the child has its own: a send to a dead child then fails instead of blocking

    def send(self, run) -> None:
        """The run (spec, weight names, shared tensors): the producer waits for it after its imports."""
        try:
            self.outbox.send(run)
        except (BrokenPipeError, ConnectionError, EOFError):
            self.process.join(timeout=1)
            raise ProducerFailed(f"the rollout process exited (code {self.process.exitcode}) before the run "
                                 f"reached it{_spawn_hint()}") from None

    def take(self, step: int):
        """The producer's StepBatch for `step` and the seconds waited for it. RewardFunctionError as the
        producer met it; ProducerFailed when it failed or died."""
        import queue as queue_module

        t0 = time.perf_counter()
        while True:
            try:
                batch = self.queue.get(timeout=0.1)
                break
            except queue_module.Empty:
                if not self.process.is_alive():
                    raise ProducerFailed(f"the rollout process exited (code {self.process.exitcode}) before step "
                                         f"{step + 1}'s samples{_spawn_hint()}") from None
        waited = time.perf_counter() - t0
        if batch.error:
            raise RewardFunctionError(batch.error)
        if batch.failure:
            raise ProducerFailed(f"the rollout process failed: {batch.failure}")
        if batch.step != step:  # one batch per step, in order: anything else is a bug
            raise ProducerFailed(f"the rollout process sent step {batch.step + 1}'s samples for step {step + 1}")
        return batch, waited

    def queue_size(self) -> int:
        try:
            return self.queue.qsize()
        except NotImplementedError:  # macOS
            return -1

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def close(self) -> None:
        """Stop the producer and wait for it (idempotent): no process outlives the trainer."""
        if self.process is None:
            return
        import queue as queue_module

        atexit.unregister(self.close)
        self.outbox.close()
        self.stop.set()
        deadline = time.time() + 5  # then killed: it holds nothing to save (a peer may wait in a collective)
        while self.process.is_alive() and time.time() < deadline:
            try:  # a producer blocked on a full queue gets room to notice the stop
                self.queue.get(timeout=0.1)
            except queue_module.Empty:
                pass
            self.process.join(timeout=0.05)
        self.killed = self.process.is_alive()  # (tests: a producer that stops by itself is never killed)
        if self.killed:
            self.process.kill()
            self.process.join(timeout=10)
        self.queue.cancel_join_thread()
        self.queue.close()
        self.process = None


def _child_main(inbox, lock, version, queue, stop, parent_pid: int) -> None:
    import importlib

    # by name: rl/async_rollout.py imports this module, never the other way round (torch and the roles
    # load here, in the child: its start-up work)
    importlib.import_module("rl.async_rollout").producer_main(inbox, lock, version, queue, stop, parent_pid)


# ----------------------------------------------------------------------------- spawned early

_EARLY: RolloutProcess | None = None


def spawn_early(max_staleness: int) -> None:
    """`looprl train`, right after its config check: the process for the Trainer to `claim`."""
    global _EARLY
    if max_staleness >= 1 and _EARLY is None:
        _EARLY = RolloutProcess(max_staleness)


def claim(max_staleness: int) -> RolloutProcess:
    """The process spawned early for this run if there is a live one with the same queue depth; else a new one."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is not None and early.max_staleness == max_staleness and early.alive():
        return early
    if early is not None:
        early.close()
    return RolloutProcess(max_staleness)


def discard_early() -> None:
    """Stop a process spawned early that no Trainer claimed (the run was refused before it got there)."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is not None:
        early.close()


# ----------------------------------------------------------------------------- the __main__ guard

def refuse_training_here() -> None:
    """In a producer process, a run being started is the launching script re-imported by spawn: say so in one
    line and end this process at once (no exit hooks: nothing of it is worth keeping, and a hook or thread
    could keep it alive)."""
    import multiprocessing

    if multiprocessing.current_process().name != PROCESS_NAME:  # set before spawn re-imports the script
        return
    script = sys.argv[0] if sys.argv and sys.argv[0] else "the launching script"  # runpy sets it to the script
    print(f"looprl train: rollout process: {script} started a run when this process imported it (spawn re-imports "
          "the launching script); start training under `if __name__ == \"__main__\":`", file=sys.stderr, flush=True)
    os._exit(1)


def unspawnable_main() -> str | None:
    """Why spawn cannot start the rollout process from this interpreter (None: it can). Spawn re-imports the
    launching script by its path; a script read from stdin (`python - <<EOF`) has none."""
    import __main__

    script = getattr(__main__, "__file__", None)
    if script and getattr(__main__, "__spec__", None) is None and not os.path.isfile(script):
        return (f"the rollout process is spawned and re-imports the launching script, which it cannot do for "
                f"{script!r} (read from stdin?): save the script to a file and run that, or use max_staleness 0")
    return None


def _spawn_hint() -> str:
    """The rollout process is started with spawn, which re-imports the launching script: a script that builds
    and trains a Trainer at top level then starts a second run in the child (refused: refuse_training_here)."""
    import __main__
    script = getattr(__main__, "__file__", None)
    if not script or getattr(__main__, "__spec__", None) is not None:  # `python -m rl`, a REPL, a notebook
        return ""
    return (f" (if {script} starts training at top level, put it under `if __name__ == \"__main__\":` -- "
            "the rollout process re-imports the script)")
