"""The exit-weighted policy term (RLTT-style): the policy surrogate over several exits of a looped LM.

Fixed-depth RL trains the policy that sampled, exit T. Here every chosen exit t in S is trained as a
policy on the same rollout tokens, and the per-exit surrogates are mixed with weights w_t:

    per_token(i) = sum_{t in S} w_t(i) * surrogate( r_t(i), A ) * tis(i)
    r_t(i)       = exp( logp_t(i) - old_logp_t(i) )          (each exit against ITS OWN old log-prob)
    tis(i)       = min( pi_old,T(i) / pi_rollout(i), tis_cap )  (one weight per token, from exit T)

Semantics (why):
* Ratio per exit, clipped per exit. The behaviour policy is the rollout's exit T for every exit, so
  r_t is not an importance ratio of exit t's return; as in PPO it is a trust-region device: it measures
  how far exit t moved since the scoring pass, and clipping stops exit t's term once it moved eps past
  its old value in the advantage's direction. One ratio per exit keeps a large move in one exit from
  hiding behind a small move in another (a single ratio of the mixed log-prob would). With one update
  per step every r_t is 1, the gradient is A * sum_t w_t grad logp_t: RLTT's on-policy objective.
  Off-policy (num_iterations > 1 or mini-batches) old_logp_t comes from the scoring pass that already
  runs before the first update, now with output_exits.
* TIS corrects the sampler, not the exit: the tokens were drawn by the rollout engine's exit T, so the
  same token weight min(pi_old,T / pi_rollout, cap) multiplies every exit's surrogate.
* The KL to a reference (beta) stays on exit T (the reference forward scores the deep exit only).
* `policy_exits: last` (the default) never enters this module: the trainer's loss is unchanged.

Weights over S (`policy_exit_weights`), normalised to sum to 1 over S:
* uniform:     1 / |S|;
* progressive: t**alpha / sum_{s in S} s**alpha  (`policy_exit_alpha`);
* gate:        the model's per-token exit distribution p(t) (Ouro: lambda_t * prod_{j<t}(1 - lambda_j)),
               restricted to S and renormalised per token; DETACHED: the policy term does not train the
               gate. With gradients, the gate would be pushed toward whichever exit has the lowest
               surrogate (for A > 0 the exit already most sure of the sampled token), a signal about the
               loss, not about when an exit is good enough. The gate is trained only by the Stage-II
               gate loss (`gate_loss_coef`, rl/exit_gate.py).
* learned:     softmax over |S| free logits (`ExitWeights`, initialised to 0 = uniform), trained by the
               same weighted surrogate in the optimizer (own param group), saved in checkpoints and
               restored by --resume. Their gradient is sum_t dw_t * surrogate_t: for the ratio losses
               (grpo, dapo, dr_grpo) every surrogate equals -A at ratio 1, so on-policy (one update per
               step) the logits do not move; they move off-policy, and under cispo (REINFORCE form
               -w A logp_t, whose value differs across exits) also on-policy.

Flat config keys: policy_exits, policy_exit_weights, policy_exit_alpha (validated here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rl.exits import exit_numbers
from rl.losses import checkpointed_chunks, token_logprobs
from rl.self_distill_config import DEFAULT_CHUNK_SIZE

WEIGHTINGS = ("uniform", "progressive", "gate", "learned")


@dataclass(frozen=True)
class ExitPolicyConfig:
    """Validated exit-weighted policy settings; `exits` None means `last` (the term is off)."""

    exits: tuple[int, ...] | str | None = None  # None = last, "all" = 1..T, or explicit exits
    weighting: str = "uniform"
    alpha: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.exits is not None

    def resolve(self, depth: int) -> list[int]:
        """The exits S for a forward of `depth` loops (1-based, ascending)."""
        return resolve_policy_exits(self.exits, depth)


def parse_policy_exits(value: object, key: str = "policy_exits") -> tuple[int, ...] | str | None:
    """'last' / None -> None; 'all' -> 'all'; [1, 2, 4] or '1,2,4' -> (1, 2, 4). ValueError names the key."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("last", ""):
            return None
        if text == "all":
            return "all"
        value = [p for p in text.strip("[]").replace(" ", "").split(",") if p]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"config key policy_exits: expected last | all | a list like [1, 2, 4], got {value!r}")
    return tuple(sorted(exit_numbers(value, key, shown=value)))


def resolve_policy_exits(exits: tuple[int, ...] | str | None, depth: int) -> list[int]:
    if exits is None:
        return [depth]
    if exits == "all":
        return list(range(1, depth + 1))
    bad = [t for t in exits if not 1 <= t <= depth]
    if bad:
        raise ValueError(f"config key policy_exits: exits {bad} are outside 1..{depth} (the training depth)")
    return list(exits)


def validate_exit_policy(policy_exits: object, weighting: str, alpha: float,
                         depth: int | None = None) -> ExitPolicyConfig:
    """Check the policy_exit* keys; with `depth` also the exits against 1..depth."""
    exits = parse_policy_exits(policy_exits)
    weighting = str(weighting).lower()
    if weighting not in WEIGHTINGS:
        raise ValueError(f"config key policy_exit_weights: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha:
        raise ValueError(f"config key policy_exit_alpha: expected a number, got {alpha!r}")
    # a setting that would change nothing is refused, not silently ignored
    if exits is None and weighting != "uniform":
        raise ValueError(f"config key policy_exit_weights: {weighting!r} has no effect with policy_exits: last "
                         "(only exit T is trained, with weight 1); set policy_exits (all or a list) or leave "
                         "policy_exit_weights at uniform")
    if float(alpha) != 1.0 and weighting != "progressive":
        raise ValueError(f"config key policy_exit_alpha: {alpha!r} is used only by policy_exit_weights: progressive "
                         f"(it is {weighting!r}); drop it or set policy_exit_weights: progressive")
    if depth is not None:
        resolve_policy_exits(exits, depth)
    return ExitPolicyConfig(exits, weighting, float(alpha))


def static_weights(exits: Sequence[int], weighting: str, alpha: float = 1.0) -> torch.Tensor:
    """[|S|] weights of the token-independent schemes: uniform or progressive (t**alpha, normalised)."""
    if weighting == "uniform":
        raw = torch.ones(len(exits), dtype=torch.float32)
    elif weighting == "progressive":
        raw = torch.tensor([float(t) ** alpha for t in exits], dtype=torch.float32)
    else:
        raise ValueError(f"static_weights: {weighting!r} depends on tokens or parameters")
    return raw / raw.sum()


def gate_weights(exit_probs: torch.Tensor, exits: Sequence[int]) -> torch.Tensor:
    """[B, C, |S|] per-token gate weights: p(t) over S renormalised, detached (see module docstring)."""
    picked = exit_probs.detach().float()[..., [t - 1 for t in exits]]
    return picked / picked.sum(-1, keepdim=True).clamp(min=1e-12)


class ExitWeights(nn.Module):
    """`learned` weights: softmax over one free logit per policy exit. Checkpointed with the optimizer
    state (accelerate register_for_checkpointing), so --resume restores them exactly."""

    def __init__(self, num_exits: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_exits, dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)


def weights_for(cfg: ExitPolicyConfig, exits: Sequence[int], exit_probs: torch.Tensor | None,
                learned: ExitWeights | None, shape: tuple[int, int]) -> torch.Tensor:
    """Weights broadcastable to [B, C, |S|] for one micro-batch (shape = (B, C))."""
    if cfg.weighting == "gate":
        if exit_probs is None:
            raise ValueError("policy_exit_weights gate: the model returned no exit_probs (no exit gate)")
        return gate_weights(exit_probs, exits)
    if cfg.weighting == "learned":
        if learned is None:
            raise ValueError("policy_exit_weights learned: no ExitWeights module")
        return learned().view(1, 1, -1)
    return static_weights(exits, cfg.weighting, cfg.alpha).view(1, 1, -1)


def _chunk_token_logprobs(lm_head, temperature: float, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return token_logprobs(lm_head(h), tokens, temperature)[0]


def exit_token_logprobs(exit_hidden_states: Sequence[torch.Tensor], lm_head, tokens: torch.Tensor,
                        exits: Sequence[int], temperature: float,
                        deep_logp: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """[B, |S|, C] fp32 log-probs of the completion tokens at each exit in S (same convention as exit T).

    exit_hidden_states: per-loop normed states [B, P + C, H]; position j predicts token j + 1, so the
    completion (last C tokens) is predicted by positions P - 1 .. P + C - 2. `deep_logp` (the forward's
    own exit-T log-probs) is reused for t = T instead of a second lm_head pass.
    Why chunks: each extra exit would otherwise hold B x C x vocabulary fp32 logits for backward (49k vocab,
    8k tokens: ~1.6 GB per exit); here at most `chunk_size` tokens' logits exist at a time, in forward and in
    the checkpointed backward (which recomputes them), as in rl/self_distill.py.
    """
    batch, c_len = tokens.shape
    depth = len(exit_hidden_states)
    flat_tokens = tokens.reshape(-1)
    out = []
    for t in exits:
        if t == depth and deep_logp is not None:
            out.append(deep_logp)
            continue
        h = exit_hidden_states[t - 1][:, -(c_len + 1):-1].reshape(batch * c_len, -1)
        parts = checkpointed_chunks(_chunk_token_logprobs, [h, flat_tokens], chunk_size, lm_head, temperature)
        out.append(torch.cat(list(parts)).view(batch, c_len))
    return torch.stack(out, dim=1)


def exit_policy_metrics(exits: Sequence[int], exit_logp: torch.Tensor, weights: torch.Tensor,
                        mask: torch.Tensor) -> dict[str, float]:
    """Token sums for policy/logp_t{t} and policy/w_t{t} (divided by the token count by the caller)."""
    mask = mask.to(exit_logp.dtype)
    w = weights.detach().expand(mask.shape[0], mask.shape[1], len(exits))
    sums = {}
    for k, t in enumerate(exits):
        sums[f"policy/logp_t{t}"] = float((exit_logp[:, k].detach() * mask).sum())
        sums[f"policy/w_t{t}"] = float((w[..., k] * mask).sum())
    return sums
