"""Asynchronous rollouts (config key `max_staleness` = k >= 1): a producer process samples and scores the
next steps' groups while the trainer updates on the current one.

Design (docs/ARCHITECTURE.md has the picture, docs/OBJECTIVE.md the off-policy objective):

- The producer (`producer_main`, a torch.multiprocessing *spawn* child) has its own copy of the model, a
  torch rollout worker around it, the run's Scorer (reward functions are sent by spec and imported there:
  `check_sendable` refuses what cannot be), the prompt sampler and a step counter. For step s it runs
  the trainer's rounds (rl/rounds.py: same seeds per (step, round)) under dynamic sampling
  (rl/dynamic_sampling.py), tags every group with the policy version that sampled it and puts a
  `StepBatch` on a bounded queue (k + 1 steps).
- Versions: the weights of version v include the updates of the first v steps, so step s (0-based: the
  trainer's global_step before it) updates weights of version s. A sample of version v used at step s is
  s - v versions stale.
- The bound, twice: the producer starts a round of step s only once it holds weights of version >= s - k
  (it waits for them), so it runs at most k steps ahead; and the trainer drops any group with s - v > k
  (counted in async/dropped_stale), so nothing older reaches the update whatever the producer did.
- Weights: after every step the trainer copies its parameters into one shared-memory buffer
  (`SharedWeights`: a lock and a version counter; time/weight_sync), and the producer copies them into its
  model before a round (between generate calls, never during one): one copy each side, nothing pickled.
- Checkpoints save nothing in flight. Each StepBatch carries the prompt sampler's state after its prompts;
  the trainer adopts it as its own sampler state, which checkpoints save. `--resume` restarts the
  producer at the checkpoint's step from that state and the checkpoint's weights: every step's prompts
  are the data order's next ones, none repeated or skipped (groups in flight at the stop were sampled,
  never trained, and are sampled again from the checkpoint's weights).
- Stopping: the producer ignores SIGINT/SIGTERM (the trainer finishes its step, checkpoints and stops
  it: nothing of the producer needs saving); a signal that lands inside a reward function there (the
  reward guard turns it into RewardInterrupted) only makes it sample that round again. It dies with
  its parent (kill -9): Linux's parent-death signal, elsewhere the pid checks of its waits.
- The process itself (spawned early, not a daemon, the `__main__` guard): rl/rollout_process.py.
- Several training processes (DDP): one producer per process, each rolling out its share of every
  round's prompts; the producers agree on failures and gather the groups over their own gloo group, as
  the trainer's processes do synchronously, so every process gets the same StepBatch.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import rewards
from looped.adapters import merged_named_parameters
from rewards.guard import RewardFunctionError, RewardInterrupted
from rl.config import ConfigError, TrainConfig
from rl.dynamic_sampling import SamplingResult, collect_groups
from rl.rollout_process import RolloutProcess
from rl.rounds import RoundRoles, sample_round
from rollout.base import checkpoint_name

POLL_S = 0.005  # how often the producer looks for newer weights while it waits for them


class ProducerStopped(Exception):
    """The producer was asked to stop (or lost its parent) while waiting."""


def check_sendable(cfg: TrainConfig) -> None:
    """max_staleness >= 1 scores in the producer process: every reward function (and accuracy_reward)
    must reach it by pickling (a registry name, 'pkg.module:function', or a module-level function).
    ConfigError naming the function otherwise (a lambda or a local function from the Python API)."""
    for key, specs in (("rewards", cfg.reward_specs()), ("accuracy_reward", [cfg.accuracy_reward])):
        names = rewards.reward_ids(specs)  # the run's names for them (a lambda: lambda_<position>)
        for spec, name in zip(specs, names):
            try:
                pickle.dumps(spec)
            except Exception as e:  # PicklingError, AttributeError (local objects), TypeError
                raise ConfigError(f"config key 'max_staleness': reward function {name!r} "
                                  f"(config key {key!r}) cannot be sent to the rollout process ({type(e).__name__}); "
                                  "give it as 'pkg.module:function' or a module-level function, or use "
                                  "max_staleness 0") from None


class SharedWeights:
    """The trainer's newest weights in shared memory with their version; written and read under a lock.

    Names and values are the rollout model's own (LoRA: merged W + delta under the base names,
    looped.adapters.merged_named_parameters), so the producer's plain model takes them as they are."""

    def __init__(self, lock, version):  # made with the process (RolloutProcess); the buffers come later
        self.lock = lock
        self._version = version
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []

    def allocate(self, module) -> tuple[list[str], list[torch.Tensor]]:
        """The shared buffers, holding `module`'s weights now; returns them (names, tensors) for the producer."""
        named = [(checkpoint_name(n), t.detach().to("cpu", copy=True)) for n, t in merged_named_parameters(module)]
        self.names = [n for n, _ in named]
        self.tensors = [t.share_memory_() for _, t in named]
        return self.names, self.tensors

    def adopt(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        """The producer's side of `allocate`: the same shared buffers."""
        self.names, self.tensors = names, tensors

    @property
    def version(self) -> int:
        return int(self._version.value)

    @torch.no_grad()
    def publish(self, module, version: int, *, changed: bool = True) -> float:
        """Make `module`'s weights version `version` (changed=False: the same weights, a new version).
        Returns the seconds taken (lock wait + copy)."""
        t0 = time.perf_counter()
        with self.lock:
            if changed:
                for dst, (_, src) in zip(self.tensors, merged_named_parameters(module), strict=True):
                    dst.copy_(src)
            self._version.value = version
        return time.perf_counter() - t0

    @torch.no_grad()
    def load_into(self, model) -> tuple[int, float]:
        """Copy the newest weights into `model`; returns (their version, seconds)."""
        t0 = time.perf_counter()
        params = dict(model.named_parameters())
        missing = set(params) - set(self.names)
        if missing:
            raise RuntimeError(f"the rollout copy has parameters the trainer does not send: {sorted(missing)[:3]}")
        with self.lock:
            for name, src in zip(self.names, self.tensors):
                params[name].copy_(src)
            version = self.version
        return version, time.perf_counter() - t0


@dataclass
class ProducerSpec:
    """Everything the producer process needs about the run (sent to it when `AsyncRollouts` is made)."""

    cfg: TrainConfig
    model_path: str
    depth: int
    tokenizer: Any
    dataset: Any
    prompt_limit_why: str | None
    eos_token_id: Any
    pad_token_id: int
    device: str
    start_step: int
    sampler_state: dict
    threads: int
    rank: int = 0  # the training process it serves; with several, the producers form their own gloo group
    world: int = 1
    group_address: str | None = None  # tcp://host:port of that group (world > 1)
    throttle: bool = True  # False only in tests: the producer then runs ahead as far as the queue allows


@dataclass
class StepBatch:
    """One step's groups from the producer (or why there are none: `error` / `failure`)."""

    step: int
    result: SamplingResult | None = None
    sampler_after: dict = field(default_factory=dict)  # the prompt sampler's state after this step's prompts
    timers: dict[str, float] = field(default_factory=dict)  # rollout / reward seconds (+ speculative counts)
    counters: dict[str, float] = field(default_factory=dict)  # verifier and reward-guard counts of this step
    load_s: float = 0.0  # producer seconds copying weights in for this step
    error: str | None = None  # a reward function failed (reward_on_error: raise): its line
    failure: str | None = None  # the producer itself failed: why


def _log(msg: str) -> None:
    print(f"looprl train: rollout process: {msg}", file=sys.stderr, flush=True)


def producer_main(inbox, lock, version, queue, stop, parent_pid: int) -> None:
    """The producer process: started while the trainer sets up (its imports run meanwhile), it receives the
    run (from `AsyncRollouts`), then puts steps' groups onto `queue` until `stop` is set or the parent is gone."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the trainer decides when to stop (module doc)
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    report = None
    try:
        _import_roles()
        spec, names, tensors = _receive(inbox, stop, parent_pid)
        weights = SharedWeights(lock, version)
        weights.adopt(names, tensors)
        _produce(spec, weights, queue, stop, parent_pid)
    except ProducerStopped:
        pass
    except RewardFunctionError as e:
        report = StepBatch(-1, error=str(e))
    except BaseException as e:  # noqa: BLE001 (reported to the trainer, which stops with it)
        report = StepBatch(-1, failure=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
    finally:
        # the verifier pool's workers ignore SIGTERM and its atexit close runs only after multiprocessing's
        # exit hook of this process, which would terminate() and then join() them for ever: closed here
        rewards.shutdown()
        if torch.distributed.is_initialized():  # a gloo group left open can abort the process at exit
            torch.distributed.destroy_process_group()
    if report is not None:
        with contextlib.suppress(ProducerStopped):
            _put(queue, report, stop, parent_pid)


def _import_roles() -> None:
    """What the producer's roles import (transformers, the worker, the Scorer): done before the run arrives,
    while the trainer loads its model and data, so the first rollout does not wait for it."""
    import rl.data  # noqa: F401
    import rl.model_io  # noqa: F401
    import rl.policy  # noqa: F401
    import rl.prompts  # noqa: F401
    import rl.scoring  # noqa: F401
    import rollout  # noqa: F401


def _receive(inbox, stop, parent_pid: int):
    while not inbox.poll(0.05):
        _check_alive(stop, parent_pid)
    try:
        return inbox.recv()
    except EOFError:  # the trainer closed before sending the run (its setup failed)
        raise ProducerStopped from None


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when the trainer dies (kill -9), even inside a collective or a
    long generate; elsewhere the waits' checks of the parent's pid are what notice it."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the call
        os._exit(0)


def _produce(spec: ProducerSpec, weights: SharedWeights, queue, stop, parent_pid: int) -> None:
    producer = _Producer(spec, weights, stop, parent_pid)
    step = spec.start_step
    while True:
        _put(queue, producer.step(step), stop, parent_pid)
        step += 1


class _Producer:
    """The producer process's roles: its model copy and worker, the Scorer, the prompt sampler (RoundRoles)."""

    def __init__(self, spec: ProducerSpec, weights: SharedWeights, stop, parent_pid: int):
        from transformers.utils import logging as hf_logging

        from rl.data import reward_columns
        from rl.model_io import load_model
        from rl.policy import disable_dropout
        from rl.prompts import PromptIds, PromptSampler
        from rl.scoring import Scorer
        from rollout import make_worker

        self.spec, self.cfg, self.weights, self.stop, self.parent_pid = spec, spec.cfg, weights, stop, parent_pid
        cfg = spec.cfg
        torch.set_num_threads(spec.threads)
        hf_logging.disable_progress_bar()  # the trainer loaded the same files already
        self.model = load_model(spec.model_path, "config key 'model'", dtype=getattr(torch, cfg.dtype))
        self.model.to(spec.device)
        disable_dropout(self.model)
        self.model.eval().requires_grad_(False)
        self.held, _ = weights.load_into(self.model)
        worker = make_worker(cfg.engine, depth=spec.depth, model=self.model, model_path=spec.model_path,
                             eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id, **cfg.engine_options())
        self.scorer = Scorer(cfg, columns=reward_columns(spec.dataset), warn=_log)
        self.sampler = PromptSampler(len(spec.dataset), cfg.seed)
        self.sampler.load_state_dict(spec.sampler_state)
        prompt_ids = PromptIds(spec.tokenizer, spec.dataset, cfg.max_prompt_length, cfg.prompt_suffix,
                               why=spec.prompt_limit_why)
        self.roles = RoundRoles(cfg, spec.depth, worker, self.scorer, spec.tokenizer, spec.dataset, prompt_ids,
                                self.sampler, spec.rank, spec.world, **_group_ops(spec))

    def step(self, step: int) -> StepBatch:
        """Step `step`'s groups: the trainer's rounds under dynamic sampling, each group tagged with its version."""
        cfg = self.cfg
        batch = StepBatch(step, timers={"rollout": 0.0, "reward": 0.0})
        batch.result = collect_groups(lambda round_, want: self._round(batch, round_, want), cfg.prompts_per_step,
                                      enabled=cfg.dynamic_sampling, max_rounds=cfg.max_rounds)
        batch.sampler_after = self.sampler.state_dict()
        counts = {**rewards.pop_counters(), **self.scorer.guard.pop_counters()}
        batch.counters = {k: float(v) for k, v in counts.items()}
        return batch

    def _round(self, batch: StepBatch, round_: int, want: int) -> list:
        weights = self.weights
        need = batch.step - self.cfg.max_staleness if self.spec.throttle else self.held
        while weights.version < need:  # the bound: at most max_staleness versions behind the step's weights
            _check_alive(self.stop, self.parent_pid)
            time.sleep(POLL_S)
        _check_alive(self.stop, self.parent_pid)
        if weights.version > self.held:  # the newest weights, between generate calls
            self.held, seconds = weights.load_into(self.model)
            batch.load_s += seconds
        at_start = self.sampler.state_dict()
        while True:
            try:
                return sample_round(self.roles, batch.step, round_, want, batch.timers, version=self.held)
            except RewardInterrupted:  # a signal meant for the trainer reached a reward function: sample again
                self.sampler.load_state_dict(at_start)


def _group_ops(spec: ProducerSpec) -> dict:
    """RoundRoles' any_true / gather over the producers of all training processes (their own gloo group)."""
    if spec.world == 1:
        return {}
    import torch.distributed as dist

    # a launcher's agent store is the trainers' (torchrun / accelerate set this): ours is hosted by rank 0
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    dist.init_process_group("gloo", init_method=spec.group_address, rank=spec.rank, world_size=spec.world)

    def any_true(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(groups: list) -> list:
        parts = [None] * spec.world
        dist.all_gather_object(parts, groups)
        return [g for part in parts for g in part]

    return {"any_true": any_true, "gather": gather}


def free_port() -> int:
    """A TCP port free on this host now (for the producers' process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _check_alive(stop, parent_pid: int) -> None:
    if stop.is_set() or os.getppid() != parent_pid:
        raise ProducerStopped


def _put(queue, item: StepBatch, stop, parent_pid: int) -> None:
    import queue as queue_module

    while True:
        _check_alive(stop, parent_pid)
        try:
            queue.put(item, timeout=0.1)
            return
        except queue_module.Full:
            continue


class AsyncRollouts:
    """The trainer's side of a run with asynchronous rollouts: the spawned process (rl/rollout_process.py),
    the shared weight buffers it reads, and the staleness filter."""

    def __init__(self, process: RolloutProcess, spec: ProducerSpec, module, version: int):
        """Send the run to `process` (spawned earlier): the spec and the shared buffers, which hold `module`'s
        weights as version `version`. ProducerFailed when the process is gone."""
        self.handle = process
        self.max_staleness = process.max_staleness
        self.weights = SharedWeights(process.lock, process.version)
        names, tensors = self.weights.allocate(module)
        self.weights.publish(module, version, changed=False)  # the buffers hold them already
        process.send((spec, names, tensors))

    def take(self, step: int) -> tuple[StepBatch, float]:
        return self.handle.take(step)

    def fresh(self, batch: StepBatch, step: int) -> tuple[list, list[int], int]:
        """The kept groups at most max_staleness versions behind `step` (the weights being updated), their
        staleness, and how many groups were dropped as too stale."""
        kept = [g for g in batch.result.kept if step - g.version <= self.max_staleness]
        return kept, [step - g.version for g in kept], len(batch.result.kept) - len(kept)

    def publish(self, module, version: int, changed: bool) -> float:
        return self.weights.publish(module, version, changed=changed)

    def queue_size(self) -> int:
        return self.handle.queue_size()

    def close(self) -> None:
        self.handle.close()
