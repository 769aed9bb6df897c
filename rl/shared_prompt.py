"""The update's forward with each distinct prompt computed once: a GRPO group's completions share it.

A micro-batch holds `num_generations` completions of each prompt (fewer where length buckets split a
group). The plain forward runs every row's prompt again: on the default job (7-token prompts, ~8-token
completions) that is almost half of the update's tokens. Here the distinct prompts run once with a KV
cache, the cache is indexed out to every row (a differentiable gather: each prompt's gradient is the
sum over its rows), and the completions run on top of it. The math is the plain forward's; the float
sums run in another order (the logprobs agree to ~1e-6, tests/test_shared_prompt.py).

With lora_dropout > 0 the adapter's dropout draws one mask per distinct prompt, where the plain forward
drew one per row: the same expected gradient, with another variance.

The result has the fields the update reads, laid out as the plain forward's with `logits_to_keep =
c_len + 1`: logits [B, c_len + 1, V] (the last prompt position, then every completion position),
and with output_exits the per-loop exit states and exit probabilities over all P + C positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from looped.hf_compat import CACHE_NAME


@dataclass
class SharedPromptOutput:
    """What the update reads of a forward: the plain forward's output, reassembled."""

    logits: torch.Tensor
    exit_hidden_states: tuple[torch.Tensor, ...] | None = None
    exit_probs: torch.Tensor | None = None


def distinct_prompts(ids: torch.Tensor, attn: torch.Tensor, p_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct prompt [U], each row's prompt index [B]). Collate left-pads prompts to
    `p_len`, so equal prompts are equal columns; the mask columns keep a pad-id token apart from padding."""
    prompts = torch.cat([ids[:, :p_len], attn[:, :p_len]], dim=1)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    return first, inverse


def update_forward(model, ids: torch.Tensor, attn: torch.Tensor, p_len: int,
                   rows: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """The update's forward of collated [B, P + C] `ids`: logits of the last prompt position and of every
    completion position (logits_to_keep = C + 1), positions from the left-padded mask. rows None: every row
    whole (the plain forward); `distinct_prompts`' (first, inverse): each distinct prompt once
    (`shared_prompt_forward`). kwargs: the model's other arguments (depth, output_exits, exit_depth)."""
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    if rows is not None:
        return shared_prompt_forward(model, ids, attn, position_ids, p_len, rows, **kwargs)
    # The last column predicts nothing we train on, but it is still fed: dropping it changed the
    # logprobs by up to 1.4e-4 vs the rollout's (vs <= 4e-5 with it) on the embedded model.
    return model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                 logits_to_keep=ids.shape[1] - p_len + 1, **kwargs)


def shared_prompt_forward(model, ids: torch.Tensor, attn: torch.Tensor, position_ids: torch.Tensor, p_len: int,
                          rows: tuple[torch.Tensor, torch.Tensor], *, output_exits: bool = False,
                          **kwargs) -> SharedPromptOutput:
    """The plain forward of [B, P + C] `ids` (logits_to_keep = C + 1), each distinct prompt run once.

    rows: `distinct_prompts`' (first, inverse). kwargs: the model's other arguments (depth for a looped
    model). Exits, when asked, are concatenated prompt | completion per loop, as the plain forward has them.
    """
    first, inverse = rows
    exits = {"output_exits": True} if output_exits else {}
    cache = DynamicCache()
    head = model(input_ids=ids[first, :p_len], attention_mask=attn[first, :p_len],
                 position_ids=position_ids[first, :p_len], use_cache=True, **{CACHE_NAME: cache},
                 logits_to_keep=1, **exits, **kwargs)
    cache.batch_select_indices(inverse)  # every row reads its own prompt's keys and values
    tail = model(input_ids=ids[:, p_len:], attention_mask=attn, position_ids=position_ids[:, p_len:],
                 use_cache=True, logits_to_keep=0, **{CACHE_NAME: cache}, **exits, **kwargs)
    logits = torch.cat([head.logits[inverse, -1:], tail.logits], dim=1)
    if not output_exits:
        return SharedPromptOutput(logits)
    states = tuple(torch.cat([h[inverse], t], dim=1) for h, t in zip(head.exit_hidden_states, tail.exit_hidden_states))
    probs = torch.cat([head.exit_probs[inverse], tail.exit_probs], dim=1)
    return SharedPromptOutput(logits, states, probs)


@torch.no_grad()
def shared_prompt_gap(model, ids: torch.Tensor, attn: torch.Tensor, p_len: int, **kwargs) -> float:
    """Largest |logit difference| between the shared and the plain forward over the real completion positions,
    relative to the largest |logit| (>= 1). The update checks a model with it once before it trusts the
    cache path with its gradients: a model whose cache is not a plain per-layer K/V store (a recurrent or
    hybrid one) differs."""
    plain = update_forward(model, ids, attn, p_len, **kwargs).logits
    shared = update_forward(model, ids, attn, p_len, distinct_prompts(ids, attn, p_len), **kwargs).logits
    real = attn[:, p_len - 1:].bool()  # the last prompt position and the completion tokens
    plain, shared = plain.float()[real], shared.float()[real]
    return float((plain - shared).abs().max() / plain.abs().max().clamp(min=1.0))
