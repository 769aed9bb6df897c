"""Policy-gradient losses of the GRPO family, on per-token log-probs.

All losses take per-token tensors of shape [B, L] plus a 0/1 completion mask and return a scalar
whose *normaliser is supplied by the caller*. The normaliser is a property of the whole optimizer
mini-batch (all micro-batches, all processes), not of one micro-batch, so gradient accumulation and
data parallelism give the same gradient as one big batch:

- grpo:    mean over each sequence's tokens, then mean over sequences   (norm = number of sequences)
- dapo:    sum over every token of the mini-batch / number of tokens    (token-level, clip-higher)
- dr_grpo: sum over tokens / (number of sequences * max_new_tokens)     (no length bias)
- cispo:   token-level REINFORCE weighted by the truncated, detached IS ratio (never zero gradient)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, already divided by the caller's normaliser
    clip_low: torch.Tensor  # counts of tokens clipped on each side (for clip/frac_*), summed, no grad
    clip_high: torch.Tensor
    kl_sum: torch.Tensor  # sum of per-token k3 KL to the reference over masked tokens (0 without ref)
    tis_sum: torch.Tensor  # sum of the IS correction weights over masked tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 log p(token) under softmax(logits / temperature), and optionally the entropy per position.

    Upcasting before the log-softmax is what makes trainer and rollout log-probs agree (the
    sampler scores the same fp32 temperature-scaled distribution).
    """
    scaled = logits.float() / temperature
    logz = torch.logsumexp(scaled, dim=-1)
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logp = picked - logz
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(scaled, dim=-1)
            entropy = logz - (probs * scaled).sum(-1)
    return logp, entropy


def loss_normaliser(loss_type: str, num_sequences: int, num_tokens: int, max_new_tokens: int) -> float:
    """The divisor of one optimizer mini-batch for `loss_type` (see module docstring), counted globally."""
    if loss_type == "grpo":
        return float(max(num_sequences, 1))
    if loss_type in ("dapo", "cispo"):
        return float(max(num_tokens, 1))
    if loss_type == "dr_grpo":
        return float(max(num_sequences, 1) * max_new_tokens)
    raise ValueError(f"config key 'loss_type': unknown loss {loss_type!r}")


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
    """Clipped surrogate (or CISPO) + optional k3 KL, per token, aggregated with `normaliser`.

    logp/old_logp/ref_logp/mask/is_weights: [B, L]; advantages: [B] (one per sequence, broadcast).
    is_weights: detached truncated importance weights pi_old/pi_rollout when the rollout engine's
    log-probs differ from the trainer's (the TIS correction); None means 1.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=cispo_cap).detach()
        per_token = -weight * adv * logp
        clip_low = torch.zeros((), dtype=logp.dtype)
        clip_high = ((ratio > cispo_cap) & (adv > 0)).to(logp.dtype).mul(mask).sum().detach()
    else:
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        clip_low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logp.dtype).mul(mask).sum().detach()
        clip_high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logp.dtype).mul(mask).sum().detach()
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    kl_sum = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, non-negative estimate of KL(pi || ref)
        per_token = per_token + beta * kl
        kl_sum = (kl * mask).sum().detach()
    if loss_type == "grpo":
        lengths = mask.sum(-1).clamp(min=1.0)
        loss = ((per_token * mask).sum(-1) / lengths).sum() / normaliser
    elif loss_type in ("dapo", "dr_grpo", "cispo"):
        loss = (per_token * mask).sum() / normaliser
    else:
        raise ValueError(f"config key 'loss_type': unknown loss {loss_type!r}")
    tis_sum = (is_weights * mask).sum().detach() if is_weights is not None else mask.sum().detach()
    return LossOutput(loss, clip_low, clip_high, kl_sum, tis_sum)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Token-level truncated importance sampling (TIS): min(pi_trainer / pi_rollout, cap), detached."""
    return torch.clamp(torch.exp(old_logp - rollout_logp), max=cap).detach()
