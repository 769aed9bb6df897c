"""Fused one-token decode step for Ouro-architecture looped models (model_type "ouro").

Why: a decode step of a small looped model is dominated by per-op overhead, not FLOPs: the generic
forward runs depth x layers decoder layers, each with ~100 small ops (mask building, fp32 casts,
four RMSNorms, separate q/k/v and gate/up matmuls, attention over the whole static buffer). This
step computes the same function with far fewer ops:
  * q/k/v and gate/up weights concatenated once per generate() call (one matmul each),
  * RoPE tables computed once per step by the model's own rotary module and shared by all loops,
  * attention over the filled part of the preallocated cache only, with a precomputed additive
    padding bias (no per-layer mask construction),
  * the K/V buffers are the very tensors of the model's static cache (prefill is the model's own
    forward), so prefill and decode share one preallocated cache.
It reads the model's parameters by reference (except the two concatenations), so it follows
in-place weight updates, and it calls the layer's own modules for everything that is not fused: the
RMSNorms, the RoPE rotation (`rotate_half`), the MLP activation and the o/down projections (so a LoRA
adapter on them applies as in the forward; the fused q|k|v and gate|up matmuls add each LoRA
projection's adapter term as peft's forward does, looped/adapters.py). What is
its own is only the fusing (one q|k|v and one gate|up matmul) and single-query attention over the cache. The worker checks it against the model's forward once (`matches_model`)
and falls back to the model's forward if they disagree, so a model change cannot silently change
the rollout policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looped.adapters import adapter_output, base_weight, is_adapter_layer
from looped.modeling_ouro import rotate_half


class OuroDecodeStep:
    """Decode one token for every row at a fixed depth, writing K/V into a bound static cache."""

    def __init__(self, model, depth: int):
        self.model = model
        self.depth = depth
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.backbone = model.model
        self.layers = list(self.backbone.layers)
        self.scaling = self.layers[0].self_attn.scaling
        self.fused: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.adapted = False  # LoRA layers among the projections (set by refresh)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @staticmethod
    def supports(model) -> bool:
        """True for the Ouro layout this step re-implements (sandwich-norm layers, no biases)."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "ouro" or not hasattr(model, "model"):
            return False
        try:
            layer = model.model.layers[0]
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)
            norms = (layer.input_layernorm, layer.input_layernorm_2, layer.post_attention_layernorm,
                     layer.post_attention_layernorm_2, model.model.norm)
        except AttributeError:
            return False
        return all(p.bias is None for p in projections) and all(callable(n) for n in norms)

    def refresh(self) -> None:
        """Rebuild the concatenated q|k|v and gate|up weights from the current parameters."""
        with torch.no_grad():  # a LoRA-wrapped projection: its base weight here, its adapter term in _fused
            self.fused = [
                (
                    torch.cat([base_weight(layer.self_attn.q_proj), base_weight(layer.self_attn.k_proj),
                               base_weight(layer.self_attn.v_proj)]),
                    torch.cat([base_weight(layer.mlp.gate_proj), base_weight(layer.mlp.up_proj)]),
                )
                for layer in self.layers
            ]
        self.adapted = any(is_adapter_layer(m) for layer in self.layers for m in layer.modules())

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, projections) -> torch.Tensor:
        """One matmul over the concatenated base weights, plus each LoRA projection's own adapter term
        added to its slice (as peft's forward adds it to the base output: the same rounding)."""
        out = F.linear(x, weight)
        if not self.adapted:
            return out
        terms = [adapter_output(p, x) for p in projections]
        if all(t is None for t in terms):
            return out
        sizes = [p.get_base_layer().out_features if is_adapter_layer(p) else p.out_features for p in projections]
        # peft sums in the adapter's dtype (fp32 adapters on a bf16 base) and casts back to the base output's
        added = out + torch.cat([t if t is not None else out.new_zeros(*out.shape[:-1], n)
                                 for t, n in zip(terms, sizes)], dim=-1)
        return added.to(out.dtype)

    def bind(self, cache) -> None:
        """Use the K/V tensors of `cache` (one slot per loop and layer, [B, kv_heads, max_len, D])."""
        slots = self.depth * self.num_layers
        self.keys = [cache.layers[s].keys for s in range(slots)]
        self.values = [cache.layers[s].values for s in range(slots)]

    def release(self) -> None:
        """Drop the cache tensors and the concatenated weights between generate() calls (memory)."""
        self.keys, self.values, self.fused = [], [], []

    def __call__(self, token: torch.Tensor, position: torch.Tensor, index: int, bias: torch.Tensor) -> torch.Tensor:
        """token, position: [B] int64; index: cache column of this token (same for all rows);
        bias: [B, >= index + 1] additive attention bias (0 attend, -inf padding). Returns [B, V] logits."""
        batch = token.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        groups = heads // kv_heads
        q_size, kv_size = heads * dim, kv_heads * dim
        hidden = self.backbone.embed_tokens(token)
        cos, sin = self.backbone.rotary_emb(hidden, position.unsqueeze(1))  # [B, 1, D], shared by all loops
        length = index + 1
        attn_bias = bias[:, None, None, :length]
        attn_keep = attn_bias == 0  # boolean form for SDPA

        def rope(x: torch.Tensor) -> torch.Tensor:  # x: [B, heads, D]; the model's apply_rotary_pos_emb
            return x * cos + rotate_half(x) * sin

        for loop in range(self.depth):
            for layer_idx, layer in enumerate(self.layers):
                slot = loop * self.num_layers + layer_idx
                wqkv, wgu = self.fused[layer_idx]
                attn = layer.self_attn
                qkv = self._fused(layer.input_layernorm(hidden), wqkv, (attn.q_proj, attn.k_proj, attn.v_proj))
                q = rope(qkv[:, :q_size].view(batch, heads, dim))
                k = rope(qkv[:, q_size : q_size + kv_size].view(batch, kv_heads, dim))
                keys, values = self.keys[slot], self.values[slot]
                keys[:, :, index] = k
                values[:, :, index] = qkv[:, q_size + kv_size :].view(batch, kv_heads, dim)
                if hidden.dtype == torch.float32:
                    # [B, kv, groups, D] x [B, kv, D, n] -> [B, kv, groups, n]: plain batched matmuls are
                    # the cheapest single-query attention on CPU.
                    scores = torch.matmul(q.view(batch, kv_heads, groups, dim), keys[:, :, :length].transpose(-1, -2))
                    weights = torch.softmax(scores * self.scaling + attn_bias, dim=-1)
                    out = torch.matmul(weights, values[:, :, :length]).reshape(batch, q_size)
                else:
                    # Reduced precision: SDPA accumulates in fp32 like the model's attention kernel does.
                    out = F.scaled_dot_product_attention(
                        q.unsqueeze(2), keys[:, :, :length], values[:, :, :length], attn_mask=attn_keep,
                        scale=self.scaling, enable_gqa=groups > 1,
                    ).reshape(batch, q_size)
                hidden = hidden + layer.input_layernorm_2(attn.o_proj(out))
                gate_up = self._fused(layer.post_attention_layernorm(hidden), wgu, (layer.mlp.gate_proj, layer.mlp.up_proj))
                gate, up = gate_up.chunk(2, dim=-1)
                mlp = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
                hidden = hidden + layer.post_attention_layernorm_2(mlp)
            hidden = self.backbone.norm(hidden)
        return self.model.lm_head(hidden)

    # Adaptive decode: keep computing rows that stopped (their results are discarded, their deeper K/V are
    # overwritten by the caller's K/V rule) until the running rows fall to this fraction of the rows computed;
    # then the computed rows shrink to the running ones. Gathering the running rows' cache costs about one
    # attention read, so shrinking pays only when many rows stopped. 1.0 = shrink as soon as any row stops.
    shrink_below: float = 0.5

    def adaptive(self, token: torch.Tensor, position: torch.Tensor, index: int, bias: torch.Tensor,
                 after_loop) -> None:
        """One decode step where each row runs only until its exit rule stops it (adaptive depth).

        Same arguments as `__call__`; `after_loop(loop, rows, hidden)` (rollout.exit_rules.ExitDecider) is
        called after each loop (1-based) with the rows still running and their normed state [N, H] and returns
        which of them stop; it keeps their logits. Once the running rows are at most `shrink_below` of the rows
        computed, every matmul of the next loops runs over the running rows only (the compute saving). The K/V
        of a stopped row's skipped loops are NOT final here; the caller writes them
        (rollout.exit_rules.project_skipped_kv), which also overwrites what a stopped row still computed.
        """
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        groups = heads // kv_heads
        q_size, kv_size = heads * dim, kv_heads * dim
        hidden = self.backbone.embed_tokens(token)
        cos, sin = self.backbone.rotary_emb(hidden, position.unsqueeze(1))  # [B, 1, D]
        length = index + 1
        attn_bias = bias[:, None, None, :length]
        total = token.shape[0]
        computed = torch.arange(total, device=token.device)  # batch rows being computed
        live = torch.ones(total, dtype=torch.bool, device=token.device)  # of those, still running
        for loop in range(self.depth):
            batch = computed.shape[0]
            everyone = batch == total  # the cache tensors are used without a row gather
            for layer_idx, layer in enumerate(self.layers):
                slot = loop * self.num_layers + layer_idx
                wqkv, wgu = self.fused[layer_idx]
                attn = layer.self_attn
                qkv = self._fused(layer.input_layernorm(hidden), wqkv, (attn.q_proj, attn.k_proj, attn.v_proj))
                q = qkv[:, :q_size].view(batch, heads, dim)
                q = q * cos + rotate_half(q) * sin
                k = qkv[:, q_size : q_size + kv_size].view(batch, kv_heads, dim)
                keys, values = self.keys[slot], self.values[slot]
                if everyone:
                    keys[:, :, index] = k * cos + rotate_half(k) * sin
                    values[:, :, index] = qkv[:, q_size + kv_size :].view(batch, kv_heads, dim)
                    row_keys, row_values = keys[:, :, :length], values[:, :, :length]
                else:
                    keys[computed, :, index] = k * cos + rotate_half(k) * sin
                    values[computed, :, index] = qkv[:, q_size + kv_size :].view(batch, kv_heads, dim)
                    row_keys, row_values = keys[computed, :, :length], values[computed, :, :length]
                if hidden.dtype == torch.float32:
                    scores = torch.matmul(q.view(batch, kv_heads, groups, dim), row_keys.transpose(-1, -2))
                    weights = torch.softmax(scores * self.scaling + attn_bias, dim=-1)
                    out = torch.matmul(weights, row_values).reshape(batch, q_size)
                else:
                    out = F.scaled_dot_product_attention(
                        q.unsqueeze(2), row_keys, row_values, attn_mask=attn_bias == 0,
                        scale=self.scaling, enable_gqa=groups > 1,
                    ).reshape(batch, q_size)
                hidden = hidden + layer.input_layernorm_2(attn.o_proj(out))
                gate_up = self._fused(layer.post_attention_layernorm(hidden), wgu,
                                      (layer.mlp.gate_proj, layer.mlp.up_proj))
                gate, up = gate_up.chunk(2, dim=-1)
                hidden = hidden + layer.post_attention_layernorm_2(layer.mlp.down_proj(layer.mlp.act_fn(gate) * up))
            hidden = self.backbone.norm(hidden)
            running = live.nonzero().squeeze(1)
            stop = after_loop(loop + 1, computed[running], hidden[running])
            live[running[stop]] = False
            alive = int(live.sum())
            if alive == 0:
                return
            if alive <= self.shrink_below * batch:
                keep = live.nonzero().squeeze(1)
                computed, hidden, live = computed[keep], hidden[keep], live[keep]
                cos, sin, attn_bias = cos[keep], sin[keep], attn_bias[keep]

    def run_loops(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        columns: torch.Tensor,
        bias: torch.Tensor,
        loops: range,
    ) -> torch.Tensor:
        """Run loops `loops` (0-based) of S new tokens per row, each row at its OWN cache columns.

        Why a second entry point: self-speculative decoding (rollout/speculative.py) drafts at loops
        0..d-1 and verifies several tokens at once at loops d..T-1, and rows that accepted different
        numbers of tokens sit at different cache columns.
        hidden: [B, S, H], the state entering loop `loops.start` (embeddings for loop 0, else the normed
            state after loop `loops.start - 1`); cos, sin: [B, S, D] RoPE tables of the tokens' positions;
        columns: [B, S] cache column of each token (K/V of every loop in `loops` are written there);
        bias: [B, S, C] additive attention bias over cache columns [0, C) (0 attend, -inf not), which must
            hide every column that is not a real token at or before the query (stale drafts included).
        Returns the normed state after the last loop, [B, S, H].
        """
        batch, seq = hidden.shape[:2]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        groups = heads // kv_heads
        q_size, kv_size = heads * dim, kv_heads * dim
        width = bias.shape[-1]
        rows = torch.arange(batch, device=hidden.device).unsqueeze(1)  # [B, 1], with columns [B, S]
        # Token-major layout [B, S, heads, D] throughout: K/V go to the cache without a transpose, and with
        # S = 1 the grouped query below is a free view (same op count as the one-token __call__).
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, D]: broadcast over heads
        attn_keep = (bias == 0).unsqueeze(1)  # [B, 1, S, C] for SDPA
        group_bias = bias[:, None, None]  # [B, 1, 1, S, C] for the grouped fp32 matmul path

        def rope(x: torch.Tensor) -> torch.Tensor:  # x: [B, S, heads, D]; the model's apply_rotary_pos_emb
            return x * cos + rotate_half(x) * sin

        for loop in loops:
            for layer_idx, layer in enumerate(self.layers):
                slot = loop * self.num_layers + layer_idx
                wqkv, wgu = self.fused[layer_idx]
                attn = layer.self_attn
                qkv = self._fused(layer.input_layernorm(hidden), wqkv,  # [B, S, q + 2 kv]
                                  (attn.q_proj, attn.k_proj, attn.v_proj))
                q = rope(qkv[..., :q_size].view(batch, seq, heads, dim))
                keys, values = self.keys[slot], self.values[slot]
                keys[rows, :, columns] = rope(qkv[..., q_size : q_size + kv_size].view(batch, seq, kv_heads, dim))
                values[rows, :, columns] = qkv[..., q_size + kv_size :].view(batch, seq, kv_heads, dim)
                if hidden.dtype == torch.float32:
                    # [B, kv, groups * S, D] x [B, kv, D, C]: head h uses kv head h // groups.
                    grouped = q.view(batch, seq, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
                    grouped = grouped.reshape(batch, kv_heads, groups * seq, dim)
                    scores = torch.matmul(grouped, keys[:, :, :width].transpose(-1, -2))
                    scores = scores.view(batch, kv_heads, groups, seq, width) * self.scaling + group_bias
                    weights = torch.softmax(scores, dim=-1).view(batch, kv_heads, groups * seq, width)
                    out = torch.matmul(weights, values[:, :, :width]).view(batch, kv_heads, groups, seq, dim)
                    out = out.permute(0, 3, 1, 2, 4).reshape(batch, seq, q_size)
                else:
                    out = F.scaled_dot_product_attention(
                        q.transpose(1, 2), keys[:, :, :width], values[:, :, :width], attn_mask=attn_keep,
                        scale=self.scaling, enable_gqa=groups > 1,
                    ).transpose(1, 2).reshape(batch, seq, q_size)
                hidden = hidden + layer.input_layernorm_2(layer.self_attn.o_proj(out))
                gate_up = self._fused(layer.post_attention_layernorm(hidden), wgu, (layer.mlp.gate_proj, layer.mlp.up_proj))
                gate, up = gate_up.chunk(2, dim=-1)
                mlp = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
                hidden = hidden + layer.post_attention_layernorm_2(mlp)
            hidden = self.backbone.norm(hidden)
        return hidden
