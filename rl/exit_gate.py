"""Fit the exit gate during RL: Ouro's Stage-II "focused adaptive gate training" on the rollout tokens.

A gate fitted before RL (or never, like the embedded model's, which sits at sigmoid(0)) says nothing
about the RL policy's exits, so `gate` exit weights and gate-based early exit would read noise. This
term re-fits it on the update's own forward, with the LM untouched:

    L^(t)_i  = -log p_t(y_i)                         sampled-token loss at exit t, DETACHED
    I^(t)_i  = max(0, L^(t-1)_i - L^(t)_i)           what loop t added, t = 2..T
    c^(t)_i  = sigmoid(k * (I^(t)_i - gamma))        target: "continue past loop t-1" (k 50, gamma 0.005)
    loss     = (1/T) sum_{t=2..T} sum_i BCE( 1 - lambda_{t-1,i}, c^(t)_i ) / normaliser
    lambda_t = sigmoid(gate(sg h_t))                 the gate reads the DETACHED normed state of loop t

Indexing: the decision to run loop t is taken after loop t-1, so the continuation probability compared
with c^(t) is 1 - lambda_{t-1} (the gate's output at exit t-1). Ouro uses the cross-entropy to the
label; we use the RL rollout tokens' sampled-token NLL as L^(t) (no labels in RL), as the research note
(docs/self_distillation.md, section 5) recommends. Because both the targets and the gate's inputs are
detached, only the gate's parameters receive gradient from this term (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

GATE_K = 50.0
GATE_GAMMA = 0.005


def gate_continuation_targets(exit_logp: torch.Tensor, k: float = GATE_K, gamma: float = GATE_GAMMA) -> torch.Tensor:
    """[B, T-1, C] targets c^(t), t = 2..T, from per-exit sampled-token log-probs [B, T, C] (detached)."""
    loss = -exit_logp.detach().float()
    improvement = (loss[:, :-1] - loss[:, 1:]).clamp(min=0.0)
    return torch.sigmoid(k * (improvement - gamma))


def gate_stage2_loss(exit_hidden_states: Sequence[torch.Tensor], gate_logits_fn: Callable, exit_logp: torch.Tensor,
                     mask: torch.Tensor, normaliser: float | None = None, *, k: float = GATE_K,
                     gamma: float = GATE_GAMMA) -> tuple[torch.Tensor, dict[str, float]]:
    """Coef-free Stage-II gate loss over the completion tokens, and the mean targets per loop.

    exit_hidden_states: per-loop normed states [B, P + C, H] (all T loops); gate_logits_fn: maps a tuple
    of [B, C, H] states to gate logits [B, C, T] (OuroModel.exit_gate_logits); exit_logp: [B, T, C]
    sampled-token log-probs at every exit; mask: [B, C] trained completion tokens; normaliser: divisor of
    the token sum (default: the mask's token count).
    """
    depth = len(exit_hidden_states)
    c_len = mask.shape[1]
    mask = mask.float()
    denom = float(mask.sum().clamp(min=1.0)) if normaliser is None else normaliser
    states = tuple(h[:, -(c_len + 1):-1].detach() for h in exit_hidden_states)
    logits = gate_logits_fn(states).float()  # [B, C, T]
    targets = gate_continuation_targets(exit_logp)  # [B, T-1, C]
    # continuation 1 - lambda_{t-1} = sigmoid(-logit_{t-1}); BCE on logits for stability
    cont_logits = -logits[..., :depth - 1].transpose(1, 2)  # [B, T-1, C]
    bce = F.binary_cross_entropy_with_logits(cont_logits, targets, reduction="none")
    loss = (bce * mask[:, None, :]).sum() / depth / denom
    n = float(mask.sum().clamp(min=1.0))
    metrics = {f"gate/target_continue_t{t}": float((targets[:, t - 2] * mask).sum()) / n for t in range(2, depth + 1)}
    return loss, metrics
