"""The update's objective: the registered policy surrogate plus every correction term, in one function.

    loss = aggregate( surrogate * tis_weight + beta * k3_kl(ref) )      (token terms, rl/losses.py aggregation)
         + self_distill_coef * self_distill(exits)                       (rl/self_distill.py)
         [+ exit terms: the multi-exit policy term plugs in here, see `objective`]

Token terms are added before aggregation so that they share the loss's normaliser; terms over the exits of
a looped model come after, each with its own coefficient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl.losses import LossOptions, get_loss


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
) -> LossOutput:
    """The token terms: registered surrogate, times TIS weights, plus k3 KL; aggregated with `normaliser`.

    logp/old_logp/ref_logp/mask/is_weights: [B, L]; advantages: [B] (one per sequence, broadcast).
    is_weights: detached truncated importance weights pi_old/pi_rollout when the rollout engine's
    log-probs differ from the trainer's (the TIS correction); None means 1.
    """
    registered = get_loss(loss_type)
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    surrogate = registered.fn(logp, old_logp, adv, mask, LossOptions(eps_low, eps_high, cispo_cap))
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


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # what backward() runs on
    policy: LossOutput  # the token terms (their loss is logged as loss/policy)
    terms: dict[str, float] = field(default_factory=dict)  # other terms' values, coefficient-free (loss/<name>)


def objective(policy: LossOutput, *, exits=None, self_distill=None, exit_mask: torch.Tensor | None = None,
              lm_head=None, sd_normaliser: float | None = None) -> ObjectiveOutput:
    """The full loss of one micro-batch: the token terms plus the terms over a looped model's exits.

    exits: the forward's per-loop hidden states (model(..., output_exits=True).exit_hidden_states) or None;
    self_distill: a SelfDistillConfig (its `coef` applied here) or None.
    Seam: further exit terms (the multi-exit policy term) are added below, each as `coef * term` with its
    value recorded in `terms` under its metric name.
    """
    loss, terms = policy.loss, {}
    if self_distill is not None and self_distill.enabled:
        sd_loss, _ = self_distill.loss(exits, lm_head, exit_mask, normalizer=sd_normaliser)
        loss = loss + self_distill.coef * sd_loss
        terms["self_distill"] = float(sd_loss.detach())
    return ObjectiveOutput(loss, policy, terms)
