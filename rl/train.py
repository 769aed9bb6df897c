"""`looprl train`: GRPO/DAPO with a fixed-depth rollout worker and a policy update at the SAME depth.

One step (see docs/DESIGN.md):
  1. rollout: prompts -> worker at depth T, n samples each (fp32 logprobs of what was sampled);
  2. rewards: weighted sum of reward functions (per-function metrics kept);
  3. dynamic sampling: groups whose rewards are all equal are dropped and refilled (max_rounds);
  4. group advantages (mean / std within each group; scale_rewards group | batch | none);
  5. update: num_iterations passes over mini-batches (one optimizer step each) of micro-batches;
     policy logprobs from a forward at depth T, fp32 log-softmax(logits / temperature); before the
     first update the rollout-vs-update mismatch is measured (it must be ~0 on the torch engine);
  6. weights synced back to the worker; metrics line; checkpoint every save_every steps.

Everything random is seeded from (seed, step, round, process), and RNG states plus the data position
are checkpointed, so `--resume` reproduces the metrics of an uninterrupted run on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rl.config import ConfigError, TrainConfig, help_text, load_config, save_config, validate
from rl.losses import loss_normaliser, token_logprobs
from rl.modeling.hf_compat import enable_activation_checkpointing

LOG_PREFIX = "looprl train:"
# Below this many parameters, CPU matmuls are too small for intra-op threads to pay; on a busy
# machine the threads' spin-waits made a 120k-parameter step 10x slower (measured, docs/EXPERIMENTS.md).
TINY_PARAMS = 5_000_000
# A micro-batch's fixed cost (kernel launches, Python, optimizer-free fwd/bwd overhead) in padded tokens:
# length bucketing only splits a micro-batch when that saves more padding than this.
BUCKET_OVERHEAD_TOKENS = 256


def log(msg: str) -> None:
    print(f"{LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data position


class PromptSampler:
    """Epoch-wise shuffled prompt indices; its whole state is (epoch, index), so resuming is exact."""

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError("the training dataset is empty")
        self.size, self.seed = size, seed
        self.epoch, self.index = 0, 0
        self._perm: list[int] | None = None

    def _order(self) -> list[int]:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            self._perm = torch.randperm(self.size, generator=gen).tolist()
        return self._perm

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            grab = order[self.index:self.index + (k - len(out))]
            out += grab
            self.index += len(grab)
            if self.index >= self.size:
                self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None


# ----------------------------------------------------------------------------- one sample


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float]
    truncated: bool
    reward: float
    fn_rewards: dict[str, float | None]
    correct: float | None
    text: str
    advantage: float = 0.0
    skip: bool = False  # a reward function failed on it and reward_on_error is skip_group


# ----------------------------------------------------------------------------- helpers


def _is_looped(model) -> bool:
    return callable(getattr(model, "make_static_cache", None))


def _max_depth(model_config) -> int:
    return int(getattr(model_config, "total_ut_steps", 1)) if getattr(model_config, "model_type", "") == "ouro" else 1


def _resolve_model_path(name: str) -> str:
    if name == "embedded":
        from rl.data import EMBEDDED_MODEL

        return EMBEDDED_MODEL
    return name


def _step_seed(seed: int, step: int, round_: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + round_ * 101 + rank) % (2**31 - 1)


def _lr_lambda(kind: str, warmup: int, total: int):
    def fn(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention modules copy it
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def length_buckets(lengths: list[int], max_size: int, overhead: int | None = None) -> list[int]:
    """End indices of consecutive buckets of the ascending `lengths`, each at most `max_size` rows.

    Minimises padded tokens (rows x longest row, summed over buckets) plus `overhead` tokens per
    bucket, by dynamic programming over the cut points. One bucket of everything is what plain
    fixed-size chunking pads to; the update's forward/backward cost is linear in padded tokens.
    """
    overhead = BUCKET_OVERHEAD_TOKENS if overhead is None else overhead
    n = len(lengths)
    if n == 0:
        return []
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j rows
    cut_from = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]  # ascending: the last row of a bucket is its longest
        for i in range(max(0, j - max_size), j):
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], cut_from[j] = cost, i
    cuts, j = [], n
    while j > 0:
        cuts.append(j)
        j = cut_from[j]
    return cuts[::-1]


class StopTraining(RuntimeError):
    """Raised to abort the run (e.g. too many non-finite losses in a row)."""


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Owns the model, the worker, the optimizer and the run directory for one `looprl train` run."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed
        from transformers import AutoModelForCausalLM

        import rewards
        from rl import model_io
        from rl.data import load_prompts
        from rl.self_distill import validate_self_distill

        self.cfg = cfg
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # CPU processes then join one gloo group (MULTI_CPU)
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=cfg.output_dir,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        from rl.run_dir import prepare_output_dir

        prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # before any loading

        # --- facts of the model that validation needs, before loading weights ---
        self.model_path = _resolve_model_path(cfg.model)
        model_config = model_io.load_model_config(self.model_path, "config key 'model'")
        max_depth = _max_depth(model_config)
        if cfg.depth is None:
            cfg.depth = max_depth
        validate(cfg, max_depth=max_depth, num_processes=self.world)
        self.depth = cfg.depth
        self.update_depth = cfg.effective_update_depth
        self.sd = validate_self_distill(cfg, depth=self.update_depth if cfg.self_distill_coef > 0 else None)

        set_seed(cfg.seed)
        dtype = getattr(torch, cfg.dtype)
        self.tokenizer = model_io.load_tokenizer(self.model_path, "config key 'model'")
        model = model_io.load_model(self.model_path, "config key 'model'", dtype=dtype)
        model.to(acc.device)
        threads = cfg.torch_threads or (1 if acc.device.type == "cpu" and model.num_parameters() < TINY_PARAMS else 0)
        if threads:
            torch.set_num_threads(threads)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"config key 'gradient_checkpointing': {type(model).__name__} does not support it")
            enable_activation_checkpointing(model, use_reentrant=False)
            model.config.use_cache = False
        _disable_dropout(model)  # the update must score the very policy that sampled
        # transformers only checkpoints layers in train mode; without checkpointing eval mode is the safe one
        model.train(cfg.gradient_checkpointing)
        self.looped = _is_looped(model)

        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(acc.device)
            self.ref_model.eval().requires_grad_(False)

        # --- optimisation ---
        self.updates_per_step = cfg.num_iterations * (cfg.samples_per_step // (cfg.mini_batch_size or
                                                                               cfg.samples_per_step))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps * self.updates_per_step,
                                  cfg.max_steps * self.updates_per_step))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process; ours counts global updates.
        acc.register_for_checkpointing(self.scheduler)
        self.policy = acc.unwrap_model(self.model)

        # --- rollout worker (holds the very same module for the torch engine: sync is free) ---
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        if cfg.engine == "torch":
            from rollout import TorchRolloutWorker

            self.worker = TorchRolloutWorker(self.policy, self.depth, eos_token_id=eos, pad_token_id=pad)
        else:
            from rollout.vllm_worker import VLLMRolloutWorker

            self.worker = VLLMRolloutWorker(
                self.model_path, self.depth, dtype=cfg.vllm_dtype, seed=cfg.seed,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                max_model_len=cfg.vllm_max_model_len or cfg.max_prompt_length + cfg.max_new_tokens,
                eos_token_id=eos, enable_sleep_mode=True)
            self.worker.sync_weights(self.policy)  # the engine loaded the hub files; train from our weights
        self.pad_id = int(pad if pad is not None else 0)
        self.use_tis = cfg.tis_mode == "token" or (cfg.tis_mode == "auto" and cfg.engine != "torch")

        # --- data and rewards ---
        key = "data"
        try:  # rl.data.DataError names the file, row and field; the key says which of the two
            self.dataset = load_prompts(cfg.data, split=cfg.data_split, limit=cfg.data_limit)
            key = "eval_data"
            self.eval_dataset = load_prompts(cfg.eval_data, split="test", limit=cfg.eval_limit) \
                if cfg.eval_every else None
        except ValueError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
        self.columns = [c for c in self.dataset.column_names if c != "prompt"]
        self.sampler = PromptSampler(len(self.dataset), cfg.seed)
        self._prompt_cache: dict[int, list[int]] = {}
        self._warned_long = False
        self.reward_fns = self._build_rewards(rewards)
        from rewards.guard import RewardGuard

        self.reward_guard = RewardGuard(cfg.reward_on_error, cfg.reward_timeout, warn=log)
        self.accuracy_fn = None
        if cfg.accuracy_reward:
            names = [name for name, _, _ in self.reward_fns]
            self.accuracy_fn = None if isinstance(cfg.accuracy_reward, str) and cfg.accuracy_reward in names \
                else rewards.get(cfg.accuracy_reward)  # a callable (Python API) is called as is

        self.step = 0
        self.nan_streak = 0
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ setup helpers

    def _build_rewards(self, rewards_mod) -> list[tuple[str, Any, float]]:
        cfg = self.cfg
        names = list(cfg.rewards)
        weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(names)
        if cfg.overlong_buffer_len and "overlong_penalty" not in names:
            names.append("overlong_penalty")
            weights.append(1.0)
        fns = []
        for name, weight in zip(names, weights):
            opts = dict(cfg.reward_kwargs.get(name, {}))
            if name == "overlong_penalty":
                opts.setdefault("buffer_len", cfg.overlong_buffer_len)
                opts.setdefault("penalty_factor", cfg.overlong_penalty)
            try:  # the registry binds the options (functools.partial, keeping the name)
                fn = rewards_mod.get(name, **opts)
            except (KeyError, ValueError, ImportError, AttributeError) as e:
                raise ConfigError(f"config key 'rewards': {e}") from None
            fns.append((rewards_mod.reward_name(name), fn, float(weight)))
        return fns

    def _prompt_ids(self, index: int) -> list[int]:
        if index not in self._prompt_cache:
            from rl.evaluate import encode_prompts

            ids = encode_prompts(self.tokenizer, [self.dataset[index]["prompt"]])[0]
            if len(ids) > self.cfg.max_prompt_length:
                if not self._warned_long:
                    log(f"WARNING: prompt {index} has {len(ids)} tokens > max_prompt_length "
                        f"{self.cfg.max_prompt_length}; keeping the last ones (warned once)")
                    self._warned_long = True
                ids = ids[-self.cfg.max_prompt_length:]
            self._prompt_cache[index] = ids
        return self._prompt_cache[index]

    # ------------------------------------------------------------------ rollout + rewards

    def _score(self, indices: list[int], rollout) -> tuple[list[Sample], float]:
        """Rewards of one local rollout (prompt-major); returns samples and seconds spent."""
        import rewards

        cfg, n = self.cfg, self.cfg.num_generations
        start = time.perf_counter()
        rows = [self.dataset[i] for i in indices]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completion_ids]
        truncated = [r == "length" for r in rollout.finish_reasons]
        prompts = [row["prompt"] for row in rows for _ in range(n)]
        kwargs = {col: [row[col] for row in rows for _ in range(n)] for col in self.columns}
        kwargs.update(completion_ids=[list(c) for c in rollout.completion_ids],
                      max_completion_length=cfg.max_new_tokens, truncated=truncated)
        # TRL's convention: by keyword (rewards.call), chat prompts get assistant-message completions
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        # every user function goes through the guard: checked scores, reward_on_error, reward_timeout
        per_fn, skip = self.reward_guard.score_all([(name, fn) for name, fn, _ in self.reward_fns], prompts,
                                                   completions, **kwargs)
        if self.accuracy_fn is not None:
            correct, _ = self.reward_guard.score(rewards.reward_name(cfg.accuracy_reward), self.accuracy_fn,
                                                 prompts, completions, **kwargs)
        elif cfg.accuracy_reward:
            correct = per_fn[rewards.reward_name(cfg.accuracy_reward)]
        else:
            correct = [None] * len(texts)
        samples = []
        for j in range(len(texts)):
            fn_r = {name: per_fn[name][j] for name, _, _ in self.reward_fns}
            valid = [(w, fn_r[name]) for name, _, w in self.reward_fns if fn_r[name] is not None]
            total = sum(w * float(v) for w, v in valid)  # None = "not applicable", like TRL's nansum
            samples.append(Sample(
                prompt_index=indices[j // n], prompt_ids=list(rollout.prompt_ids[j]),
                completion_ids=list(rollout.completion_ids[j]), rollout_logprobs=list(rollout.logprobs[j]),
                truncated=truncated[j], reward=total, fn_rewards=fn_r,
                correct=None if correct[j] is None else float(correct[j]), text=texts[j], skip=skip[j]))
        return samples, time.perf_counter() - start

    def _sample_round(self, round_: int, want: int, timers: dict[str, float]):
        """Sample `want` prompts (rounded up to split over processes), roll out and score; gathered globally."""
        from accelerate.utils import gather_object

        from rl.dynamic_sampling import Group
        from rollout import SamplingParams

        cfg, n = self.cfg, self.cfg.num_generations
        want = math.ceil(want / self.world) * self.world
        indices = self.sampler.take(want)  # identical on every process (same seed and position)
        local = indices[self.rank::self.world]
        params = SamplingParams(n=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k,
                                seed=_step_seed(cfg.seed, self.step, round_, self.rank))
        t0 = time.perf_counter()
        rollout = self.worker.generate([self._prompt_ids(i) for i in local], params)
        timers["rollout"] += time.perf_counter() - t0
        samples, t_reward = self._score(local, rollout)
        timers["reward"] += t_reward
        groups = [Group(rewards=[s.reward for s in samples[g * n:(g + 1) * n]], data=samples[g * n:(g + 1) * n])
                  for g in range(len(local))]
        groups = [g for g in groups if not any(s.skip for s in g.data)]  # reward_on_error: skip_group
        if self.world > 1:
            groups = gather_object(groups)
        return groups

    # ------------------------------------------------------------------ update

    def _collate(self, samples: list[Sample], old: list[list[float]] | None = None):
        """Left-padded prompts, right-padded completions: completions all start at column P."""
        dev = self.accelerator.device
        p_len = max(len(s.prompt_ids) for s in samples)
        c_len = max(max(len(s.completion_ids) for s in samples), 1)
        ids = torch.full((len(samples), p_len + c_len), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        cmask = torch.zeros((len(samples), c_len))
        rollout_lp = torch.zeros((len(samples), c_len))
        old_lp = torch.zeros((len(samples), c_len)) if old is not None else None
        for i, s in enumerate(samples):
            p, c = s.prompt_ids, s.completion_ids
            ids[i, p_len - len(p):p_len] = torch.tensor(p)
            ids[i, p_len:p_len + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, p_len - len(p):p_len + len(c)] = 1
            train_tokens = 0.0 if (self.cfg.mask_truncated and s.truncated) else 1.0
            cmask[i, :len(c)] = train_tokens
            rollout_lp[i, :len(c)] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
            if old is not None:
                old_lp[i, :len(c)] = torch.tensor(old[i], dtype=torch.float32)
        adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "rollout_logprobs": rollout_lp,
                 "advantages": adv, "prompt_len": p_len, "real_len": torch.tensor([len(s.completion_ids)
                                                                                   for s in samples])}
        if old_lp is not None:
            batch["old_logprobs"] = old_lp
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _forward(self, model, batch, depth: int, output_exits: bool = False, with_entropy: bool = False):
        """Per-token fp32 logprobs of the completion tokens at `depth` (+ entropy, + exit outputs).

        The lm_head runs only on the c_len + 1 last positions (logits_to_keep), of which the first c_len
        predict the completion tokens.
        """
        ids, attn, p_len = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
        c_len = ids.shape[1] - p_len
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if self.looped:  # the reference model is loaded from the same path: same class
            kwargs["depth"] = depth
            if output_exits:
                kwargs["output_exits"] = True
        # The last column predicts nothing we train on, but it is still fed: dropping it changed the
        # logprobs by up to 1.4e-4 vs the rollout's (vs <= 4e-5 with it) on the embedded model.
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                    logits_to_keep=c_len + 1, **kwargs)
        logits = out.logits[:, -(c_len + 1):-1]
        logp, entropy = token_logprobs(logits, ids[:, p_len:], self.cfg.temperature, with_entropy=with_entropy)
        return logp, entropy, out

    def _exit_mask(self, batch) -> torch.Tensor:
        """[B, S] positions whose next-token prediction is a trained completion token."""
        ids, p_len, cmask = batch["input_ids"], batch["prompt_len"], batch["completion_mask"]
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        mask[:, p_len - 1:ids.shape[1] - 1] = cmask.bool()
        return mask

    def _shards(self, samples: list[Sample]) -> list[list[Sample]]:
        """This process's micro-batches of a mini-batch; equal counts on every process (DDP needs it).

        Samples are sorted by length and cut into length buckets of at most micro_batch_size, so each
        micro-batch pads only to its own longest row (the loss does not depend on the grouping: its
        normaliser is the mini-batch's). Every process plans every rank's buckets (all see all samples),
        so all agree on the count; a rank with fewer buckets runs zero-weight dummies (empty lists).
        """
        def length(s: Sample) -> int:
            return len(s.prompt_ids) + len(s.completion_ids)

        plans = []
        for rank in range(self.world):
            local = sorted(samples[rank::self.world], key=length)
            cuts = length_buckets([length(s) for s in local], self.cfg.micro_batch_size)
            plans.append([local[a:b] for a, b in zip([0] + cuts[:-1], cuts)])
        count = max(len(p) for p in plans)
        mine = plans[self.rank]
        return mine + [[] for _ in range(count - len(mine))]

    @torch.no_grad()
    def _score_old(self, samples: list[Sample]) -> list[list[float]]:
        """Update-side logprobs of the whole batch before any update (needed when several updates run)."""
        old = {}
        for chunk in self._shards(samples):
            if not chunk:
                continue
            batch = self._collate(chunk)
            logp, _, _ = self._forward(self.model, batch, self.update_depth)
            self._mismatch_update(logp, batch)
            for i, s in enumerate(chunk):
                old[id(s)] = logp[i, :len(s.completion_ids)].tolist()
        return old

    def _mismatch_update(self, logp: torch.Tensor, batch) -> None:
        mask = (torch.arange(logp.shape[1], device=logp.device)[None] < batch["real_len"][:, None]).double()
        diff = (logp.detach().double() - batch["rollout_logprobs"].double()) * mask
        acc = self._mismatch
        acc["abs_max"] = max(acc["abs_max"], float(diff.abs().max()) if mask.any() else 0.0)
        acc["abs_sum"] += float(diff.abs().sum())
        # k3 estimate of KL(rollout || update) from tokens drawn by the rollout policy
        acc["kl_sum"] += float(((torch.exp(diff) - diff - 1.0) * mask).sum())
        acc["tokens"] += float(mask.sum())

    def _update(self, samples: list[Sample]) -> dict[str, float]:
        """num_iterations passes over mini-batches, one optimizer step each; returns global metrics."""
        cfg = self.cfg
        mini = cfg.mini_batch_size or len(samples)
        mini_batches = [samples[i:i + mini] for i in range(0, len(samples), mini)]
        single_update = cfg.num_iterations == 1 and len(mini_batches) == 1
        self._mismatch = {"abs_max": 0.0, "abs_sum": 0.0, "kl_sum": 0.0, "tokens": 0.0}
        # One update: the update forward itself is "before the first update" and old = current.
        # Several: score the whole batch first (old logprobs for the ratio, and the mismatch).
        old_by_id = None if single_update else self._score_old(samples)
        sums = dict.fromkeys(("loss", "clip_low", "clip_high", "kl", "tis", "tokens", "entropy",
                              "entropy_tokens", "sd"), 0.0)
        grad_norms, skipped, exit_m = [], 0, {}
        for it in range(cfg.num_iterations):
            for mb in mini_batches:
                tokens = sum(0 if (cfg.mask_truncated and s.truncated) else len(s.completion_ids) for s in mb)
                norms = (loss_normaliser(cfg.loss_type, len(mb), tokens, cfg.max_new_tokens) / self.world,
                         max(tokens, 1) / self.world)
                shards = self._shards(mb)
                biggest = max(range(len(shards)), key=lambda k: len(shards[k]))  # exit metrics: most rows
                finite = True
                for k, chunk in enumerate(shards):
                    want_exit_metrics = it == 0 and k == biggest and not exit_m
                    sync = k == len(shards) - 1  # DDP all-reduces on the last micro-batch only
                    with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                        ok, exit_m_new = self._micro_batch(chunk or mb[:1], not chunk, it, norms, old_by_id,
                                                           single_update, want_exit_metrics, sums)
                    finite &= ok
                    exit_m = exit_m or exit_m_new
                grad_norm = self._optimizer_step(finite)
                if grad_norm is None:
                    skipped += 1
                else:
                    grad_norms.append(grad_norm)
        return self._update_metrics(sums, grad_norms, skipped, cfg.num_iterations * len(mini_batches), exit_m)

    def _micro_batch(self, chunk: list[Sample], dummy: bool, it: int, norms: tuple[float, float],
                     old_by_id, single_update: bool, want_exit_metrics: bool,
                     sums: dict[str, float]) -> tuple[bool, dict[str, float]]:
        """Forward at the update depth, loss, backward; adds to `sums`. Returns (loss finite, exit metrics).

        `dummy`: this process ran out of samples; it runs a zero-weight forward/backward so that
        every process makes the same number of backward calls (DDP).
        """
        from rl.losses import policy_loss, truncated_is_weights
        from rl.self_distill import exit_metrics

        cfg = self.cfg
        norm, sd_norm = norms
        old = [old_by_id[id(s)] for s in chunk] if old_by_id is not None else None
        batch = self._collate(chunk, old)
        want_exits = self.looped and (self.sd.enabled or (want_exit_metrics and not dummy))
        logp, entropy, out = self._forward(self.model, batch, self.update_depth, output_exits=want_exits,
                                           with_entropy=(it == 0))
        if single_update:
            old_lp = logp.detach()
            if not dummy:
                self._mismatch_update(logp, batch)
        else:
            old_lp = batch["old_logprobs"]
        ref_lp = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_lp, _, _ = self._forward(self.ref_model, batch, self.update_depth)
        is_w = truncated_is_weights(old_lp, batch["rollout_logprobs"], cfg.tis_cap) if self.use_tis else None
        cmask = batch["completion_mask"]
        out_l = policy_loss(cfg.loss_type, logp, old_lp, batch["advantages"], cmask, norm, eps_low=cfg.eps_low,
                            eps_high=cfg.eps_high, cispo_cap=cfg.cispo_cap, ref_logp=ref_lp, beta=cfg.beta,
                            is_weights=is_w)
        loss, exit_m = out_l.loss, {}
        if want_exits:
            exit_mask = self._exit_mask(batch)
            if want_exit_metrics and not dummy:
                exit_m = exit_metrics([h.detach() for h in out.exit_hidden_states], self.policy.lm_head,
                                      exit_mask, getattr(out, "exit_probs", None))
            if self.sd.enabled:
                sd_loss, _ = self.sd.loss(out.exit_hidden_states, self.policy.lm_head, exit_mask, normalizer=sd_norm)
                loss = loss + self.sd.coef * sd_loss
                sums["sd"] += 0.0 if dummy else float(sd_loss.detach())
        if dummy:
            loss = loss * 0.0
        finite = bool(torch.isfinite(loss))
        self.accelerator.backward(loss)
        if not dummy:
            sums["loss"] += float(out_l.loss.detach())
            sums["clip_low"] += float(out_l.clip_low)
            sums["clip_high"] += float(out_l.clip_high)
            sums["kl"] += float(out_l.kl_sum)
            sums["tis"] += float(out_l.tis_sum)
            sums["tokens"] += float(cmask.sum())
            if entropy is not None:
                sums["entropy"] += float((entropy * cmask).sum())
                sums["entropy_tokens"] += float(cmask.sum())
        return finite, exit_m

    def _optimizer_step(self, finite: bool) -> float | None:
        """Clip, step, zero. A non-finite loss or gradient skips the step (returns None)."""
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not finite or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"step {self.step + 1}: non-finite loss or gradient (grad_norm={grad_norm}); update skipped",
                          RuntimeWarning, stacklevel=3)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _update_metrics(self, sums: dict[str, float], grad_norms: list[float], skipped: int, n_updates: int,
                        exit_m: dict[str, float]) -> dict[str, float]:
        totals = self._reduce_sum(sums)
        mm = self._reduce_sum({k: v for k, v in self._mismatch.items() if k != "abs_max"})
        mm_max = self._reduce_max(self._mismatch["abs_max"])
        tokens = max(totals["tokens"], 1.0)
        metrics = {
            # each process's loss is (its token sum) * world / normaliser: sum over processes / world
            "loss/policy": totals["loss"] / self.world / n_updates,
            "clip/frac_low": totals["clip_low"] / tokens,
            "clip/frac_high": totals["clip_high"] / tokens,
            "clip/frac": (totals["clip_low"] + totals["clip_high"]) / tokens,
            "entropy": totals["entropy"] / max(totals["entropy_tokens"], 1.0),
            "mismatch/logp_abs_max": mm_max,
            "mismatch/logp_abs_mean": mm["abs_sum"] / max(mm["tokens"], 1.0),
            "mismatch/kl": mm["kl_sum"] / max(mm["tokens"], 1.0),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "updates/skipped": skipped,
        }
        if self.ref_model is not None:
            metrics["kl_ref"] = totals["kl"] / tokens
        if self.use_tis:
            metrics["tis/weight_mean"] = totals["tis"] / tokens
        if self.sd.enabled:
            metrics["loss/self_distill"] = totals["sd"] / self.world / n_updates
        metrics.update(exit_m)
        return metrics

    def _reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist()))

    def _reduce_max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = self.accelerator.gather(torch.tensor([value], dtype=torch.float64, device=self.accelerator.device))
        return float(t.max())

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        from rl.advantages import group_advantages
        from rl.dynamic_sampling import collect_groups

        cfg, n = self.cfg, self.cfg.num_generations
        t_step = time.perf_counter()
        timers = {"rollout": 0.0, "reward": 0.0}
        result = collect_groups(lambda r, want: self._sample_round(r, want, timers), cfg.prompts_per_step,
                                enabled=cfg.dynamic_sampling, max_rounds=cfg.max_rounds)
        every = [s for g in result.all_groups for s in g.data]
        kept = [s for g in result.kept for s in g.data]
        metrics: dict[str, float] = {}
        metrics.update(self._reward_metrics(every))
        metrics.update(self._reward_counters())
        metrics.update(self.reward_guard.pop_counters())
        metrics.update({
            "groups/zero_std_frac": result.zero_std_first_round,
            "groups/zero_std_frac_all": result.zero_std_all,
            "sampling/rounds": result.rounds,
            "sampling/groups_sampled": result.groups_sampled,
            "sampling/groups_kept": len(result.kept),
        })
        if callable(getattr(self.worker, "sleep", None)):
            self.worker.sleep(level=1)  # vLLM: free the KV cache and offload weights while the update runs
        metrics["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step's first update uses
        t_update = time.perf_counter()
        if kept:
            adv = group_advantages(torch.tensor([s.reward for s in kept]), n, cfg.scale_rewards)
            for s, a in zip(kept, adv.tolist()):
                s.advantage = a
            metrics.update(self._update(kept))
            if cfg.engine != "torch":
                self.worker.sync_weights(self.policy)
        else:
            warnings.warn(f"step {self.step + 1}: every group had equal rewards after {result.rounds} rounds; "
                          "no update", RuntimeWarning, stacklevel=2)
        metrics["time/rollout"] = timers["rollout"]
        metrics["time/reward"] = timers["reward"]
        metrics["time/update"] = time.perf_counter() - t_update
        metrics["time/step"] = time.perf_counter() - t_step
        gen_tokens = sum(len(s.completion_ids) for s in every)
        metrics["tokens_per_s"] = gen_tokens / max(metrics["time/step"], 1e-9)
        self._last_samples = kept or every
        return metrics

    def _reward_counters(self) -> dict[str, float]:
        """Verifier counts since the last step (timeouts, errors, ...), summed over processes."""
        import rewards

        return self._reduce_sum({k: float(v) for k, v in rewards.pop_counters().items()})

    def _reward_metrics(self, samples: list[Sample]) -> dict[str, float]:
        def mean(xs):
            xs = [float(x) for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else float("nan")

        rewards = [s.reward for s in samples]
        m = {"reward/mean": mean(rewards),
             "reward/std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
             "accuracy": mean([s.correct for s in samples])}
        for name, _, _ in self.reward_fns:
            scores = [float(s.fn_rewards[name]) for s in samples if s.fn_rewards[name] is not None]
            m[f"reward/{name}/mean"] = mean(scores)
            m[f"reward/{name}/std"] = float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0
        lengths = [len(s.completion_ids) for s in samples]
        m["completion/len_mean"] = mean(lengths)
        m["completion/len_max"] = float(max(lengths)) if lengths else 0.0
        m["completion/truncated_frac"] = mean([float(s.truncated) for s in samples])
        return m

    # ------------------------------------------------------------------ run

    def _state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "nan_streak": self.nan_streak}

    def save(self) -> Path:
        from rl.checkpoint import save_checkpoint

        return save_checkpoint(self.accelerator, self.cfg.output_dir, self.step, self._state())

    def _maybe_resume(self) -> int | None:
        from rl.checkpoint import load_latest_checkpoint
        from rl.run_dir import check_resume_step

        if not self.cfg.resume:
            return None
        found = load_latest_checkpoint(self.accelerator, self.cfg.output_dir, warn=log)
        if found is None:
            log(f"--resume: no checkpoint in {self.cfg.output_dir}/checkpoints; starting fresh")
            return None
        path, state = found
        check_resume_step(int(state["step"]), self.cfg.max_steps, path, log)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.nan_streak = int(state.get("nan_streak", 0))
        if self.cfg.engine != "torch":
            self.worker.sync_weights(self.policy)
        log(f"resumed from {path} (step {self.step})")
        return self.step

    def _install_signals(self):
        def handler(signum, frame):
            if self.stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
            log(f"got {signal.Signals(signum).name}: finishing step {self.step + 1}, then checkpointing")

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _stop_requested(self) -> bool:
        flag = 1.0 if self.stop_signal is not None else 0.0
        return self._reduce_max(flag) > 0

    def _evaluate(self) -> dict[str, float]:
        from rl.evaluate import evaluate_depths, flat_metrics

        cfg = self.cfg
        depths = cfg.eval_depths or list(range(1, self.depth + 1))
        results = evaluate_depths(self.policy, self.tokenizer, self.eval_dataset, depths, n=1, temperature=0.0,
                                  max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                  reward_fn=cfg.accuracy_reward or "math_accuracy", seed=cfg.seed)
        import rewards

        rewards.pop_counters()  # drop eval's verifier counts: rewards/* count training rollouts only
        return {k: v for k, v in flat_metrics(results).items() if k.startswith("eval/accuracy_d")}

    def train(self) -> int:
        from rewards.guard import RewardFunctionError, RewardInterrupted
        from rl.metrics import RunLogger, progress_bar

        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        if acc.is_main_process:  # the config is valid now: an --overwrite may remove the previous run
            from rl.run_dir import prepare_output_dir

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
                f"{cfg.prompts_per_step} prompts x {cfg.num_generations} per step, steps {self.step}->{cfg.max_steps}, "
                f"output {out}")
        bar = progress_bar(cfg.max_steps, self.step, enabled=cfg.progress and acc.is_main_process)
        code = 0
        try:
            if cfg.eval_every and self.step == 0 and acc.is_main_process:
                # the baseline row (step 0) that the eval-per-depth curves start from
                t0 = time.perf_counter()
                baseline = self._evaluate()
                logger.log(0, {**baseline, "time/eval": time.perf_counter() - t0})
            while self.step < cfg.max_steps:
                at_start = self.sampler.state_dict()
                try:
                    metrics = self.train_step()
                except RewardInterrupted:  # Ctrl-C inside a reward function: nothing of this step is kept
                    self.sampler.load_state_dict(at_start)
                    self.save()
                    log(f"interrupted during the rewards of step {self.step + 1}: checkpoint written at step "
                        f"{self.step}; continue with --resume")
                    return 0
                self.step += 1
                self.nan_streak = self.nan_streak + 1 if metrics.get("updates/skipped", 0) else 0
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    t0 = time.perf_counter()
                    eval_m = self._evaluate() if acc.is_main_process else {}
                    metrics.update(eval_m)
                    metrics["time/eval"] = time.perf_counter() - t0
                mm = metrics.get("mismatch/logp_abs_max", 0.0)
                if mm > cfg.mismatch_warn:
                    log(f"WARNING step {self.step}: rollout/update logprob mismatch {mm:.3g} > "
                        f"{cfg.mismatch_warn:g} at depth {self.depth}; the update is not scoring the "
                        "policy that sampled (engine precision, sampling truncation, or a bug)")
                logger.log(self.step, metrics)
                logger.log_samples(self.step, self._sample_rows())
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                refresh=False)
                if self.nan_streak >= cfg.max_nan_steps:
                    raise StopTraining(f"{self.nan_streak} steps in a row with a non-finite loss or gradient "
                                       f"(last at step {self.step}); aborting. Lower lr or check the data.")
                if self._stop_requested():
                    self.save()
                    log(f"interrupted: checkpoint written at step {self.step}; continue with --resume")
                    return 0
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
            self._save_final()
            bar.close()
            if acc.is_main_process:
                log(summarize(logger.metrics_path) + f"; final model in {out / 'final'}")
        except (StopTraining, RewardFunctionError, OSError) as e:  # OSError: a full disk (rl.run_dir)
            from rl.run_dir import one_line

            log(f"error: {one_line(e) if isinstance(e, OSError) else e}")
            code = 1
        finally:
            bar.close()
            logger.close()
            for sig, h in previous.items():
                signal.signal(sig, h)
        return code

    def _sample_rows(self) -> list[dict[str, Any]]:
        rows = []
        for s in self._last_samples[: self.cfg.log_samples]:
            prompt = self.dataset[s.prompt_index]["prompt"]
            rows.append({"prompt": prompt[-1]["content"] if isinstance(prompt, list) else prompt,
                         "completion": s.text, "reward": s.reward, "advantage": s.advantage,
                         "ground_truth": self.dataset[s.prompt_index].get("ground_truth"),
                         "truncated": s.truncated, **{f"reward/{k}": v for k, v in s.fn_rewards.items()}})
        return rows

    def _save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = Path(self.cfg.output_dir) / "final"
        state_dict = acc.get_state_dict(self.model)  # collective under ZeRO-3
        if acc.is_main_process:
            from rl.model_io import save_portable
            from rl.run_dir import atomic_dir

            with atomic_dir(final) as tmp:  # a full disk leaves the previous final/ (or none), never half
                save_portable(self.policy, self.tokenizer, tmp, state_dict=state_dict)  # + model code, auto_map
        acc.wait_for_everyone()
        self.save()  # always: --resume finds the end of the run (and can extend it with a larger max_steps)


def summarize(metrics_path: str | Path, key: str = "accuracy") -> str:
    """'accuracy: first tenth of steps X -> last tenth Y (+Z points)', the embedded job's success check."""
    from rl.metrics import read_jsonl

    values = [r[key] for r in read_jsonl(metrics_path) if isinstance(r.get(key), (int, float))]
    if not values:
        return f"no {key} logged"
    tenth = max(1, len(values) // 10)
    first, last = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
    return (f"{key}: first tenth of steps {first:.3f} -> last tenth {last:.3f} "
            f"({100 * (last - first):+.1f} points over {len(values)} steps)")


def lone_cpu_launch(env: Mapping[str, str]) -> bool:
    """True when accelerate's simple CPU launcher was asked for several processes but started one:
    it then sets MASTER_ADDR (only done for num_processes > 1) without any rank variables."""
    rank_vars = ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(v in env for v in rank_vars))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if lone_cpu_launch(os.environ):
        log("WARNING: `accelerate launch --cpu --num_processes N` started ONE process (accelerate's CPU "
            "launcher fans out only through mpirun). For N gloo processes use `accelerate launch "
            "--config_file configs/accelerate/cpu-2proc.yaml -m rl train ...` or `torchrun --nproc_per_node N "
            "-m rl train ...`.")
    try:
        cfg = load_config(argv)
        return Trainer(cfg).train()
    except ConfigError as e:  # includes run-directory and checkpoint problems (rl.run_dir, rl.checkpoint)
        print(f"{LOG_PREFIX} {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's checkpoint was not waited for
        print(f"{LOG_PREFIX} stopped at once by a second interrupt; --resume continues from the newest "
              "checkpoint", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # a gloo group left open can abort the process at exit


if __name__ == "__main__":
    sys.exit(main())
