"""`looprl train`: GRPO/DAPO with a fixed-depth rollout worker and a policy update at the SAME depth.

One step (`Trainer.step`, data flow in docs/ARCHITECTURE.md):
  1. sample: prompts -> rollout worker at depth T, n completions each (fp32 logprobs of what was sampled);
  2. score: weighted sum of reward functions (rl/scoring.py; per-function metrics kept);
  3. filter groups: groups whose rewards are all equal are dropped and refilled (rl/dynamic_sampling.py);
  4. advantages: within each group (rl/advantages.py registry);
  5. update: the policy at depth T (rl/policy.py), objective in rl/objective.py, loss in rl/losses.py;
  6. sync: the rollout worker gets the new weights; then log, checkpoint and eval (`Trainer.train`).

Everything random is seeded from (seed, step, round, process), and RNG states plus the data position
are checkpointed, so `--resume` reproduces the metrics of an uninterrupted run on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed

import rewards
from looped.facts import max_depth
from rewards.guard import RewardFunctionError, RewardInterrupted
from rl import exit_codes, resume
from rl.accuracy import AccuracyError
from rl.advantages import get_advantage
from rl.async_rollout import AsyncRollouts, ProducerSpec, check_sendable, free_port
from rl.batch import Sample
from rl.checkpoint import latest_checkpoint, load_latest_checkpoint, save_checkpoint
from rl.config import (
    ConfigError,
    TrainConfig,
    fit_to_positions,
    portable_dict,
    save_config,
    tis_on,
    validate,
)
from rl.data import EMBEDDED_MODEL, load_prompts, reward_columns
from rl.dist import broadcast_from_main, reduce_max, reduce_sum
from rl.dynamic_sampling import Group, SamplingResult, collect_groups
from rl.evaluate import evaluate_depths, flat_metrics
from rl.exit_policy import validate_exit_policy
from rl.metrics import RunLogger, progress_bar, reward_metrics, sample_rows, summarize
from rl.model_io import load_model_config, load_tokenizer
from rl.policy import Policy
from rl.prompts import PromptIds, PromptSampler
from rl.rollout_process import ProducerFailed, RolloutProcess, refuse_training_here, unspawnable_main
from rl.rollout_process import claim as claim_rollout_process
from rl.rollout_process import discard_early as discard_early_rollout_process
from rl.rounds import RoundRoles, sample_round
from rl.run_dir import RunDirError, RunLock, RunWriteError, check_resume_step, one_line, prepare_output_dir
from rl.scoring import Scorer
from rl.self_distill import validate_self_distill
from rl.sharding import take_fsdp_request
from rollout import get_engine, make_worker
from rollout.engines import check_installed
from rollout.exit_rules import depth_metrics
from rollout.speculative import rollout_metrics

LOG_PREFIX = "looprl train:"
# Tests only: False lets the rollout process run ahead of the staleness bound (the trainer must then drop)
PRODUCER_THROTTLE = True


def log(msg: str) -> None:
    """One stderr line, in one write: the processes of a multi-process run share the stream, and print()'s
    two writes (text, then newline) let another process's line land between them."""
    sys.stderr.write(f"{LOG_PREFIX} {msg}\n")
    sys.stderr.flush()


class StopTraining(RuntimeError):
    """Raised to abort the run (e.g. too many non-finite losses in a row)."""


class Trainer:
    """One `looprl train` run: the roles (policy, rollout worker, scorer), the data, and the loop.

    `train()` returns an exit code (rl/exit_codes.py): 0 finished, 1 stopped by an error, 3 interrupted
    by SIGINT/SIGTERM with a checkpoint of the last finished step; the same is in `exit_code`, and the
    signal's name in `interrupted` (None when not interrupted). The output_dir is locked from
    construction to the end of `train()` (or `close()`)."""

    def __init__(self, cfg: TrainConfig):
        refuse_training_here()  # in a rollout process: a script without the __main__ guard, re-imported
        self.cfg = cfg
        # FSDP2 asked for by the launcher (configs/accelerate/fsdp2*.yaml) is applied by us (rl/sharding.py)
        self.sharded = take_fsdp_request(os.environ)
        self.accelerator = acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # CPU processes then join one gloo group (MULTI_CPU)
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=cfg.output_dir,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.exit_code: int | None = None
        self.interrupted: str | None = None
        self.stop_signal: int | None = None
        self.run_lock = self._lock_output_dir()
        self.rollouts: AsyncRollouts | None = None  # set once the run reached the producer (train())
        self._spawned: RolloutProcess | None = None
        try:
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def _lock_output_dir(self) -> RunLock | None:
        """The main process locks output_dir for the run's life; every process stops if it cannot."""
        lock, failure = None, None
        if self.accelerator.is_main_process:
            try:
                lock = RunLock(self.cfg.output_dir, warn=log)
            except RunDirError as e:
                failure = str(e)
        failure = broadcast_from_main(self.accelerator, failure)
        if failure:
            raise RunDirError(failure)
        return lock

    def close(self) -> None:
        """Stop the rollout process and release the output_dir (idempotent; `train()` does it when it ends)."""
        self._stop_rollouts()
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None

    def _setup(self, cfg: TrainConfig) -> None:
        acc = self.accelerator
        # a used output_dir needs --resume or --overwrite (checked before any loading; cleared in train())
        prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)
        if cfg.resume:  # keys the user did not set keep the checkpoint's values (not the defaults)
            resume.adopt_trained_config(cfg)

        # the model's facts that validation needs (its T), before loading weights; one-line load errors
        self.model_path = EMBEDDED_MODEL if cfg.model == "embedded" else cfg.model
        model_config = load_model_config(self.model_path, "config key 'model'")
        if cfg.depth is None:
            cfg.depth = max_depth(model_config)
        validate(cfg, max_depth=max_depth(model_config), num_processes=self.world)
        if cfg.max_staleness:  # spawned by now under `looprl train` (before torch loaded); the run reaches it in
            if why := unspawnable_main():  # train(); the Python API spawns it here
                raise ConfigError(f"config key 'max_staleness': {why}")
            self._spawned = claim_rollout_process(cfg.max_staleness)
        # prompt + completion within the model's positions: refused, or max_prompt_length lowered (said
        # by the truncation warning when a prompt is cut); checked before vLLM sees max_model_len
        self.max_positions = getattr(model_config, "max_position_embeddings", None)  # eval prompts fit it too
        prompt_limit_why = fit_to_positions(cfg, self.max_positions)
        try:
            check_installed(cfg.engine)  # `--engine vllm` without vLLM: one line saying how to install it
        except ValueError as e:
            raise ConfigError(f"config key 'engine': {e}") from None
        if cfg.resume:  # a changed model, data, loss, seed ... is refused before any loading
            resume.check_unchanged(cfg)
        self.depth = cfg.depth
        update_depth = cfg.effective_update_depth
        self_distill = validate_self_distill(cfg, depth=update_depth if cfg.self_distill_coef > 0 else None)
        exit_policy = validate_exit_policy(cfg.policy_exits, cfg.policy_exit_weights, cfg.policy_exit_alpha,
                                           depth=update_depth)

        # the actor: model, reference, optimizer, update
        set_seed(cfg.seed)
        # bos/eos/pad overrides (special_tokens) are applied here, so rollouts stop at the right token
        self.tokenizer = load_tokenizer(self.model_path, "config key 'model'", special_tokens=cfg.special_tokens)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        engine = get_engine(cfg.engine)
        # the importance weight pi_proximal / pi_behaviour: engines whose logprobs differ from ours, and
        # asynchronous rollouts, whose samples come from older weights (docs/OBJECTIVE.md)
        use_tis = tis_on(cfg, engine.exact_logprobs)
        if cfg.max_staleness:  # one process or DDP; the reward functions must reach the producer process
            backend = "FSDP2" if self.sharded else acc.distributed_type.name
            if backend not in ("NO", "MULTI_CPU", "MULTI_GPU"):
                raise ConfigError(f"config key 'max_staleness': asynchronous rollouts run on one process or under "
                                  f"DDP, not {backend} (not supported yet); use max_staleness 0")
            check_sendable(cfg)
        self.policy = Policy(cfg, acc, self.model_path, use_tis=use_tis, self_distill=self_distill,
                             pad_id=int(pad if pad is not None else 0), exit_policy=exit_policy,
                             sharded=self.sharded)

        # the rollout worker (the torch engine holds the policy's own module: sync is free)
        self.worker = make_worker(cfg.engine, depth=self.depth, model=self.policy.rollout_module,
                                  model_path=self.model_path, eos_token_id=eos, pad_token_id=pad,
                                  **cfg.engine_options())
        self.worker.sync_weights(self.policy.full_weights())  # an engine that loaded the files trains from ours

        # data and rewards
        key = "data"
        try:  # rl.data.DataError names the file, row and field; the key says which of the two
            self.dataset = load_prompts(cfg.data, split=cfg.data_split, limit=cfg.data_limit)
            key = "eval_data"
            self.eval_dataset = load_prompts(cfg.eval_data, split="test", limit=cfg.eval_limit) \
                if cfg.eval_every else None
        except ValueError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
        self.sampler = PromptSampler(len(self.dataset), cfg.seed)
        self.prompt_ids = PromptIds(self.tokenizer, self.dataset, cfg.max_prompt_length, cfg.prompt_suffix,
                                    why=prompt_limit_why)
        self.scorer = Scorer(cfg, columns=reward_columns(self.dataset), warn=log)
        self.advantages = get_advantage(cfg.advantage_estimator)

        self.global_step = 0
        self.nan_streak = 0
        self.no_update_streak = 0  # steps in a row where every sampled group had equal rewards
        self.last_samples: list[Sample] = []  # the step's samples shown in samples.jsonl
        self.warned_all_masked = False
        self.warned_short_batch = False  # dynamic sampling kept fewer groups than prompts_per_step (once)
        # asynchronous rollouts (max_staleness >= 1): the producer process (started above) gets the run in train()
        self._producer_args = dict(model_path=self.model_path, depth=self.depth, tokenizer=self.tokenizer,
                                   dataset=self.dataset, prompt_limit_why=prompt_limit_why, eos_token_id=eos,
                                   pad_token_id=int(pad if pad is not None else 0), device=str(acc.device))

    # ------------------------------------------------------------------ one step

    def step(self) -> dict[str, float]:
        """One RL step: sample -> score -> filter groups -> advantages -> update -> sync. Returns its metrics."""
        cfg = self.cfg
        t_step = time.perf_counter()
        if self.rollouts is None:
            timers = {"rollout": 0.0, "reward": 0.0}
            # 1-3. sample and score rounds of prompts until enough groups have reward variance (dynamic sampling)
            result = collect_groups(lambda round_, want: self._sample_and_score(round_, want, timers),
                                    cfg.prompts_per_step, enabled=cfg.dynamic_sampling, max_rounds=cfg.max_rounds)
            counters, async_metrics = {}, {}
        else:  # 1-3 ran in the producer process, overlapped with earlier updates
            result, timers, counters, async_metrics = self._take_rollouts()
        sampled = [s for g in result.all_groups for s in g.data]
        kept = [s for g in result.kept for s in g.data]
        self._warn_short_batch(result)
        metrics = {**reward_metrics(sampled, self.scorer.names), **self._reward_counters(counters),
                   **_sampling_metrics(result), **async_metrics}
        if cfg.mask_truncated:
            metrics.update(self._masked_metrics(kept))

        # the rollout engine frees its memory while the update runs (vLLM; no-op for torch)
        self.worker.sleep(level=1)
        metrics["lr"] = self.policy.lr  # the rate this step's first update uses
        t_update = time.perf_counter()
        if kept:
            # 4. advantages within each group
            advantages = self.advantages(torch.tensor([s.reward for s in kept]), cfg.num_generations,
                                         cfg.scale_rewards)
            for s, a in zip(kept, advantages.tolist()):
                s.advantage = a
            # 5. update the policy at the rollout depth
            metrics.update(self.policy.update(kept, self.global_step))
            # 6. the next rollout samples from the updated weights
            if self.rollouts is None:
                self.worker.sync_weights(self.policy.full_weights())
        else:
            dropped = int(metrics.get("async/dropped_stale", 0))
            cause = (f"every kept group ({dropped}) was more than max_staleness {cfg.max_staleness} versions "
                     "behind the weights" if dropped else _no_update_cause(result))
            warnings.warn(f"step {self.global_step + 1}: {cause}; no update", RuntimeWarning, stacklevel=2)
        if self.rollouts is not None:  # version global_step + 1, for the producer's next rounds
            metrics["time/weight_sync"] = self.rollouts.publish(self.policy.full_weights(), self.global_step + 1,
                                                                changed=bool(kept))

        metrics["time/rollout"] = timers["rollout"]
        metrics["time/reward"] = timers["reward"]
        metrics["time/update"] = time.perf_counter() - t_update
        metrics["time/step"] = time.perf_counter() - t_step
        gen_tokens = sum(len(s.completion_ids) for s in sampled)
        metrics["tokens_per_s"] = gen_tokens / max(metrics["time/step"], 1e-9)
        # time/rollout_per_token; rollout/accept_rate and rollout/tokens_per_verify with speculative rollouts
        metrics.update(rollout_metrics(timers, timers["rollout"], gen_tokens))
        metrics.update(depth_metrics([s.token_depths for s in sampled], [len(s.completion_ids) for s in sampled],
                                     self.depth))
        self.last_samples = kept or sampled
        return metrics

    def _sample_and_score(self, round_: int, want: int, timers: dict[str, float]) -> list[Group]:
        """Sample `want` prompts (rounded up to split over processes), roll out and score; gathered globally."""
        return sample_round(self.round_roles, self.global_step, round_, want, timers)

    @functools.cached_property
    def round_roles(self) -> RoundRoles:
        acc = self.accelerator
        return RoundRoles(self.cfg, self.depth, self.worker, self.scorer, self.tokenizer, self.dataset,
                          self.prompt_ids, self.sampler, self.rank, self.world,
                          any_true=lambda flag: reduce_max(acc, 1.0 if flag else 0.0) > 0, gather=gather_object)

    def _take_rollouts(self) -> tuple[SamplingResult, dict[str, float], dict[str, float], dict[str, float]]:
        """This step's groups from the producer, those more than max_staleness versions behind the weights
        being updated dropped; the producer's timers and reward counters; the async/* metrics."""
        try:
            batch, waited = self.rollouts.take(self.global_step)
        except ProducerFailed as e:  # one line, exit 1; the finished steps are checkpointed (nothing is lost)
            path = self.save() if self.global_step else None
            where = f"; checkpoint written at step {self.global_step} ({path}): --resume continues" if path else ""
            raise StopTraining(f"step {self.global_step + 1}: {e}{where}") from None
        kept, lags, dropped = self.rollouts.fresh(batch, self.global_step)
        self.sampler.load_state_dict(batch.sampler_after)  # what a checkpoint of this step saves
        metrics = {"async/staleness_mean": sum(lags) / len(lags) if lags else 0.0,
                   "async/staleness_max": float(max(lags, default=0)), "async/dropped_stale": float(dropped),
                   "async/queue_size": float(self.rollouts.queue_size()), "time/wait_rollout": waited,
                   "time/weight_load": batch.load_s}
        return dataclasses.replace(batch.result, kept=kept), batch.timers, batch.counters, metrics

    def _start_rollouts(self) -> None:
        """max_staleness >= 1: the producer process, from this step, data position and weights."""
        if not self.cfg.max_staleness:
            return
        threads = self._split_threads()
        address = None
        if self.world > 1:  # the producers' own gloo group, on a port the main process picks
            port = free_port() if self.accelerator.is_main_process else None
            address = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{broadcast_from_main(self.accelerator, port)}"
        spec = ProducerSpec(cfg=self.cfg, start_step=self.global_step, sampler_state=self.sampler.state_dict(),
                            threads=threads, rank=self.rank, world=self.world, group_address=address,
                            throttle=PRODUCER_THROTTLE, **self._producer_args)
        try:
            self.rollouts = AsyncRollouts(self._spawned, spec, self.policy.full_weights(), self.global_step)
        except ProducerFailed as e:
            raise StopTraining(str(e)) from None
        if self.accelerator.is_main_process:
            policy = self.policy  # the objective as the policy resolved it
            if policy.behaviour_ratio:
                tis = (f"off_policy_ratio behaviour: the {self.cfg.loss_type} loss's ratio is taken to the sampling "
                       "policy (its own clip or cap applies to it), no TIS weight")
            elif policy.use_tis:
                band = f"band [{self.cfg.tis_floor:g}, {self.cfg.tis_cap:g}]" if policy.tis_masks \
                    else f"cap {self.cfg.tis_cap:g}"
                tis = f"off_policy_ratio proximal: TIS on (tis_mode {self.cfg.tis_mode}, {band})"
            else:
                tis = "off_policy_ratio proximal, TIS off (tis_mode off): stale samples are not reweighted"
            log(f"asynchronous rollouts: max_staleness {self.cfg.max_staleness}, rollout process pid "
                f"{self._spawned.process.pid} ({threads} torch thread(s), trainer {torch.get_num_threads()}); {tis}")

    def _split_threads(self) -> int:
        """The producer's torch threads: torch_threads when set (the trainer has as many); else half of the
        trainer's, and on CPU the trainer keeps the other half (1 + 1 on 2 cores), so the two do not
        oversubscribe the cores they share."""
        if self.cfg.torch_threads:
            return self.cfg.torch_threads
        total = torch.get_num_threads()
        producer = max(1, total // 2)
        if self.accelerator.device.type == "cpu":
            torch.set_num_threads(max(1, total - producer))
        return producer

    def _stop_rollouts(self) -> None:
        if getattr(self, "_spawned", None) is not None:
            self._spawned.close()
        self.rollouts = self._spawned = None

    def _warn_short_batch(self, result: SamplingResult) -> None:
        """Dynamic sampling that ran out of rounds with half of prompts_per_step or fewer groups (tiny or too
        easy data) trains on a much smaller batch than asked: said once per run (sampling/groups_kept every
        step; the default job keeps 31 of 32 now and then, which is not worth a warning)."""
        cfg = self.cfg
        if self.warned_short_batch or not 0 < 2 * len(result.kept) <= cfg.prompts_per_step:
            return
        self.warned_short_batch = True
        if self.accelerator.is_main_process:
            log(f"WARNING step {self.global_step + 1}: dynamic sampling kept {len(result.kept)} of prompts_per_step "
                f"{cfg.prompts_per_step} groups after {result.rounds} round(s) (max_rounds {cfg.max_rounds}): the "
                "others had equal rewards or were dropped, so this update trains on fewer groups (warned once; "
                "sampling/groups_kept every step); more rounds: raise max_rounds")

    def _masked_metrics(self, kept: list[Sample]) -> dict[str, float]:
        """completion/masked_frac: the share of the update batch that mask_truncated leaves out. When it is
        all of it the loss is 0 and nothing trains: said once per run, naming the key."""
        frac = sum(s.truncated for s in kept) / len(kept) if kept else 0.0
        if kept and frac == 1.0 and not self.warned_all_masked:
            self.warned_all_masked = True
            if self.accelerator.is_main_process:
                log(f"WARNING step {self.global_step + 1}: every completion of the update batch was cut at "
                    f"max_new_tokens ({self.cfg.max_new_tokens}) and mask_truncated is on, so the policy loss is 0 "
                    "and nothing trains; raise max_new_tokens or set mask_truncated: false (warned once; "
                    "completion/masked_frac per step)")
        return {"completion/masked_frac": frac}

    def _reward_counters(self, producer: dict[str, float]) -> dict[str, float]:
        """Verifier counts (timeouts, errors, ...) and reward-function failures (rewards/fn_errors, ...)
        since the last step (`producer`: the rollout process's, max_staleness >= 1), summed over processes."""
        counts = {**rewards.pop_counters(), **self.scorer.guard.pop_counters()}
        for key, value in producer.items():
            counts[key] = counts.get(key, 0) + value
        return reduce_sum(self.accelerator, {k: float(v) for k, v in counts.items()})

    # ------------------------------------------------------------------ the run

    def train(self) -> int:
        """Steps until max_steps: step, eval, log, stop checks, checkpoint; then the final model.
        Returns the exit code (class docstring)."""
        try:
            self.exit_code = self._train()
        finally:
            self.close()
        return self.exit_code

    def _train(self) -> int:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        if acc.is_main_process:  # the config is valid now: an --overwrite may remove the previous run
            prepare_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, clear=True)
        acc.wait_for_everyone()
        resumed = self._maybe_resume()
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        logger = RunLogger(out, acc, cfg.report_to, cfg.to_dict(), resume_step=resumed)
        previous = self._install_signals()
        if acc.is_main_process:
            log(f"{self.world} process(es) on {acc.device} ({acc.distributed_type}), model {self.model_path}, "
                f"depth {self.depth}, {cfg.loss_type}, dynamic sampling {cfg.dynamic_sampling}, "
                f"{cfg.prompts_per_step} prompts x {cfg.num_generations} per step, "
                f"steps {self.global_step}->{cfg.max_steps}, output {out}")
            log(f"policy: {self.policy.trainable}")  # LoRA: adapter (+ gate) only
        bar = progress_bar(cfg.max_steps, self.global_step, enabled=cfg.progress and acc.is_main_process)
        code = exit_codes.FINISHED
        try:
            self._start_rollouts()  # max_staleness >= 1: from the resumed step, data position and weights
            if cfg.eval_every and self.global_step == 0 and acc.is_main_process:
                # the baseline row (step 0) that the eval-per-depth curves start from
                t0 = time.perf_counter()
                logger.log(0, {**self.evaluate(), "time/eval": time.perf_counter() - t0})
            while self.global_step < cfg.max_steps:
                at_start = self.sampler.state_dict()
                try:
                    metrics = self.step()
                except RewardInterrupted:  # Ctrl-C inside a reward function: nothing of this step is kept
                    self.sampler.load_state_dict(at_start)
                    self.save()
                    log(f"interrupted during the rewards of step {self.global_step + 1}: checkpoint written at "
                        f"step {self.global_step}; continue with --resume (exit code {exit_codes.INTERRUPTED})")
                    return self._interrupted()
                except RewardFunctionError as e:  # nothing of this step is kept; the finished steps are
                    self.sampler.load_state_dict(at_start)
                    self.save()
                    raise RewardFunctionError(f"{e}; checkpoint written at step {self.global_step}: fix it and "
                                              "continue with --resume") from None
                self.global_step += 1
                self.nan_streak = self.nan_streak + 1 if metrics.get("updates/skipped", 0) else 0
                self.no_update_streak = self.no_update_streak + 1 if metrics["groups/zero_std_frac_all"] >= 1 else 0
                if cfg.eval_every and (self.global_step % cfg.eval_every == 0 or self.global_step == cfg.max_steps):
                    t0 = time.perf_counter()
                    metrics.update(self.evaluate() if acc.is_main_process else {})
                    metrics["time/eval"] = time.perf_counter() - t0
                if not metrics.get("async/staleness_max"):  # stale samples differ by the updates since
                    self._warn_mismatch(metrics.get("mismatch/logp_abs_max", 0.0))
                logger.log(self.global_step, metrics)
                logger.log_samples(self.global_step, sample_rows(self.last_samples, self.dataset, cfg.log_samples))
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                refresh=False)
                self._check_model_alive(metrics)
                if self.nan_streak >= cfg.max_nan_steps:  # the skipped updates left the weights good (checked)
                    path = self.save()
                    raise StopTraining(f"{self.nan_streak} steps in a row with a non-finite loss or gradient "
                                       f"(last at step {self.global_step}); aborting, checkpoint {path} kept. "
                                       "Lower lr or check the data, then --resume.")
                if self._stop_requested():
                    self.save()
                    log(f"interrupted: checkpoint written at step {self.global_step}; continue with --resume "
                        f"(exit code {exit_codes.INTERRUPTED})")
                    return self._interrupted()
                if cfg.save_every and self.global_step % cfg.save_every == 0 and self.global_step < cfg.max_steps:
                    self.save()
            self._stop_rollouts()  # nothing more to sample
            self._save_final()
            bar.close()
            if acc.is_main_process:
                log(summarize(logger.metrics_path) + f"; final model in {out / 'final'}")
        except (StopTraining, RewardFunctionError, OSError) as e:  # OSError: a full disk (rl/run_dir.py)
            log(f"error: {one_line(e) if isinstance(e, OSError) else e}")
            code = exit_codes.FAILED
        finally:
            self._stop_rollouts()
            bar.close()
            logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _check_model_alive(self, metrics: dict[str, float]) -> None:
        """Stop a run whose model is broken (non-finite weights: nothing of it is saved, the newest
        checkpoint stays the last good one) or has stopped learning (max_no_update_steps steps in a row
        with equal rewards in every group: checkpointed, no final/). Both exit 1 with one line."""
        cfg, step = self.cfg, self.global_step
        bad = int(metrics.get("weights/nonfinite", 0))
        if bad:
            raise StopTraining(f"step {step}: the update left {bad} non-finite weights (dtype {cfg.dtype}, lr "
                               f"{metrics.get('lr', cfg.lr):g}); nothing of them is saved, the newest good "
                               f"checkpoint is {latest_checkpoint(cfg.output_dir) or 'none'}. Lower lr or use "
                               "float32.")
        if cfg.max_no_update_steps and self.no_update_streak >= cfg.max_no_update_steps:
            path = self.save()
            raise StopTraining(f"{self.no_update_streak} steps in a row (to step {step}) had equal rewards in every "
                               f"group (reward mean {metrics['reward/mean']:.3g}): no learning signal, the run has "
                               f"collapsed or the reward cannot tell completions apart (max_no_update_steps); "
                               f"checkpoint {path} kept, no final/")

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy of the current policy on eval_data at each depth (eval/accuracy_d{t}), decided
        by training's accuracy function with its options, and the unscored fraction (eval/unscored_frac_d{t})."""
        cfg = self.cfg
        depths = cfg.eval_depths or list(range(1, self.depth + 1))
        try:
            results = evaluate_depths(self.policy.rollout_module, self.tokenizer, self.eval_dataset, depths, n=1,
                                      temperature=0.0, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                      reward_fn=cfg.accuracy_reward or "math_accuracy",
                                      reward_kwargs=self.scorer.accuracy_kwargs, seed=cfg.seed,
                                      guard=self.scorer.guard, prompt_suffix=cfg.prompt_suffix,
                                      ignore_eos=cfg.ignore_eos, max_positions=self.max_positions)
        except AccuracyError as e:
            raise ConfigError(f"config key 'accuracy_reward': {e}") from None
        rewards.pop_counters()  # drop eval's verifier counts: rewards/* count training rollouts only
        self.scorer.guard.pop_counters()
        return {k: v for k, v in flat_metrics(results).items()
                if k.startswith(("eval/accuracy_d", "eval/unscored_frac_d"))}

    def _warn_mismatch(self, mismatch: float) -> None:
        if mismatch > self.cfg.mismatch_warn and not self.cfg.allow_depth_mismatch:  # there: the experiment
            log(f"WARNING step {self.global_step}: rollout/update logprob mismatch {mismatch:.3g} > "
                f"{self.cfg.mismatch_warn:g} at depth {self.depth}; the update is not scoring the "
                "policy that sampled (engine precision, sampling truncation, or a bug)")

    # ------------------------------------------------------------------ checkpoints and signals

    def _state(self) -> dict[str, Any]:
        # the config it was trained with: --resume refuses other settings (rl/resume.py)
        return {"sampler": self.sampler.state_dict(), "nan_streak": self.nan_streak,
                "no_update_streak": self.no_update_streak,
                "config": portable_dict(self.cfg), "data": self._data_fingerprint}

    @functools.cached_property
    def _data_fingerprint(self) -> dict[str, Any]:
        return resume.data_fingerprint(self.dataset)

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.cfg.output_dir, self.global_step, self._state(),
                               self.policy.train_state())

    def _maybe_resume(self) -> int | None:
        if not self.cfg.resume:
            return None
        base_lrs = list(self.policy.scheduler.base_lrs)  # this config's rates, before the checkpoint's return
        # a corrupt newest checkpoint is skipped with a warning naming it (rl/checkpoint.py)
        found = load_latest_checkpoint(self.accelerator, self.cfg.output_dir, self.policy.train_state(), warn=log)
        if found is None:
            log(f"--resume: no checkpoint in {self.cfg.output_dir}/checkpoints; starting fresh")
            return None
        path, state = found
        check_resume_step(int(state["step"]), self.cfg.max_steps, path, log)
        old = resume.trained_config(state, self.cfg.output_dir)
        changes = resume.config_changes(old, self.cfg, path) if old is not None else {}
        resume.check_same_data(state.get("data"), self._data_fingerprint, self.cfg.data, path)
        if old is None:
            log(f"WARNING: --resume: {path} records no config; cannot check that the settings are unchanged")
        if any(k in changes for k in resume.SCHEDULE_KEYS):  # the restored optimizer would keep the old rates
            resume.reset_lr_schedule(self.policy.scheduler, base_lrs)
        if changes and self.accelerator.is_main_process:
            resume.record_changes(self.cfg.output_dir, int(state["step"]), changes, log)
        self.global_step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.nan_streak = int(state.get("nan_streak", 0))
        self.no_update_streak = int(state.get("no_update_streak", 0))
        self.worker.sync_weights(self.policy.full_weights())
        log(f"resumed from {path} (step {self.global_step})")
        return self.global_step

    def _interrupted(self) -> int:
        self.interrupted = signal.Signals(self.stop_signal).name if self.stop_signal else "SIGINT"
        return exit_codes.INTERRUPTED

    def _install_signals(self) -> dict:
        def handler(signum, frame):
            if self.stop_signal is not None:  # second signal: stop now
                self.interrupted = signal.Signals(signum).name
                raise KeyboardInterrupt
            self.stop_signal = signum
            log(f"got {signal.Signals(signum).name}: finishing step {self.global_step + 1}, then checkpointing")

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _stop_requested(self) -> bool:
        return reduce_max(self.accelerator, 1.0 if self.stop_signal is not None else 0.0) > 0

    def _save_final(self) -> None:
        acc = self.accelerator
        bad = self.policy.nonfinite_weights()  # never a final/ that cannot generate (e.g. resumed from one)
        if bad:
            raise StopTraining(f"the model holds {bad} non-finite weights at step {self.global_step}; no final/ "
                               f"written (newest checkpoint: {latest_checkpoint(self.cfg.output_dir) or 'none'})")
        # the checkpoint first, always: a final/ that cannot be written (full disk) keeps the last steps, and
        # --resume finds the end of the run (writing final/ again, or extending it with a larger max_steps)
        self.save()
        acc.wait_for_everyone()
        try:
            self.policy.save_pretrained(Path(self.cfg.output_dir) / "final", self.tokenizer)  # atomic, portable
        except OSError as e:
            raise RunWriteError(f"{one_line(e)}; the run is checkpointed at step {self.global_step}: --resume "
                                "writes final/ again") from e
        acc.wait_for_everyone()


def _sampling_metrics(result: SamplingResult) -> dict[str, float]:
    return {"groups/zero_std_frac": result.zero_std_first_round,
            "groups/zero_std_frac_all": result.zero_std_all,
            "sampling/rounds": result.rounds,
            "sampling/groups_sampled": result.groups_sampled,
            "sampling/groups_skipped": result.groups_skipped,
            "sampling/groups_kept": len(result.kept),
            # every sample of a group dropped by reward_on_error: skip_group (not only the failed ones)
            "rewards/skipped_samples": float(sum(len(g.data) for g in result.all_groups if g.skipped))}


def _no_update_cause(result: SamplingResult) -> str:
    """Why no group was kept: skipped groups (reward_on_error: skip_group) and/or equal rewards."""
    skipped, sampled = result.groups_skipped, result.groups_sampled
    rounds = f"{result.rounds} round{'s' * (result.rounds != 1)}"
    if skipped == sampled:
        return (f"every group ({sampled}) was skipped after {rounds}: a reward function failed on a sample of each "
                "(reward_on_error: skip_group; see rewards/fn_errors)")
    if skipped:
        return (f"no group to train on after {rounds}: {skipped} of {sampled} skipped (reward_on_error: "
                f"skip_group), the other {sampled - skipped} had equal rewards")
    return f"every group had equal rewards after {rounds}"


def lone_cpu_launch(env: Mapping[str, str]) -> bool:
    """True when accelerate's simple CPU launcher was asked for several processes but started one:
    it then sets MASTER_ADDR (only done for num_processes > 1) without any rank variables."""
    rank_vars = ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(v in env for v in rank_vars))


def main(argv: list[str] | None = None) -> int:
    """`looprl train`; returns the exit code (rl/exit_codes.py)."""
    from rl.cli import train_precheck

    argv = list(sys.argv[1:] if argv is None else argv)
    code = train_precheck(argv)  # --help, --print_config and config errors that need no model
    if code is not None:
        return code
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if lone_cpu_launch(os.environ):
        log("WARNING: `accelerate launch --cpu --num_processes N` started ONE process (accelerate's CPU "
            "launcher fans out only through mpirun). For N gloo processes use `accelerate launch "
            "--config_file configs/accelerate/cpu-2proc.yaml -m rl train ...` or `torchrun --nproc_per_node N "
            "-m rl train ...`.")
    trainer = None
    try:
        cfg = resume.load_run_config(argv)
        trainer = Trainer(cfg)
        return trainer.train()
    except ConfigError as e:  # includes run-directory, model-loading and checkpoint problems
        log(str(e))
        return exit_codes.BAD_INPUT
    except KeyboardInterrupt:  # a second signal: the first one's checkpoint was not waited for
        name = (trainer.interrupted if trainer is not None else None) or "SIGINT"
        log(f"stopped at once by {name}; --resume continues from the newest checkpoint")
        return exit_codes.SIGNAL_BASE + signal.Signals[name].value
    finally:
        discard_early_rollout_process()  # spawned by train_precheck for a run refused before it was claimed
        if trainer is not None:
            trainer.close()
            trainer.worker.close()  # a vLLM engine's process groups go before the default one
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # a gloo group left open can abort the process at exit


if __name__ == "__main__":
    sys.exit(main())
