"""Adaptive per-token depth in decoding: the exit rules and the K/V rule for the loops a token skips.

One decode step of a position runs loop after loop; after loop t an `ExitDecider` says which rows stop
(`rollout.base.ExitRule`: `confidence` = max probability of exit t at the sampling temperature >= threshold,
`gate` = CDF of Ouro's exit distribution >= q, both only from t >= min_depth, everything stops at T). A row
that stopped at loop d keeps exit d's logits (the next token is drawn from them) and its depth d.

K/V rule (docs/ADAPTIVE_DEPTH.md): the position's cache slots of loops d+1..T get each layer's K/V projection
of its frozen exit state (`project_skipped_kv`: k/v projections only), and the update reproduces it exactly
(`OuroForCausalLM.forward(exit_depth=...)`). A copy of the loop-d K/V (free) was measured and lost ~19 points
of greedy accuracy on the embedded task. Both the fused step (looped/fast_decode.py) and the plain path
(the model's own forward, then the rule over its exits) use this module, so the rule is written once.
"""

from __future__ import annotations

import torch

from looped.modeling_ouro import rotate_half
from rollout.base import ExitRule


class ExitDecider:
    """The exit rule of one decode step over `batch` rows: call `after_loop` after each loop, in order.

    lm_head: the model's output projection; gate: [N, H] -> [N] gate logits in fp32 (Ouro's exit gate;
    only the `gate` rule calls it). After loop T every row has stopped: `logits` [B, V] holds each row's exit
    logits and `depth` [B] its loop count.
    """

    def __init__(self, rule: ExitRule, depth: int, temperature: float, lm_head, gate, batch: int,
                 device: torch.device):
        self.rule, self.max_depth, self.temperature = rule, depth, temperature
        self.lm_head, self.gate = lm_head, gate
        self.depth = torch.full((batch,), depth, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.states: torch.Tensor | None = None  # [B, H] each row's exit state (the K/V rule projects it)
        if rule.kind == "gate":  # running CDF and survival of the exit distribution, fp32
            self.cdf = torch.zeros(batch, dtype=torch.float32, device=device)
            self.survival = torch.ones(batch, dtype=torch.float32, device=device)

    def after_loop(self, loop: int, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """loop: 1-based loop just run; rows [N]: batch rows still running; hidden [N, H]: their normed
        state after this loop (exit `loop`). Returns stop [N] bool; records the stopped rows' logits, depth."""
        last = loop >= self.max_depth
        logits = None
        if last:
            stop = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        elif self.rule.kind == "confidence":
            logits = self.lm_head(hidden)
            stop = confidence_stop(logits, self.temperature, self.rule.threshold)
        else:
            stop = self._gate_stop(rows, hidden)
        if loop < self.rule.min_depth and not last:
            stop = torch.zeros_like(stop)
        if bool(stop.any()):
            chosen = rows[stop]
            out = logits[stop] if logits is not None else self.lm_head(hidden[stop])
            if self.logits is None:
                self.logits = out.new_zeros((self.depth.shape[0], out.shape[-1]))
                self.states = hidden.new_zeros((self.depth.shape[0], hidden.shape[-1]))
            self.logits[chosen] = out
            self.states[chosen] = hidden[stop]
            self.depth[chosen] = loop
        return stop

    def _gate_stop(self, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # p(t) = lambda_t * prod_{j<t} (1 - lambda_j), summed in order: looped.modeling_ouro.threshold_exit_index
        lam = torch.sigmoid(self.gate(hidden).float())
        survival = self.survival[rows]
        cdf = self.cdf[rows] + lam * survival
        self.cdf[rows] = cdf
        self.survival[rows] = survival * (1.0 - lam)
        if self.rule.threshold >= 1.0:  # q >= 1 always means the last loop (as the model's generate)
            return torch.zeros_like(cdf, dtype=torch.bool)
        return cdf >= self.rule.threshold


def confidence_stop(logits: torch.Tensor, temperature: float, threshold: float) -> torch.Tensor:
    """Rows whose max probability softmax(logits / temperature) (temperature 0: softmax(logits)) >= threshold."""
    scaled = logits.float()
    if temperature not in (0, 1):
        scaled = scaled / temperature
    return scaled.softmax(dim=-1).amax(dim=-1) >= threshold


def decide_from_exits(decider: ExitDecider, exits: list[torch.Tensor]) -> None:
    """Apply the rule to already computed exits (exits[t - 1]: [B, H], the normed state after loop t):
    the prefill's last prompt position and the plain (model-forward) decode path."""
    batch = exits[0].shape[0]
    rows = torch.arange(batch, device=exits[0].device)
    for loop, hidden in enumerate(exits, start=1):
        if rows.numel() == 0:
            break
        stop = decider.after_loop(loop, rows, hidden[rows])
        rows = rows[~stop]


def project_skipped_kv(model, keys: list[torch.Tensor], values: list[torch.Tensor], depth: torch.Tensor,
                       states: torch.Tensor, column: int, position: torch.Tensor) -> None:
    """The K/V rule: a row that stopped at loop d gets, in the slots of loops d+1..T at `column`, each layer's
    K/V projection of its frozen exit state h_d (the layer's input norm, k/v projections and RoPE at its
    position; the same for every skipped loop). That is the K/V the next loop's first layer would have
    computed, at the cost of the k/v projections only (no attention, no MLP, no q/o).

    keys/values: one [B, kv_heads, C, D] tensor per slot (loop * L + layer); depth [B]; states [B, H] the
    exit state of each row (ExitDecider.states); position [B] the token's sequence position."""
    layers = model.model.layers
    num_layers, loops = len(layers), len(keys) // len(layers)
    skipped = (depth < loops).nonzero().squeeze(1)
    if skipped.numel() == 0:
        return
    hidden, row_depth = states[skipped], depth[skipped]
    cos, sin = model.model.rotary_emb(hidden, position[skipped].unsqueeze(1))  # [N, 1, D]
    for layer_idx, layer in enumerate(layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        k = attn.k_proj(x).view(hidden.shape[0], -1, attn.head_dim)
        k = k * cos + rotate_half(k) * sin
        v = attn.v_proj(x).view(hidden.shape[0], -1, attn.head_dim)
        for loop in range(1, loops):
            inside = row_depth <= loop  # rows that did not run loop `loop` (0-based)
            if not bool(inside.any()):
                continue
            rows, slot = skipped[inside], loop * num_layers + layer_idx
            keys[slot][rows, :, column] = k[inside]
            values[slot][rows, :, column] = v[inside]


def depth_metrics(token_depths: list[list[int] | None], lengths: list[int], depth: int) -> dict[str, float]:
    """`rollout/mean_depth` (loops per generated token) and `rollout/depth_frac_t{t}` (t = 1..depth) over
    completions; a completion without token depths (fixed rule) ran every token at `depth`."""
    counts = [0] * (depth + 1)
    for depths, length in zip(token_depths, lengths):
        if depths is None:
            counts[depth] += length
        else:
            for d in depths:
                counts[d] += 1
    total = sum(counts)
    metrics = {"rollout/mean_depth": sum(t * c for t, c in enumerate(counts)) / total if total else float(depth)}
    metrics.update({f"rollout/depth_frac_t{t}": counts[t] / total if total else float(t == depth)
                    for t in range(1, depth + 1)})
    return metrics
