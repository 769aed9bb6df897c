"""Rollout correction: importance weights and masks between the update's old policy and the rollout's sampler.

The tokens were drawn by the rollout engine (pi_rollout: vLLM's bf16 kernels, a speculative sampler, or
later an older policy version); the update's ratio and clip are taken against pi_old, the trainer's own
scoring of the same tokens. Per completion token i of sequence s, in log space (fp32, never exponentiated
before it is bounded, so a long sequence cannot overflow):

    l_i    = log pi_old(y_i) - log pi_rollout(y_i)          raw log-ratio, rho_i = exp(l_i)
    L_s    = sum_{i in s} l_i                                sequence log-ratio, rho_s = exp(L_s)
    G_s    = L_s / |s|                                       geometric mean, g_s = exp(G_s)

    token           w_i = min(rho_i, cap)                                    keep_i = 1
    sequence        w_i = min(rho_s, cap)                (every i in s)      keep_i = 1
    token_mask      w_i = rho_i               keep_i = [floor <= rho_i <= cap]
    sequence_mask   w_i = rho_s               keep_i = [floor <= rho_s <= cap]      (every i in s)
    geometric_mask  w_i = 1                   keep_i = [floor <= g_s <= cap]        (every i in s)

The mask modes are rejection sampling (verl's rollout-correction convention, TRL's *_mask modes): a
rejected token or sequence leaves the loss's mask, so it is neither trained nor counted in the loss's
normaliser (rl/policy.py counts kept tokens/sequences), while kept ones keep their in-band IS weight
(<= cap by construction). geometric_mask is a pure filter: the geometric mean is length-normalised, a
test of "is this sequence off-policy", not an importance weight (the product would be unbounded in the
length), so kept sequences train with weight 1. Weights are 0 on padding and on masked tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rl.config import TIS_MASK_MODES
from rl.losses import truncated_is_weights


@dataclass
class Correction:
    weights: torch.Tensor  # [B, L] detached IS weights (0 where masked)
    keep: torch.Tensor  # [B, L] 1 = the token stays in the loss, 0 = rejected by a mask mode (1 off the masks)


def rollout_correction(mode: str, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       cap: float, floor: float = 0.0) -> Correction:
    """The weights and keep-mask of `mode` (module docstring) for [B, L] log-probs; `mask` marks real tokens."""
    if mode == "token":  # today's TIS, bit for bit
        return Correction(truncated_is_weights(old_logp, rollout_logp, cap), torch.ones_like(mask))
    mask = mask.to(torch.float32)
    log_ratio = ((old_logp.detach().float() - rollout_logp.float()) * mask)
    log_cap = math.log(cap) if cap > 0 else -math.inf  # cap may be inf: log(inf) = inf
    log_floor = math.log(floor) if floor > 0 else -math.inf
    if mode == "sequence":
        seq = log_ratio.sum(-1, keepdim=True).clamp(max=log_cap)
        return Correction(torch.exp(seq).expand_as(mask) * mask, torch.ones_like(mask))
    if mode not in TIS_MASK_MODES:
        raise ValueError(f"config key 'tis_mode': unknown rollout correction {mode!r}")
    if mode == "token_mask":
        level = log_ratio
    elif mode == "sequence_mask":
        level = log_ratio.sum(-1, keepdim=True)
    else:  # geometric_mask
        level = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    keep = ((level >= log_floor) & (level <= log_cap)).to(torch.float32).expand_as(mask) * mask
    if mode == "geometric_mask":
        weights = keep.clone()
    else:  # in-band values only: the exponent is <= log_cap, so exp cannot overflow
        weights = torch.exp(torch.where(keep.bool(), level.expand_as(mask), torch.zeros_like(mask))) * keep
    return Correction(weights.detach(), keep)


@dataclass
class RawRatios:
    """Token statistics of the RAW ratio rho_i = pi_old / pi_rollout (before truncation or masking), summed
    on one process; rl/policy.py reduces them over processes (sums add, max of max, min of min)."""

    ratio_sum: float = 0.0
    tokens: float = 0.0
    log_max: float = -math.inf  # kept as log-ratios: exp at the end, so a huge ratio is inf, not an overflow
    log_min: float = math.inf
    masked: float = 0.0  # completion tokens a mask mode gave weight 0

    def add(self, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
            keep: torch.Tensor | None = None) -> None:
        real = mask.bool()
        if not real.any():
            return
        log_ratio = (old_logp.detach().double() - rollout_logp.double())[real]
        self.ratio_sum += float(torch.exp(log_ratio).sum())
        self.tokens += float(real.sum())
        self.log_max = max(self.log_max, float(log_ratio.max()))
        self.log_min = min(self.log_min, float(log_ratio.min()))
        if keep is not None:
            self.masked += float((mask.to(keep.dtype) * (1.0 - keep)).sum())


def raw_ratio_metrics(ratio_sum: float, tokens: float, log_max: float, log_min: float,
                      masked: float) -> dict[str, float]:
    """is/* from the (process-reduced) RawRatios fields; NaN where no completion token was seen."""
    if tokens <= 0:
        return {"is/raw_mean": math.nan, "is/raw_max": math.nan, "is/raw_min": math.nan, "is/masked_frac": 0.0}
    return {"is/raw_mean": ratio_sum / tokens, "is/raw_max": _exp(log_max), "is/raw_min": _exp(log_min),
            "is/masked_frac": masked / tokens}


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:  # a ratio past float range is reported as inf, not raised
        return math.inf
