"""Self-distillation of shallow exits toward the deep exit of a looped LM, plus exit-alignment metrics.

Fixed-depth RL trains only the deep exit T; the shallow exits share the weights and drift, which
breaks early exit. The remedy (see docs/self_distillation research notes) is an extra loss on the
rollout tokens of the update forward:

    sum_{t in exits} w_t * mean_tokens KL( stopgrad(p_T) || p_t ),   p_t = softmax(lm_head(h_t) / tau)

* teacher = the current policy's deep exit from the SAME forward pass, stop-gradient (no grad reaches
  p_T, not even through the shared lm_head), so the term never pulls the deep policy toward the
  shallow ones;
* forward KL (soft cross-entropy with teacher probabilities); no tau**2 rescaling (the coefficient
  is the trainer's `self_distill_coef`, applied by the caller: this module returns the coef-free sum);
* exits default to 2..T-1: exit 1 is excluded because one loop cannot do what the deep exit does and
  its large KL would dominate the gradient; when T == 2 the only shallow exit, 1, is used instead;
* weights w_t uniform or proportional to t, normalised to sum to 1;
* computed over token chunks, each under activation checkpointing, so neither the forward nor the
  backward ever holds more than `chunk_size` tokens x vocabulary x (|exits|+1) logits
  (a 49k vocabulary at 8k tokens would be ~1.6 GB per exit unchunked).

Variants: `top_k` (the teacher keeps its k most likely tokens plus one tail bucket holding the rest
of the mass; the student is compared on the same k+1 bins) and `variant="mse"` (LoopFormer-style
mean squared error between normed hidden states, stop-gradient on the deep state).

The trainer's flat config keys are defined and validated in rl/self_distill_config.py (torch-free,
re-exported here: `SelfDistillConfig` holds the defaults, `SELF_DISTILL_DEFAULTS` maps them to the flat
key names, `validate_self_distill` checks them); rl/config.py only carries them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rl.losses import checkpointed_chunks
from rl.self_distill_config import (  # noqa: F401  (the config keys' defaults and rules, re-exported)
    DEFAULT_CHUNK_SIZE,
    SELF_DISTILL_DEFAULTS,
    VARIANTS,
    WEIGHTINGS,
    SelfDistillConfig,
    _parse_exits,
    exit_weights,
    resolve_exits,
    validate_self_distill,
)


def _kl_full(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) over the full vocabulary (fp32)."""
    t_logp = F.log_softmax(teacher_logits, dim=-1)
    s_logp = F.log_softmax(student_logits, dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)


def _log_topk_plus_tail(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the k bins `idx` plus one tail bin holding all the other tokens: [..., k+1]."""
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.gather(-1, idx) - log_z
    rest = logits.scatter(-1, idx, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z
    return torch.cat([top, tail], dim=-1)


def _kl_topk(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token KL on the teacher's top-k tokens + a tail bucket (a lower bound of the full KL)."""
    idx = teacher_logits.topk(k, dim=-1).indices
    t_logp = _log_topk_plus_tail(teacher_logits, idx)
    s_logp = _log_topk_plus_tail(student_logits, idx)
    t_p = t_logp.exp()
    terms = torch.where(t_p > 0, t_p * (t_logp - s_logp), torch.zeros_like(t_p))
    return terms.sum(-1)


def _chunk_kl_sums(lm_head, temperature: float, top_k: int | None, teacher_h: torch.Tensor,
                   *student_hs: torch.Tensor) -> torch.Tensor:
    """Sum over this chunk's tokens of KL(sg p_T || p_t), one entry per student exit: [len(student_hs)]."""
    with torch.no_grad():
        teacher_logits = lm_head(teacher_h).float() / temperature
    sums = []
    for h in student_hs:
        student_logits = lm_head(h).float() / temperature
        if top_k is not None and top_k < teacher_logits.shape[-1]:
            kl = _kl_topk(teacher_logits, student_logits, top_k)
        else:
            kl = _kl_full(teacher_logits, student_logits)
        sums.append(kl.sum())
    return torch.stack(sums)


def _masked_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B,S,H] -> [N,H] rows where mask is set (prompt / padding positions are never projected)."""
    return hidden[mask]


def self_distill_loss(
    exit_hidden_states: Sequence[torch.Tensor],
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    *,
    exits=None,
    weighting: str = "linear",
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    variant: str = "kl",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Coef-free self-distillation loss sum_t w_t * mean_tokens KL(sg p_T || p_t), and its metrics.

    exit_hidden_states: one normed [B,S,H] state per loop run (model(..., output_exits=True)); the
      last one is the teacher. lm_head: the model's output projection (model.lm_head).
    mask: [B,S] bool/0-1, set where the prediction made AT that position is trained (for completion
      tokens that is the completion mask shifted left by one, as for the policy loss).
    normalizer: divide the token sum by this instead of mask.sum() (e.g. the token count of the whole
      global batch when micro-batches are accumulated).
    Returns (loss, {"loss/self_distill": ..., "self_distill/kl_t{t}" or "self_distill/mse_t{t}": ...}),
    where the per-exit entries are token means (unweighted).
    """
    depth = len(exit_hidden_states)
    chosen = resolve_exits(exits, depth)
    weights = exit_weights(chosen, weighting)
    if variant not in VARIANTS:
        raise ValueError(f"config key self_distill_variant: {variant!r} is not one of {VARIANTS}")
    if not temperature > 0:
        raise ValueError(f"config key self_distill_temperature: must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"config key self_distill_chunk_size: must be >= 1, got {chunk_size}")
    deep = exit_hidden_states[-1]
    if mask.shape != deep.shape[:2]:
        raise ValueError(f"self-distillation mask has shape {tuple(mask.shape)}, expected {tuple(deep.shape[:2])}")
    mask = mask.bool()
    n_tokens = int(mask.sum())
    denom = float(n_tokens) if normalizer is None else normalizer
    students = [exit_hidden_states[t - 1] for t in chosen]
    w = torch.tensor(weights, dtype=torch.float32, device=deep.device)

    if n_tokens == 0:  # keep the graph connected (DDP) but contribute nothing
        zero = sum(h.sum() for h in students) * 0.0
        return zero.float(), {"loss/self_distill": 0.0}

    teacher_rows = _masked_rows(deep, mask).detach()
    student_rows = [_masked_rows(h, mask) for h in students]
    name = "kl" if variant == "kl" else "mse"
    if variant == "mse":  # LoopFormer-style: hidden states are small, no chunking needed
        teacher_rows = teacher_rows.float()
        per_exit = torch.stack([((h.float() - teacher_rows) ** 2).mean(-1).sum() for h in student_rows])
    else:
        per_exit = torch.zeros(len(chosen), dtype=torch.float32, device=deep.device)
        for sums in checkpointed_chunks(_chunk_kl_sums, [teacher_rows, *student_rows], chunk_size,
                                        lm_head, temperature, top_k):
            per_exit = per_exit + sums
    loss = (w * per_exit).sum() / denom
    metrics = {"loss/self_distill": float(loss.detach())}
    for t, s in zip(chosen, per_exit.detach()):
        metrics[f"self_distill/{name}_t{t}"] = float(s) / n_tokens
    return loss, metrics


@torch.no_grad()
def exit_metrics(
    exit_hidden_states: Sequence[torch.Tensor],
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    exit_probs: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Token-mean alignment of every shallow exit t < T with the deep exit T (temperature 1).

    exit/kl_t{t}: KL(p_T || p_t); exit/top1_agree_t{t}: argmax p_t == argmax p_T (greedy
    self-speculative acceptance); exit/accept_t{t}: sum_v min(p_t, p_T) = 1 - TV (sampling
    acceptance); exit/p_mean_t{t} (t = 1..T): mean exit-gate probability from the model's exit_probs.
    """
    depth = len(exit_hidden_states)
    mask = mask.bool()
    n_tokens = int(mask.sum())
    out: dict[str, float] = {}
    if n_tokens == 0:
        return out
    if exit_probs is not None:
        gate = exit_probs[mask].float()  # [N, depth]
        for t in range(1, gate.shape[-1] + 1):
            out[f"exit/p_mean_t{t}"] = float(gate[:, t - 1].mean())
    if depth < 2:
        return out
    rows = [_masked_rows(h, mask) for h in exit_hidden_states]
    sums = {(k, t): 0.0 for k in ("kl", "top1_agree", "accept") for t in range(1, depth)}
    for start in range(0, n_tokens, chunk_size):
        teacher_logits = lm_head(rows[-1][start:start + chunk_size]).float()
        t_logp = F.log_softmax(teacher_logits, dim=-1)
        t_top1 = teacher_logits.argmax(-1)
        for t in range(1, depth):
            s_logits = lm_head(rows[t - 1][start:start + chunk_size]).float()
            s_logp = F.log_softmax(s_logits, dim=-1)
            sums[("kl", t)] += float(F.kl_div(s_logp, t_logp, log_target=True, reduction="sum"))
            sums[("top1_agree", t)] += float((s_logits.argmax(-1) == t_top1).sum())
            sums[("accept", t)] += float(torch.minimum(s_logp.exp(), t_logp.exp()).sum())
    for (k, t), s in sums.items():
        out[f"exit/{k}_t{t}"] = s / n_tokens
    return out


def configured_loss(config: SelfDistillConfig, exit_hidden_states, lm_head, mask, normalizer=None):
    """self_distill_loss with a run's settings (`config`; its coef is NOT applied: rl/objective.py does)."""
    return self_distill_loss(
        exit_hidden_states, lm_head, mask, exits=config.exits, weighting=config.weighting,
        temperature=config.temperature, top_k=config.top_k or None, chunk_size=config.chunk_size,
        variant=config.variant, normalizer=normalizer,
    )
