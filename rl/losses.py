"""Policy-gradient losses of the GRPO family, as a registry: `@register_loss("name")`, one signature.

A loss turns per-token log-probs into a per-token surrogate (plus its clip counts); rl/objective.py adds
the corrections every loss shares (TIS weights, KL to a reference, self-distillation) and aggregates.
How a loss aggregates is part of its registration, because the *normaliser is a property of the whole
optimizer mini-batch* (all micro-batches, all processes), not of one micro-batch: gradient accumulation
and data parallelism then give the same gradient as one big batch.

- grpo:    mean over each sequence's tokens, then mean over sequences   (norm = number of sequences)
- dapo:    sum over every token of the mini-batch / number of tokens    (token-level, clip-higher)
- dr_grpo: sum over tokens / (number of sequences * max_new_tokens)     (no length bias)
- cispo:   token-level REINFORCE weighted by the truncated, detached IS ratio (never zero gradient)

Adding a loss: write `fn(log_ratio_terms...)` with the signature of `LossFn` below, decorate it with
`@register_loss("my_loss", normaliser="tokens")`, and `--loss_type my_loss` selects it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint

NORMALISERS = ("sequences", "tokens", "sequence_budget")


@dataclass(frozen=True)
class LossOptions:
    """The knobs a surrogate may read (config keys eps_low, eps_high, cispo_cap)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    cispo_cap: float = 5.0


@dataclass
class TokenSurrogate:
    """A loss's per-token output: the surrogate [B, L] and the counts of clipped tokens (no grad)."""

    per_token: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor


class LossFn(Protocol):
    def __call__(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 opts: LossOptions) -> TokenSurrogate:
        """logp/old_logp/mask: [B, L]; advantages: [B, 1] (broadcast over tokens), in logp's dtype.

        `mask` only counts clipped tokens (the caller masks and aggregates the surrogate); it may hold
        fractional token weights (the exit-weighted policy term passes mask * w_t).
        """
        ...


@dataclass(frozen=True)
class RegisteredLoss:
    name: str
    fn: LossFn
    normaliser: str  # one of NORMALISERS: what the mini-batch's token sum is divided by
    sequence_mean: bool  # average each sequence's tokens before summing (grpo)


LOSSES: dict[str, RegisteredLoss] = {}


def register_loss(name: str, *, normaliser: str = "tokens",
                  sequence_mean: bool = False) -> Callable[[LossFn], LossFn]:
    """Register a surrogate under `name` (the value of config key `loss_type`)."""
    if normaliser not in NORMALISERS:
        raise ValueError(f"register_loss({name!r}): normaliser {normaliser!r} is not one of {NORMALISERS}")

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = RegisteredLoss(name, fn, normaliser, sequence_mean)
        return fn

    return wrap


def get_loss(name: str) -> RegisteredLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"config key 'loss_type': unknown loss {name!r} (registered: {', '.join(LOSSES)})") from None


def loss_normaliser(loss_type: str, num_sequences: int, num_tokens: int, max_new_tokens: int) -> float:
    """The divisor of one optimizer mini-batch for `loss_type` (see module docstring), counted globally."""
    kind = get_loss(loss_type).normaliser
    if kind == "sequences":
        return float(max(num_sequences, 1))
    if kind == "tokens":
        return float(max(num_tokens, 1))
    return float(max(num_sequences, 1) * max_new_tokens)


def _clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       opts: LossOptions) -> TokenSurrogate:
    """PPO's clipped ratio objective with asymmetric bounds (DAPO's clip-higher when eps_high > eps_low)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - opts.eps_low, 1.0 + opts.eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    clip_low = ((ratio < 1.0 - opts.eps_low) & (advantages < 0)).to(logp.dtype).mul(mask).sum().detach()
    clip_high = ((ratio > 1.0 + opts.eps_high) & (advantages > 0)).to(logp.dtype).mul(mask).sum().detach()
    return TokenSurrogate(per_token, clip_low, clip_high)


register_loss("grpo", normaliser="sequences", sequence_mean=True)(_clipped_surrogate)
register_loss("dapo", normaliser="tokens")(_clipped_surrogate)
register_loss("dr_grpo", normaliser="sequence_budget")(_clipped_surrogate)


@register_loss("cispo", normaliser="tokens")
def cispo(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
          opts: LossOptions) -> TokenSurrogate:
    """REINFORCE weighted by the detached IS ratio truncated at cispo_cap: clipped tokens keep a gradient."""
    ratio = torch.exp(logp - old_logp)
    weight = torch.clamp(ratio, max=opts.cispo_cap).detach()
    per_token = -weight * advantages * logp
    clip_low = torch.zeros((), dtype=logp.dtype)
    clip_high = ((ratio > opts.cispo_cap) & (advantages > 0)).to(logp.dtype).mul(mask).sum().detach()
    return TokenSurrogate(per_token, clip_low, clip_high)


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


def checkpointed_chunks(fn: Callable[..., torch.Tensor], rows: Sequence[torch.Tensor], chunk_size: int,
                        *args) -> Iterator[torch.Tensor]:
    """fn(*args, *row_chunks) for successive chunks of `chunk_size` rows of `rows` (same first dimension).

    Why: fn projects hidden states to vocabulary-sized logits. Chunking bounds those logits to `chunk_size`
    rows at a time, and when any row needs a gradient each chunk runs under activation checkpointing, so
    backward recomputes the logits instead of autograd storing them (self-distillation, the exit term).
    """
    need_grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    for start in range(0, rows[0].shape[0], chunk_size):
        chunk = [r[start:start + chunk_size] for r in rows]
        yield checkpoint(fn, *args, *chunk, use_reentrant=False) if need_grad else fn(*args, *chunk)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Token-level truncated importance sampling (TIS): min(pi_trainer / pi_rollout, cap), detached."""
    return torch.clamp(torch.exp(old_logp - rollout_logp), max=cap).detach()
