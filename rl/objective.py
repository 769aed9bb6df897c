"""The update's objective: the registered policy surrogate plus every correction term, in one function.

    loss = aggregate( sum_{t in S} w_t * surrogate_t * tis_weight + beta * k3_kl(ref) )   (token terms)
         + self_distill_coef * self_distill(exits)                       (rl/self_distill.py)
         + gate_loss_coef * stage2_gate_loss(exits)                      (rl/exit_gate.py)

S = {T}, w_T = 1 unless `policy_exits` says otherwise (the exit-weighted policy term, rl/exit_policy.py,
where the per-exit ratio, clipping and TIS semantics are documented).

Token terms are added before aggregation so that they share the loss's normaliser; terms over the exits of
a looped model come after, each with its own coefficient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rl.exit_gate import gate_stage2_loss
from rl.losses import LossOptions, TokenSurrogate, get_loss
from rl.self_distill import configured_loss


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, already divided by the caller's normaliser
    clip_low: torch.Tensor  # counts of tokens clipped on each side (for clip/frac_*), summed, no grad
    clip_high: torch.Tensor
    kl_sum: torch.Tensor  # sum of per-token k3 KL to the reference over masked tokens (0 without ref)
    tis_sum: torch.Tensor  # sum of the IS correction weights over masked tokens


def policy_loss(
    loss_type: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normaliser: float,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    cispo_cap: float = 5.0,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    is_weights: torch.Tensor | None = None,
    exit_logp: torch.Tensor | None = None,
    exit_old_logp: torch.Tensor | None = None,
    exit_weights: torch.Tensor | None = None,
) -> LossOutput:
    """The token terms: registered surrogate, times TIS weights, plus k3 KL; aggregated with `normaliser`.

    logp/old_logp/ref_logp/mask/is_weights: [B, L]; advantages: [B] (one per sequence, broadcast).
    is_weights: detached truncated importance weights pi_old/pi_rollout when the rollout engine's
    log-probs differ from the trainer's (the TIS correction); None means 1.
    exit_logp/exit_old_logp: [B, K, L] log-probs at the K policy exits (rl/exit_policy.py); with them the
    surrogate is sum_k w_k * surrogate(exit_logp_k, exit_old_logp_k), each exit with its own ratio and
    clip, and exit_weights ([K] or broadcastable to [B, L, K]) are the w_k. TIS and KL are per token as
    without exits (both refer to the deep exit `logp`, the policy that sampled). Clip counts are
    weighted by w_k, so they stay fractions of tokens.
    """
    registered = get_loss(loss_type)
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    opts = LossOptions(eps_low, eps_high, cispo_cap)
    if exit_logp is None:
        surrogate = registered.fn(logp, old_logp, adv, mask, opts)
    else:
        surrogate = _exit_weighted(registered.fn, exit_logp, exit_old_logp, exit_weights, adv, mask, opts)
    per_token = surrogate.per_token
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    kl_sum = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, non-negative estimate of KL(pi || ref)
        per_token = per_token + beta * kl
        kl_sum = (kl * mask).sum().detach()
    if registered.sequence_mean:
        lengths = mask.sum(-1).clamp(min=1.0)
        loss = ((per_token * mask).sum(-1) / lengths).sum() / normaliser
    else:
        loss = (per_token * mask).sum() / normaliser
    tis_sum = (is_weights * mask).sum().detach() if is_weights is not None else mask.sum().detach()
    return LossOutput(loss, surrogate.clip_low, surrogate.clip_high, kl_sum, tis_sum)


def _exit_weighted(fn, exit_logp: torch.Tensor, exit_old_logp: torch.Tensor, weights: torch.Tensor,
                   adv: torch.Tensor, mask: torch.Tensor, opts: LossOptions) -> TokenSurrogate:
    """sum_k w_k * fn(exit k): per-exit ratios and clipping; clip counts weighted by the (detached) w_k."""
    if exit_old_logp is None or weights is None:
        raise ValueError("exit-weighted policy term: exit_old_logp and exit_weights are required with exit_logp")
    num_exits = exit_logp.shape[1]
    w = weights.to(exit_logp.dtype)
    if w.dim() == 1:
        w = w.view(1, 1, -1)
    w = w.expand(mask.shape[0], mask.shape[1], num_exits)
    per_token = torch.zeros_like(mask)
    clip_low = torch.zeros((), dtype=mask.dtype, device=mask.device)
    clip_high = torch.zeros((), dtype=mask.dtype, device=mask.device)
    for k in range(num_exits):
        # the mask argument only counts clipped tokens: w_k-weighted counts keep clip/frac_* in [0, 1]
        out = fn(exit_logp[:, k], exit_old_logp[:, k], adv, mask * w[..., k].detach(), opts)
        per_token = per_token + w[..., k] * out.per_token
        clip_low = clip_low + out.clip_low
        clip_high = clip_high + out.clip_high
    return TokenSurrogate(per_token, clip_low, clip_high)


@dataclass
class GateTerm:
    """The Stage-II gate loss's inputs for one micro-batch (rl/exit_gate.py); its `coef` applied here."""

    coef: float
    exit_hidden_states: tuple[torch.Tensor, ...]
    gate_logits_fn: Callable
    exit_logp: torch.Tensor  # [B, T, C] sampled-token log-probs at every exit
    mask: torch.Tensor  # [B, C]
    normaliser: float


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # what backward() runs on
    policy: LossOutput  # the token terms (their loss is logged as loss/policy)
    terms: dict[str, float] = field(default_factory=dict)  # other terms' values, coefficient-free (loss/<name>)


def objective(policy: LossOutput, *, exits=None, self_distill=None, exit_mask: torch.Tensor | None = None,
              lm_head=None, sd_normaliser: float | None = None, gate: GateTerm | None = None) -> ObjectiveOutput:
    """The full loss of one micro-batch: the token terms plus the terms over a looped model's exits.

    exits: the forward's per-loop hidden states (model(..., output_exits=True).exit_hidden_states) or None;
    self_distill: a SelfDistillConfig (its `coef` applied here) or None; gate: the Stage-II gate term or None.
    (The exit-weighted policy term is a token term: it is already inside `policy`.)
    Further exit terms are added below, each as `coef * term` with its value in `terms` (loss/<name>).
    """
    loss, terms = policy.loss, {}
    if self_distill is not None and self_distill.enabled:
        sd_loss, _ = configured_loss(self_distill, exits, lm_head, exit_mask, normalizer=sd_normaliser)
        loss = loss + self_distill.coef * sd_loss
        terms["self_distill"] = float(sd_loss.detach())
    if gate is not None and gate.coef > 0:
        gate_loss, gate_metrics = gate_stage2_loss(gate.exit_hidden_states, gate.gate_logits_fn, gate.exit_logp,
                                                   gate.mask, gate.normaliser)
        loss = loss + gate.coef * gate_loss
        terms["gate"] = float(gate_loss.detach())
        terms.update(gate_metrics)
    return ObjectiveOutput(loss, policy, terms)
