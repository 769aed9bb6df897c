"""Next-token sampling from last-position logits, with the logprob the policy update can reproduce.

Logprob convention (shared by every engine the trainer compares against):
  * temperature > 0: log softmax(logits / temperature) of the sampled token, in fp32, over the FULL
    vocabulary. top-k / top-p only decide which tokens may be drawn; they do not renormalise the
    reported logprob. This is exactly what the update recomputes from a plain forward
    (log_softmax(logits / T)), so with top_p=1 and top_k=0 (the RL defaults) sampling and
    scoring distributions coincide; with truncation the reported value is the untruncated one.
  * temperature == 0 (greedy): argmax token, logprob = log softmax(logits) (temperature 1).
"""

from __future__ import annotations

import torch


def truncate_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Return `scaled` with tokens outside the top-k / nucleus set to -inf (at least one token kept)."""
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def scale_logits(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits / temperature (temperature 0 = greedy scores logits at temperature 1) and their logsumexp.

    `scaled[token] - log_norm` is the reported logprob (the convention above)."""
    scaled = logits.float()
    if temperature not in (0, 1):
        scaled = scaled / temperature
    # logprob = scaled[token] - logsumexp(scaled): no [B, V] log-softmax tensor is materialised.
    return scaled, scaled.logsumexp(dim=-1, keepdim=True)


def sampling_probs(scaled: torch.Tensor, log_norm: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution tokens are actually drawn from: softmax of the top-k / nucleus-truncated scaled logits.

    Speculative decoding needs it explicitly (target and draft probabilities of the same token)."""
    if top_k > 0 or top_p < 1.0:
        return truncate_logits(scaled, top_k, top_p).softmax(dim=-1)
    return (scaled - log_norm).exp_()


def race_draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from non-negative weights [..., V] (need not be normalised).

    Exponential race (Gumbel-max in disguise): argmax p_i / E_i with E_i = -log(U_i) ~ Exp(1) draws token i
    with probability p_i / sum(p). No host sync (unlike torch.multinomial on GPU), and on CPU torch.rand + log
    is ~5x faster than Tensor.exponential_ / torch.multinomial. U = 0 gives E = inf, i.e. that token is never
    drawn; U < 1 always, so E > 0 and there is no 0/0. Zero-weight tokens are never drawn.
    """
    race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    return (probs / race).argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from [B, V] logits. Returns (tokens [B] int64, logprobs [B] fp32)."""
    scaled, log_norm = scale_logits(logits, temperature)
    if temperature == 0:
        tokens = scaled.argmax(dim=-1)
    else:
        tokens = race_draw(sampling_probs(scaled, log_norm, top_k, top_p), generator)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)) - log_norm
    return tokens, logprobs.squeeze(-1)
