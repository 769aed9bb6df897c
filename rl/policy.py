"""The actor role: the policy model, its frozen reference, the optimizer, and the update at ONE depth.

    policy = Policy(cfg, accelerator, model_path, use_tis=...)
    logp, entropy, out = policy.logprobs(batch)        # fp32 per-token logprobs at the update depth
    metrics = policy.update(samples, step)             # num_iterations x mini-batches, one optimizer step each

The update scores the very policy that sampled: same depth as the rollout, dropout off, fp32
log-softmax(logits / temperature) (rl/losses.py token_logprobs, the convention of rollout/sampling.py).
Before the first optimizer step it measures how far the rollout's logprobs are from its own (mismatch/*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from looped.adapters import merged_named_parameters
from looped.facts import is_looped
from looped.hf_compat import enable_activation_checkpointing
from rl.batch import Sample, collate, exit_mask, own_filler, padded_width, shard_plan, trained_tokens
from rl.checkpoint import TrainState
from rl.config import TIS_MASK_MODES, ConfigError, TrainConfig, behaviour_ratio
from rl.dist import reduce_max, reduce_sum
from rl.exit_policy import (
    ExitPolicyConfig,
    ExitWeights,
    exit_policy_metrics,
    exit_token_logprobs,
    resolve_policy_exits,
    weights_for,
)
from rl.lora import apply_lora, dropout_active, keep_trainable_state, trainable_summary
from rl.losses import loss_normaliser, token_logprobs
from rl.model_io import count_nonfinite, load_model, save_portable, set_threads
from rl.objective import GateTerm, objective, policy_loss
from rl.rollout_correction import Correction, RawRatios, raw_ratio_metrics, rollout_correction
from rl.self_distill import SelfDistillConfig, exit_metrics
from rl.sharding import full_tensor, gather_into, shard_model
from rl.shared_prompt import distinct_prompts, shared_prompt_gap, update_forward

# The shared-prompt forward's largest relative logit gap to the plain forward that still passes its check
# (rl/shared_prompt.py): float32 agrees to ~1e-6 (often exactly), bfloat16 to a few of its 2^-8 steps.
SHARED_PROMPT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def position_depths(token_depths: torch.Tensor, width: int, prompt_len: int, depth: int) -> torch.Tensor:
    """[B, width] per-position depth of the collated batch: completion token k (column prompt_len + k) was
    produced at column prompt_len - 1 + k with depth token_depths[:, k]; every other column (prompt, padding,
    the last token, which produces nothing scored) runs all `depth` loops (rollout.base.Rollout.token_depths)."""
    out = torch.full((token_depths.shape[0], width), depth, dtype=torch.long, device=token_depths.device)
    c_len = token_depths.shape[1]
    out[:, prompt_len - 1:prompt_len - 1 + c_len] = torch.where(token_depths > 0, token_depths, depth)
    return out


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate after `i` optimizer updates (linear warmup, then `kind`)."""
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


def disable_dropout(model) -> None:
    """The update must score the very policy that sampled: no dropout anywhere."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention modules copy it
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


@dataclass
class Mismatch:
    """Rollout-vs-update logprob differences over the tokens scored before the first optimizer step."""

    abs_max: float = 0.0
    abs_sum: float = 0.0
    kl_sum: float = 0.0
    tokens: float = 0.0

    def add(self, logp: torch.Tensor, batch: dict) -> None:
        mask = (torch.arange(logp.shape[1], device=logp.device)[None] < batch["real_len"][:, None]).double()
        diff = (logp.detach().double() - batch["rollout_logprobs"].double()) * mask
        self.abs_max = max(self.abs_max, float(diff.abs().max()) if mask.any() else 0.0)
        self.abs_sum += float(diff.abs().sum())
        # k3 estimate of KL(rollout || update) from tokens drawn by the rollout policy
        self.kl_sum += float(((torch.exp(diff) - diff - 1.0) * mask).sum())
        self.tokens += float(mask.sum())


@dataclass
class UpdateStats:
    """What one update() accumulates on this process; `metrics` reduces it over processes."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("loss", "clip_low", "clip_high", "kl", "tis", "tokens", "entropy", "entropy_tokens", "sd", "gate"), 0.0))
    mismatch: Mismatch = field(default_factory=Mismatch)
    raw: RawRatios = field(default_factory=RawRatios)  # is/* on the raw rollout ratios (first pass)
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    exits: dict[str, float] = field(default_factory=dict)  # exit/* alignment metrics of one micro-batch


@dataclass
class MicroBatch:
    """One forward/backward: its rows and what to measure on it."""

    rows: list[Sample]
    dummy: bool  # this process ran out of rows: zero-weight pass so every process calls backward equally
    first_pass: bool  # first pass over the batch: entropy is measured
    exit_metrics: bool  # measure exit/* alignment on this one


class Policy:
    """Owns the policy model (accelerate-prepared, or FSDP2-sharded), the reference model, optimizer and LR
    schedule, and the full-weight module the rollout worker samples from (`rollout_module`)."""

    def __init__(self, cfg: TrainConfig, accelerator, model_path: str, *, use_tis: bool,
                 self_distill: SelfDistillConfig, pad_id: int, exit_policy: ExitPolicyConfig | None = None,
                 sharded: bool = False):
        self.cfg, self.accelerator, self.sharded = cfg, accelerator, sharded
        self.depth = cfg.effective_update_depth
        self.use_tis, self.sd, self.pad_id = use_tis, self_distill, pad_id
        # the rollout correction in force (rl/rollout_correction.py): auto resolves to token where it is on
        self.tis_mode = ("token" if cfg.tis_mode in ("auto", "off") else cfg.tis_mode) if use_tis else "off"
        self.tis_masks = self.tis_mode in TIS_MASK_MODES
        self.behaviour_ratio = behaviour_ratio(cfg)  # stale samples: the PPO ratio to the policy that sampled
        self.exit_policy = exit_policy or ExitPolicyConfig()
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        dtype = getattr(torch, cfg.dtype)
        model = load_model(model_path, "config key 'model'", dtype=dtype)  # one-line errors (rl/model_io.py)
        model.to(accelerator.device)
        set_threads(model, accelerator.device.type, cfg.torch_threads)  # the rule `looprl eval` uses too
        # LoRA (rl/lora.py): peft adapts `model` in place, freezes the base; checkpoints hold what trains;
        # before disable_dropout, which zeroes the adapter's dropout too (dropout_active sets it per forward)
        self.peft = None
        if cfg.lora_rank > 0:
            backend = "FSDP2" if sharded else accelerator.distributed_type.name
            if backend in ("FSDP", "FSDP2", "DEEPSPEED"):  # sharded: merged saving untested
                raise ConfigError(f"config key 'lora_rank': LoRA runs on one process or under DDP, not "
                                  f"{backend} (not supported yet)")
            self.peft = apply_lora(model, cfg)
            keep_trainable_state(model)
        self.trainable = trainable_summary(model)
        self._lora_dropout = cfg.lora_dropout if self.peft is not None else 0.0

        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"config key 'gradient_checkpointing': {type(model).__name__} does not support it")
            enable_activation_checkpointing(model, use_reentrant=False)
            model.config.use_cache = False
        disable_dropout(model)
        # transformers only checkpoints layers in train mode; without checkpointing eval mode is the safe one
        model.train(cfg.gradient_checkpointing)
        self.looped = is_looped(model)
        # the update's forward runs each group's prompt once (rl/shared_prompt.py): it needs a KV cache with
        # gradients (activation checkpointing drops the cache) and is untested under sharded parameters
        self.share_prompts = not (cfg.gradient_checkpointing or sharded or
                                  accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"))
        if not self.looped and (self.exit_policy.enabled or cfg.gate_loss_coef > 0):
            key = "policy_exits" if self.exit_policy.enabled else "gate_loss_coef"
            raise ConfigError(f"config key {key!r}: {type(model).__name__} is not a looped model (it has one exit)")
        # the exit-weighted policy term's exits S (None: the plain loss on exit T) and learned weights
        self.policy_exits = resolve_policy_exits(self.exit_policy.exits, self.depth) \
            if self.exit_policy.enabled else None
        self.exit_weights = ExitWeights(len(self.policy_exits)).to(accelerator.device) \
            if self.policy_exits and self.exit_policy.weighting == "learned" else None

        self.ref_model = None  # with LoRA the reference is the base itself, adapter disabled (_reference)
        if cfg.beta > 0 and self.peft is None:
            self.ref_model = load_model(model_path, "config key 'model'", dtype=dtype).to(accelerator.device)
            self.ref_model.eval().requires_grad_(False)

        if sharded:  # FSDP2 (rl/sharding.py): before the optimizer, which must hold the sharded parameters
            shard_model(model)

        updates_per_step = cfg.num_iterations * (cfg.samples_per_step // (cfg.mini_batch_size or
                                                                          cfg.samples_per_step))
        params = [p for p in model.parameters() if p.requires_grad]  # all of them without LoRA
        groups = [{"params": params}]
        if cfg.gate_loss_coef > 0 and cfg.gate_lr is not None:  # the gate in its own group, at its own rate
            gate_ids = {id(p) for p in model.model.early_exit_gate.parameters()}
            groups = [{"params": [p for p in params if id(p) not in gate_ids]},
                      {"params": [p for p in params if id(p) in gate_ids], "lr": cfg.gate_lr}]
        if self.exit_weights is not None:  # own group: no weight decay on the weight logits
            groups.append({"params": list(self.exit_weights.parameters()), "weight_decay": 0.0})
        # fused: one kernel for all parameters (CPU and CUDA; ~5x faster than the per-tensor loop, the default on
        # CPU); FSDP2's DTensor shards and DeepSpeed keep torch's default
        fused = not sharded and accelerator.distributed_type.name != "DEEPSPEED" and \
            accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps * updates_per_step,
                                 cfg.max_steps * updates_per_step))
        # The scheduler is not prepared: accelerate would step it once per process; ours counts global updates.
        # FSDP2: nothing is prepared (accelerate would wrap the sharded model in DDP); gradients are
        # reduce-scattered by the sharded model itself.
        self.model, self.optimizer = (model, optimizer) if sharded else accelerator.prepare(model, optimizer)
        self.module = accelerator.unwrap_model(self.model)  # the bare model: lm_head, checkpoints
        # What the rollout worker and eval run: the policy itself, or under FSDP2 a full-weight copy
        # that full_weights() refreshes after every update.
        self.rollout_module = self.module
        if sharded:
            self.rollout_module = load_model(model_path, "config key 'model'", dtype=dtype).to(accelerator.device)
            disable_dropout(self.rollout_module)
            self.rollout_module.eval().requires_grad_(False)
            gather_into(self.model, self.rollout_module)

    def full_weights(self):
        """The module the rollout worker samples from, holding the current weights (every process must
        call it: under FSDP2 it gathers the shards into the rollout copy)."""
        if self.sharded:
            gather_into(self.model, self.rollout_module)
        return self.rollout_module

    def train_state(self) -> TrainState:
        """What a checkpoint saves and --resume restores (rl/checkpoint.py), besides the trainer's counters."""
        from accelerate.utils import DistributedType

        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        return TrainState(model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                          modules={"exit_weights": self.exit_weights} if self.exit_weights is not None else {},
                          engine=self.model if deepspeed else None)

    @property
    def objective_uses_exits(self) -> bool:
        """The objective has a term over the exits of a looped model (self-distillation, the exit-weighted
        policy term, the gate loss), so every update forward returns the per-loop hidden states."""
        return self.looped and (self.sd.enabled or self.policy_exits is not None or self.cfg.gate_loss_coef > 0)

    @property
    def lm_head(self):
        """The model's output layer (its own name for it varies: get_output_embeddings)."""
        return self.module.get_output_embeddings()

    @property
    def lr(self) -> float:
        """The rate the next optimizer update uses."""
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------ scoring

    def logprobs(self, batch: dict, *, model=None, output_exits: bool = False, with_entropy: bool = False):
        """Per-token fp32 logprobs of the completion tokens at the update depth (+ entropy, + model output).

        Adaptive rollouts (rollout_exit_rule confidence | gate, without allow_depth_mismatch): each token at the
        depth it was sampled at, with the rollout's K/V rule (`exit_depth`, looped/modeling_ouro.py); the
        exits the objective reads are then those of this per-token-depth forward (docs/OBJECTIVE.md).

        The lm_head runs only on the c_len + 1 last positions (logits_to_keep), of which the first c_len
        predict the completion tokens. `model` defaults to the policy; the reference model is the other.
        """
        model = self.model if model is None else model
        ids, attn, p_len = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
        c_len = ids.shape[1] - p_len
        kwargs: dict[str, Any] = {}
        if self.looped:  # the reference model is loaded from the same path: same class
            kwargs["depth"] = self.depth
            if output_exits:
                kwargs["output_exits"] = True
            if self.cfg.matched_depths and "token_depths" in batch:  # adaptive rollouts: each token's own depth
                kwargs["exit_depth"] = position_depths(batch["token_depths"], ids.shape[1], p_len, self.depth)
        # each distinct prompt once where that applies (rl/shared_prompt.py), else every row whole
        out = update_forward(model, ids, attn, p_len, self._prompt_rows(ids, attn, p_len, kwargs), **kwargs)
        logits = out.logits[:, -(c_len + 1):-1]
        logp, entropy = token_logprobs(logits, ids[:, p_len:], self.cfg.temperature, with_entropy=with_entropy)
        return logp, entropy, out

    def _prompt_rows(self, ids: torch.Tensor, attn: torch.Tensor, p_len: int, kwargs: dict):
        """The shared-prompt forward's rows, or None for the plain forward: adaptive-depth scoring
        (exit_depth) has no cache path, and on one process a batch of distinct prompts saves nothing. With
        several processes every forward is the two-pass one, so all run as many (DDP syncs buffers in each)."""
        if not self.share_prompts or "exit_depth" in kwargs:
            return None
        first, inverse = distinct_prompts(ids, attn, p_len)
        return None if self.world == 1 and len(first) == len(inverse) else (first, inverse)

    def _check_shared_prompts(self, samples: list[Sample]) -> None:
        """Once per run, before the first update: the shared-prompt forward must give the plain forward's
        logits on this process's first micro-batch, on every process (else all use the plain one, said in
        one line). A model whose cache is not a per-layer K/V store (recurrent, hybrid) would differ."""
        self._shared_checked = True
        plan = self._shards(samples)
        chunk = next((c for c in plan if c), None) or own_filler(plan)
        batch = self._collate(chunk)
        kwargs: dict[str, Any] = {"depth": self.depth} if self.looped else {}
        tolerance = SHARED_PROMPT_TOLERANCE[self.cfg.dtype]
        try:
            gap = shared_prompt_gap(self.model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"],
                                    **kwargs)
            cause = f"its logits differ from the plain forward's by {gap:.2g} (relative; tolerance {tolerance:g})"
        except Exception as e:  # a model without a usable KV cache in its forward
            gap, cause = float("inf"), f"{type(e).__name__}: {e}".splitlines()[0]
        worst = reduce_max(self.accelerator, gap if math.isfinite(gap) else 1e30)
        if worst > tolerance:
            self.share_prompts = False
            if self.accelerator.is_main_process:  # the trainer's own log format: one line, no source line
                sys.stderr.write(f"looprl train: WARNING: {type(self.module).__name__} is updated with every row's "
                                 "whole prompt (the same training, slower): running a group's shared prompt once "
                                 "through its KV cache did not reproduce the plain forward "
                                 f"({cause if gap > tolerance else 'on another process'}); its cache is not a "
                                 "per-layer key/value store\n")
                sys.stderr.flush()

    def _collate(self, rows: list[Sample], old: list[list[float]] | None = None) -> dict:
        return collate(rows, self.pad_id, mask_truncated=self.cfg.mask_truncated, device=self.accelerator.device,
                       old_logprobs=old)

    _shared_checked = False  # the shared-prompt forward passed (or failed) its check (_check_shared_prompts)
    _warned_budget = False  # micro_batch_tokens: a sample over the budget was reported (once per run)

    def _shards(self, samples: list[Sample]) -> list[list[Sample]]:
        budget = self.cfg.micro_batch_tokens
        if budget and not self._warned_budget:
            widest = max((padded_width([s]) for s in samples), default=0)
            if widest > budget:  # such samples run one per micro-batch from now on
                self._warned_budget = True
                warnings.warn(f"micro_batch_tokens {budget}: a sample of {widest} tokens is longer than the "
                              "budget; such samples run alone (one per forward/backward)", RuntimeWarning,
                              stacklevel=2)
        return shard_plan(samples, self.rank, self.world, self.cfg.micro_batch_size, micro_batch_tokens=budget)

    def _exit_logprobs(self, out, batch: dict, logp: torch.Tensor) -> torch.Tensor:
        """[B, |S|, C] log-probs of the completion tokens at the policy exits S, from this forward's exits."""
        tokens = batch["input_ids"][:, batch["prompt_len"]:]
        return exit_token_logprobs(out.exit_hidden_states, self.lm_head, tokens, self.policy_exits,
                                   self.cfg.temperature, deep_logp=logp)

    @torch.no_grad()
    def _old_logprobs(self, samples: list[Sample], mismatch: Mismatch,
                      old_exits: dict[int, torch.Tensor] | None = None) -> dict[int, list[float]]:
        """Update-side logprobs of the whole batch before any update (needed when several updates run).

        With the exit-weighted policy term the same pass also stores each exit's old log-probs in
        `old_exits` (id(sample) -> [|S|, len]): every exit's ratio is taken against its own scoring pass.
        """
        old = {}
        for chunk in self._shards(samples):
            if not chunk:
                if self.world > 1:  # every process runs as many forwards (FSDP2 all-gathers in each, DDP
                    self.logprobs(self._collate(samples[:1]))  # syncs buffers in each)
                continue
            batch = self._collate(chunk)
            logp, _, out = self.logprobs(batch, output_exits=old_exits is not None)
            mismatch.add(logp, batch)
            exit_lp = self._exit_logprobs(out, batch, logp) if old_exits is not None else None
            for i, s in enumerate(chunk):
                old[id(s)] = logp[i, :len(s.completion_ids)].tolist()
                if exit_lp is not None:
                    old_exits[id(s)] = exit_lp[i, :, :len(s.completion_ids)].clone()
        return old

    # ------------------------------------------------------------------ update

    def update(self, samples: list[Sample], step: int) -> dict[str, float]:
        """num_iterations passes over mini-batches, one optimizer step each; returns global metrics.
        `step`: training steps done before this one (warnings name step + 1, as metrics.jsonl counts)."""
        cfg = self.cfg
        if self.share_prompts and not self._shared_checked:
            self._check_shared_prompts(samples)
        mini = cfg.mini_batch_size or len(samples)
        mini_batches = [samples[i:i + mini] for i in range(0, len(samples), mini)]
        stats = UpdateStats()
        for t in self.policy_exits or []:  # same keys on every process (reduce_sum packs them in order)
            stats.sums.update({f"policy/logp_t{t}": 0.0, f"policy/w_t{t}": 0.0})
        # One update: the update forward itself is "before the first update" and old = current.
        # Several: score the whole batch first (old logprobs for the ratio, and the mismatch).
        # (lora_dropout: the scoring pass is apart, dropout-free, so mismatch/* and the ratio's old side are exact)
        # (a mask mode needs the scoring pass too: its rejected tokens leave the normaliser before any backward)
        single_update = cfg.num_iterations == 1 and len(mini_batches) == 1 and not self._lora_dropout \
            and not self.tis_masks
        old_exits: dict[int, torch.Tensor] | None = {} if self.policy_exits is not None else None
        old = None if single_update else self._old_logprobs(samples, stats.mismatch, old_exits)
        self._old_exits = old_exits
        self._sd_now = dataclasses.replace(self.sd, coef=self.sd.coef_at(step + 1))  # self_distill_warmup_steps
        for it in range(cfg.num_iterations):
            for mb in mini_batches:
                tokens = trained_tokens(mb, cfg.mask_truncated)
                sd_norm = max(tokens, 1) / self.world
                kept_tokens, kept_sequences = self._kept(mb, old, tokens) if self.tis_masks else (tokens, len(mb))
                norm = loss_normaliser(cfg.loss_type, kept_sequences, kept_tokens, cfg.max_new_tokens) / self.world
                shards = self._shards(mb)
                filler = own_filler(shards)  # a row this process scored: its old log-probs are here
                biggest = max(range(len(shards)), key=lambda k: len(shards[k]))  # exit metrics: most rows
                finite = True
                for k, chunk in enumerate(shards):
                    micro = MicroBatch(chunk or filler, dummy=not chunk, first_pass=it == 0,
                                       exit_metrics=it == 0 and k == biggest and not stats.exits)
                    with self._gradient_sync(last=k == len(shards) - 1):
                        finite &= self._backward(micro, norm, sd_norm, old, stats)
                grad_norm = self._optimizer_step(finite, step)
                if grad_norm is None:
                    stats.skipped += 1
                else:
                    stats.grad_norms.append(grad_norm)
        metrics = self._metrics(stats, cfg.num_iterations * len(mini_batches))
        metrics["weights/nonfinite"] = self.nonfinite_weights()  # the trainer stops on any (never saved)
        return metrics

    def nonfinite_weights(self) -> int:
        """inf/NaN values in the policy's weights (max over processes: each holds all of them or a shard)."""
        return int(reduce_max(self.accelerator, float(count_nonfinite(self.model.parameters()))))

    @contextlib.contextmanager
    def _gradient_sync(self, last: bool):
        """One micro-batch's gradient-sync state: only an update's last micro-batch syncs.

        accelerate's `sync_gradients` flag drives every backend, so it is set for each micro-batch:
        DDP and FSDP2 skip the all-reduce inside `no_sync`, and under DeepSpeed `accelerator.backward`
        marks the gradient-accumulation boundary with it and calls `engine.step()` (clip, optimizer
        step, zero) only where it is set; left alone it stays True and DeepSpeed stepped once per
        micro-batch. It is True again afterwards: accelerate's optimizer wrapper skips its step while
        it is False, and `_optimizer_step` runs after the last micro-batch.
        """
        acc = self.accelerator
        acc.sync_gradients = last
        try:
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                yield
        finally:
            acc.sync_gradients = True

    def _correction(self, old_lp: torch.Tensor, batch: dict) -> Correction:
        cfg = self.cfg
        return rollout_correction(self.tis_mode, old_lp, batch["rollout_logprobs"], batch["completion_mask"],
                                  cfg.tis_cap, cfg.tis_floor)

    def _kept(self, mb: list[Sample], old: dict[int, list[float]], tokens: int) -> tuple[float, float]:
        """Global (tokens, sequences) a mask mode leaves in the loss: the normaliser counts only what trains.
        A sequence counts unless the mask rejected all its trained tokens. The rows are collated as
        `_backward` collates them, so both see the same keep-mask."""
        masked = dropped = 0.0
        for chunk in self._shards(mb):
            if chunk:
                batch = self._collate(chunk, [old[id(s)] for s in chunk])
                cmask = batch["completion_mask"]
                kept = cmask * self._correction(batch["old_logprobs"], batch).keep
                masked += float((cmask - kept).sum())
                dropped += float(((cmask.sum(-1) > 0) & (kept.sum(-1) == 0)).sum())
        totals = reduce_sum(self.accelerator, {"masked": masked, "dropped": dropped})
        return tokens - totals["masked"], len(mb) - totals["dropped"]

    def _backward(self, micro: MicroBatch, norm: float, sd_norm: float, old: dict[int, list[float]] | None,
                  stats: UpdateStats) -> bool:
        """Forward at the update depth, objective, backward; adds to `stats`. Returns whether the loss is finite."""
        cfg = self.cfg
        batch = self._collate(micro.rows, [old[id(s)] for s in micro.rows] if old is not None else None)
        measure = not micro.dummy
        want_exits = self.objective_uses_exits or (self.looped and micro.exit_metrics and measure)
        with dropout_active(self.module, self._lora_dropout):
            logp, entropy, out = self.logprobs(batch, output_exits=want_exits, with_entropy=micro.first_pass)
        if old is None:  # a single update: this forward is the policy that sampled
            old_lp = logp.detach()
            if measure:
                stats.mismatch.add(logp, batch)
        else:
            old_lp = batch["old_logprobs"]
        ref_lp = None
        if cfg.beta > 0:
            with torch.no_grad(), self._reference() as reference:
                ref_lp, _, _ = self.logprobs(batch, model=reference)
        cmask = batch["completion_mask"]
        correction = self._correction(old_lp, batch) if self.tis_mode != "off" else None
        is_w = correction.weights if correction is not None else None
        loss_mask = cmask * correction.keep if self.tis_masks else cmask  # rejected tokens leave the loss
        if measure and micro.first_pass:
            stats.raw.add(old_lp, batch["rollout_logprobs"], cmask, correction.keep if self.tis_masks else None)
        exit_terms = self._exit_terms(out, batch, logp, micro.rows, old is None) \
            if self.policy_exits is not None else {}
        # the PPO ratio's reference: the weights before this step's first update (proximal), or, for stale
        # samples under off_policy_ratio behaviour, the policy that sampled them (docs/OBJECTIVE.md)
        ratio_ref = batch["rollout_logprobs"] if self.behaviour_ratio else old_lp
        token_terms = policy_loss(cfg.loss_type, logp, ratio_ref, batch["advantages"], loss_mask, norm,
                                  eps_low=cfg.eps_low, eps_high=cfg.eps_high, cispo_cap=cfg.cispo_cap,
                                  ref_logp=ref_lp, beta=cfg.beta, is_weights=is_w, **exit_terms)
        exits = out.exit_hidden_states if want_exits else None
        mask = exit_mask(batch) if want_exits else None
        gate = self._gate_term(out, batch, sd_norm) if cfg.gate_loss_coef > 0 else None
        total = objective(token_terms, exits=exits, self_distill=self._sd_now if want_exits else None,
                          exit_mask=mask, lm_head=self.lm_head, sd_normaliser=sd_norm, gate=gate)
        if micro.exit_metrics and measure and want_exits:
            stats.exits = exit_metrics([h.detach() for h in exits], self.lm_head, mask,
                                       getattr(out, "exit_probs", None))
        loss = total.loss * 0.0 if micro.dummy else total.loss
        finite = bool(torch.isfinite(loss))
        # accelerate (DeepSpeed: its engine) divides the loss by gradient_accumulation_steps; ours already
        # carries the mini-batch's global normaliser, so that division is undone (x 1 by default)
        # the adapter's dropout again: activation checkpointing re-runs each layer's forward in backward, with
        # the forward's RNG state, so it draws the forward's masks only if the dropout is on there too
        with dropout_active(self.module, self._lora_dropout):
            self.accelerator.backward(loss * self.accelerator.gradient_accumulation_steps)
        if measure:
            sums = stats.sums
            sums["sd"] += total.terms.get("self_distill", 0.0)
            sums["gate"] += total.terms.get("gate", 0.0)
            if exit_terms and micro.first_pass:
                for key, value in exit_policy_metrics(self.policy_exits, exit_terms["exit_logp"],
                                                      exit_terms["exit_weights"], cmask).items():
                    sums[key] = sums.get(key, 0.0) + value
            if micro.exit_metrics and gate is not None:
                stats.exits.update({k: v for k, v in total.terms.items() if k.startswith("gate/")})
            sums["loss"] += float(token_terms.loss.detach())
            sums["clip_low"] += float(token_terms.clip_low)
            sums["clip_high"] += float(token_terms.clip_high)
            sums["kl"] += float(token_terms.kl_sum)
            sums["tis"] += float(token_terms.tis_sum)
            sums["tokens"] += float(loss_mask.sum())
            if entropy is not None:
                sums["entropy"] += float((entropy * cmask).sum())
                sums["entropy_tokens"] += float(cmask.sum())
        return finite

    @contextlib.contextmanager
    def _reference(self):
        """The KL reference model: the frozen copy, or with LoRA the base itself (adapter disabled)."""
        if self.peft is None:
            yield self.ref_model
        else:
            with self.peft.disable_adapter():
                yield self.module

    def _exit_terms(self, out, batch: dict, logp: torch.Tensor, rows: list[Sample], on_policy: bool) -> dict:
        """policy_loss's exit arguments: per-exit log-probs, their old values, the weights w_t."""
        exit_lp = self._exit_logprobs(out, batch, logp)
        if on_policy:  # a single update: this forward is the scoring pass
            old = exit_lp.detach()
        else:
            old = torch.zeros_like(exit_lp)
            for i, s in enumerate(rows):
                stored = self._old_exits[id(s)]
                old[i, :, :stored.shape[1]] = stored
        c_len = exit_lp.shape[-1]
        probs = out.exit_probs[:, -(c_len + 1):-1] if getattr(out, "exit_probs", None) is not None else None
        weights = weights_for(self.exit_policy, self.policy_exits, probs, self.exit_weights,
                              (exit_lp.shape[0], c_len))
        return {"exit_logp": exit_lp, "exit_old_logp": old, "exit_weights": weights}

    def _gate_term(self, out, batch: dict, normaliser: float) -> GateTerm:
        """The Stage-II gate loss's inputs: every exit's sampled-token log-probs (no grad), the gate."""
        tokens = batch["input_ids"][:, batch["prompt_len"]:]
        with torch.no_grad():
            all_lp = exit_token_logprobs(out.exit_hidden_states, self.lm_head, tokens,
                                         list(range(1, len(out.exit_hidden_states) + 1)), self.cfg.temperature)
        return GateTerm(self.cfg.gate_loss_coef, out.exit_hidden_states, self.module.model.exit_gate_logits,
                        all_lp, batch["completion_mask"], normaliser)

    def _optimizer_step(self, finite: bool, step: int) -> float | None:
        """Clip, step, zero. A non-finite loss or gradient skips the step (returns None)."""
        if self.exit_weights is not None and self.world > 1:  # not inside DDP: average its gradient by hand
            grad = self.exit_weights.logits.grad
            if grad is None:
                self.exit_weights.logits.grad = grad = torch.zeros_like(self.exit_weights.logits)
            torch.distributed.all_reduce(grad)
            grad /= self.world
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or float("inf"))
        grad_norm = float(full_tensor(grad_norm)) if grad_norm is not None else float("nan")
        if not finite or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"step {step + 1}: non-finite loss or gradient (grad_norm={grad_norm}); update skipped",
                          RuntimeWarning, stacklevel=3)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _metrics(self, stats: UpdateStats, n_updates: int) -> dict[str, float]:
        acc, mm = self.accelerator, stats.mismatch
        totals = reduce_sum(acc, stats.sums)
        mm_sums = reduce_sum(acc, {"abs_sum": mm.abs_sum, "kl_sum": mm.kl_sum, "tokens": mm.tokens})
        tokens = max(totals["tokens"], 1.0)
        metrics = {
            # each process's loss is (its token sum) * world / normaliser: sum over processes / world
            "loss/policy": totals["loss"] / self.world / n_updates,
            "clip/frac_low": totals["clip_low"] / tokens,
            "clip/frac_high": totals["clip_high"] / tokens,
            "clip/frac": (totals["clip_low"] + totals["clip_high"]) / tokens,
            "entropy": totals["entropy"] / max(totals["entropy_tokens"], 1.0),
            "mismatch/logp_abs_max": reduce_max(acc, mm.abs_max),
            "mismatch/logp_abs_mean": mm_sums["abs_sum"] / max(mm_sums["tokens"], 1.0),
            "mismatch/kl": mm_sums["kl_sum"] / max(mm_sums["tokens"], 1.0),
            "grad_norm": sum(stats.grad_norms) / len(stats.grad_norms) if stats.grad_norms else float("nan"),
            "updates/skipped": stats.skipped,
        }
        if self.cfg.beta > 0:
            metrics["kl_ref"] = totals["kl"] / tokens
        if self.use_tis:
            metrics["tis/weight_mean"] = totals["tis"] / tokens
        if self.sd.enabled:
            metrics["loss/self_distill"] = totals["sd"] / self.world / n_updates
            metrics["self_distill/coef"] = self._sd_now.coef
        if self.cfg.gate_loss_coef > 0:
            metrics["loss/gate"] = totals["gate"] / self.world / n_updates
        if self.policy_exits is not None:  # token means over the first pass (entropy's tokens)
            for t in self.policy_exits:
                for name in (f"policy/logp_t{t}", f"policy/w_t{t}"):
                    metrics[name] = totals.get(name, 0.0) / max(totals["entropy_tokens"], 1.0)
        metrics.update(stats.exits)
        metrics.update(self._raw_metrics(stats.raw))
        return metrics

    def _raw_metrics(self, raw: RawRatios) -> dict[str, float]:
        """is/*: token-weighted mean (sums add), max of maxima, min of minima over processes."""
        acc = self.accelerator
        sums = reduce_sum(acc, {"ratio_sum": raw.ratio_sum, "tokens": raw.tokens, "masked": raw.masked})
        return raw_ratio_metrics(sums["ratio_sum"], sums["tokens"], reduce_max(acc, raw.log_max),
                                 -reduce_max(acc, -raw.log_min), sums["masked"])

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path, tokenizer) -> None:
        """The final model directory, written atomically and loadable without looprl (rl/model_io.py
        save_portable); the main process writes, every process joins the state-dict gather."""
        acc = self.accelerator
        if self.sharded:  # FSDP2: the gathered full-weight copy is the model to save
            module, state = self.full_weights(), None
        elif self.peft is not None:  # LoRA: the merged weights W + delta under the base names (looped/adapters.py)
            module, state = self.module, dict(merged_named_parameters(self.module))
        else:
            module, state = self.module, acc.get_state_dict(self.model)  # collective under ZeRO-3
        if acc.is_main_process:
            from rl.run_dir import atomic_dir

            with atomic_dir(path) as tmp:  # a full disk leaves the previous final/ (or none), never half of one
                save_portable(module, tokenizer, tmp, special_tokens=self.cfg.special_tokens,
                              state_dict=state)  # + model code and auto_map
                if self.peft is not None:  # the adapter alone, loadable with peft onto the base model
                    self.peft.save_pretrained(Path(tmp) / "adapter")
                if self.exit_weights is not None:  # the learned policy-exit weights travel with the model
                    weights = self.exit_weights().detach().cpu().tolist()
                    (Path(tmp) / "policy_exit_weights.json").write_text(json.dumps(
                        {"exits": self.policy_exits, "weights": weights,
                         "logits": self.exit_weights.logits.detach().cpu().tolist()}, indent=1) + "\n")
