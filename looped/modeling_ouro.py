"""Ouro looped causal LM, written from the architecture spec (docs: shared/docs/ouro_spec.md).

One stack of `num_hidden_layers` decoder layers is applied `depth` times (a "loop"; default
`config.total_ut_steps`). After every loop the shared final norm `model.norm` is applied; that
normed state is both the loop's exit readout (lm_head and the exit gate read it) and the input of
the next loop. Every loop sees the same token positions. The KV cache has one slot per
(loop, layer): slot = loop * num_hidden_layers + layer, because each loop computes different K/V
for the same tokens.

Parameter names match the published Ouro checkpoints, so `from_pretrained` loads them unchanged.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ouro import OuroConfig
from .hf_compat import (
    CACHE_NAME,
    Cache,
    DynamicCache,
    DynamicLayer,
    StaticCache,
    StaticLayer,
    causal_mask,
    model_output,
    pick_cache,
    repeat_kv,
)

# --------------------------------------------------------------------------------------------------
# Outputs


@model_output
class OuroModelOutput(ModelOutput):
    """Backbone output. `exit_hidden_states` (one normed state per loop) only when asked for."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    exit_hidden_states: tuple[torch.Tensor, ...] | None = None


@model_output
class OuroCausalLMOutput(ModelOutput):
    """`logits` come from the last loop run (or the threshold-selected loop); per-loop logits are
    `lm_head(exit_hidden_states[t - 1])`, computed on demand so T full-vocab tensors never coexist."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    exit_hidden_states: tuple[torch.Tensor, ...] | None = None
    exit_probs: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Exit distribution (spec §4.1, §4.2)


def check_depth(depth: object, default: int) -> int:
    """Validate a loop count; `None` means the config default. Bad values are user errors."""
    if depth is None:
        return default
    if isinstance(depth, torch.Tensor) and depth.numel() == 1 and not depth.is_floating_point():
        depth = int(depth.item())
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise ValueError(f"depth must be an integer number of loops >= 1, got {depth!r} ({type(depth).__name__})")
    if depth < 1:
        raise ValueError(f"depth must be an integer number of loops >= 1, got {depth}")
    return int(depth)


def exit_probs_from_lambdas(lambdas: torch.Tensor) -> torch.Tensor:
    """p(t) = lambda_t * prod_{j<t}(1 - lambda_j) for t < T, and p(T) = prod_{j<T}(1 - lambda_j).

    `lambdas` [..., T] are per-loop exit probabilities (sigmoid of the gate). The last loop's lambda is
    ignored, as in Ouro, so the result always sums to 1 over the last dim. Computed in float32.
    """
    lambdas = lambdas.float()
    ones = torch.ones_like(lambdas[..., :1])
    survival_before = torch.cumprod(torch.cat([ones, 1.0 - lambdas[..., :-1]], dim=-1), dim=-1)
    probs = lambdas * survival_before
    return torch.cat([probs[..., :-1], survival_before[..., -1:]], dim=-1)


def threshold_exit_index(exit_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the 0-based loop whose cumulative exit probability first reaches `threshold` (q).

    q >= 1 always means the last loop: in low precision a CDF can round to 1.0 before the last loop,
    which would silently read out an earlier loop (spec §4.3). The CDF is computed in float32.
    """
    depth = exit_probs.shape[-1]
    if threshold >= 1.0:
        return torch.full(exit_probs.shape[:-1], depth - 1, dtype=torch.long, device=exit_probs.device)
    cdf = torch.cumsum(exit_probs.float(), dim=-1)
    return (cdf < threshold).sum(dim=-1).clamp(max=depth - 1)


# --------------------------------------------------------------------------------------------------
# Building blocks


class OuroRMSNorm(nn.Module):
    """RMSNorm as in Ouro: normalise in fp32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class OuroRotaryEmbedding(nn.Module):
    """RoPE tables (cos, sin) for given positions; computed once per forward and shared by all loops."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            if self.rope_type not in ROPE_INIT_FUNCTIONS or self.rope_type.startswith("dynamic"):
                raise ValueError(f"OuroConfig: unsupported rope_parameters.rope_type {self.rope_type!r}")
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: OuroConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)  # non-interleaved ("rotate_half", NeoX) layout
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k: [B, heads, S, D]; cos, sin: [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention (fp32 softmax); used when `attn_implementation="eager"`."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class OuroMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OuroAttention(nn.Module):
    """Causal self-attention with RoPE and GQA; K/V go to cache slot `cache_slot` (one per loop and layer)."""

    def __init__(self, config: OuroConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_dim, kv_dim = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        cache_slot: int = 0,
        **kwargs,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, cache_slot)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


class OuroDecoderLayer(GradientCheckpointingLayer):
    """Sandwich norm: each sublayer is pre-normed AND its output is normed before the residual add.

        a = x + input_layernorm_2(attn(input_layernorm(x)))
        y = a + post_attention_layernorm_2(mlp(post_attention_layernorm(a)))
    """

    def __init__(self, config: OuroConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = OuroAttention(config, layer_idx)
        self.mlp = OuroMLP(config)
        self.input_layernorm = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_2 = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_2 = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        cache_slot: int = 0,
        **kwargs,
    ) -> torch.Tensor:
        attn = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            cache_slot=cache_slot,
            **kwargs,
        )
        hidden_states = hidden_states + self.input_layernorm_2(attn)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.post_attention_layernorm_2(mlp)


# --------------------------------------------------------------------------------------------------
# Cache helpers


def _ensure_loop_slots(cache: Cache, num_slots: int, depth: int) -> None:
    """Make sure `cache` has one slot per (loop, layer) and is used at a single depth.

    Generic code (e.g. `generate()`, `DynamicCache(config=...)`, `StaticCache(config=...)`) sizes a cache
    for `num_hidden_layers` slots; that is too few for a looped model, so an empty one is extended.
    """
    cache_depth = getattr(cache, "ouro_depth", None)
    if cache_depth is not None and cache_depth != depth:
        raise ValueError(
            f"this cache was built/filled at depth {cache_depth} but the forward runs depth {depth}; "
            "a cache holds one slot per (loop, layer) and belongs to a single depth"
        )
    cache.ouro_depth = depth
    if cache.layer_class_to_replicate is not None:  # a plain DynamicCache() grows on demand
        return
    missing = num_slots - len(cache.layers)
    if missing <= 0:
        return
    if int(cache.get_seq_length()) > 0:
        raise ValueError(
            f"cache has {len(cache.layers)} slots but depth {depth} needs {num_slots} (one per loop and layer), "
            "and it already holds tokens; build it with model.make_static_cache(...) or DynamicCache()"
        )
    proto = cache.layers[0]
    if type(proto) is StaticLayer:
        cache.layers.extend(StaticLayer(max_cache_len=proto.max_cache_len) for _ in range(missing))
    elif type(proto) is DynamicLayer:
        cache.layers.extend(DynamicLayer() for _ in range(missing))
    else:
        raise ValueError(f"unsupported cache layer type {type(proto).__name__} for a looped Ouro model")


# --------------------------------------------------------------------------------------------------
# Models


class OuroPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    config: OuroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OuroDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class OuroModel(OuroPreTrainedModel):
    """The looped backbone: embeddings, the shared layer stack, the final norm and the exit gate."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)
        self.rotary_emb = OuroRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def exit_gate_logits(self, exit_hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Gate logits [B, S, depth] in float32 (the gate reads each loop's normed state)."""
        weight, bias = self.early_exit_gate.weight.float(), self.early_exit_gate.bias.float()
        return torch.cat([F.linear(h.float(), weight, bias) for h in exit_hidden_states], dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        depth: int | None = None,
        return_exits: bool = False,
        past_key_values: Cache | None = None,
        exit_depth: torch.Tensor | None = None,
        **kwargs,
    ) -> OuroModelOutput:
        """Run `depth` loops. A new cache is allocated only when `use_cache=True` is passed explicitly:
        `use_cache=None` does NOT fall back to `config.use_cache` (unlike most HF models), so
        scoring/training forwards never build an L*T-slot cache for the whole sequence (spec §5.1).

        `cache_position` is accepted for API compatibility; caches track their own length, so it must
        equal arange(cache_len, cache_len + seq_len).

        `exit_depth` [B, S] (ints in 1..depth; no cache): per-position depth, the adaptive-depth rule of the
        rollout (rollout/exit_rules.py, docs/ADAPTIVE_DEPTH.md). A position with depth d runs loops 1..d: its
        state is frozen after loop d (its exits d..T and the last hidden state are exit d), and in loops
        d+1..T every layer's input at that position is that frozen exit state, so its K/V there are each
        layer's projection of it (what the decoder wrote; the layer's other outputs there are discarded).
        """
        depth = check_depth(depth, self.config.total_ut_steps)
        cache = pick_cache(cache, past_key_values)
        if exit_depth is not None and (use_cache or cache is not None):
            raise ValueError("exit_depth (per-position depth) is for cache-free scoring forwards")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]

        if use_cache is False:
            cache = None
        elif use_cache and cache is None:
            cache = DynamicCache()  # grows to one slot per (loop, layer) on demand
        num_layers = self.config.num_hidden_layers
        if cache is not None:
            _ensure_loop_slots(cache, num_layers * depth, depth)

        if isinstance(attention_mask, dict):  # masks prebuilt by generate() for compileable caches
            attention_mask = attention_mask["full_attention"]
        if position_ids is None:
            position_ids = self._positions(attention_mask, cache, batch_size, seq_len, inputs_embeds.device)

        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        if exit_depth is not None:
            exit_depth = exit_depth.to(inputs_embeds.device)
            if exit_depth.shape != (batch_size, seq_len) or int(exit_depth.min()) < 1 or int(exit_depth.max()) > depth:
                raise ValueError(f"exit_depth must be [batch, seq] = {(batch_size, seq_len)} with values in "
                                 f"1..{depth}, got {tuple(exit_depth.shape)}")
        hidden_states = inputs_embeds
        exits: list[torch.Tensor] = []
        for loop in range(depth):
            running = (exit_depth > loop).unsqueeze(-1) if exit_depth is not None and loop > 0 else None
            previous = hidden_states
            for layer_idx, layer in enumerate(self.layers):
                if running is not None:  # a stopped position feeds every layer its frozen exit state
                    hidden_states = torch.where(running, hidden_states, previous)
                hidden_states = layer(
                    hidden_states,
                    attention_mask=mask,
                    position_embeddings=position_embeddings,
                    cache=cache,
                    cache_slot=loop * num_layers + layer_idx,
                    position_ids=position_ids,
                    **kwargs,
                )
            # The normed state is both this loop's readout and the next loop's input.
            hidden_states = self.norm(hidden_states)
            if running is not None:  # a stopped position keeps its exit
                hidden_states = torch.where(running, hidden_states, previous)
            if return_exits:
                exits.append(hidden_states)

        return OuroModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            exit_hidden_states=tuple(exits) if return_exits else None,
        )

    @staticmethod
    def _positions(attention_mask, cache, batch_size, seq_len, device) -> torch.LongTensor:
        """Token positions: from the 2-D mask (cumsum - 1, so left padding is exact), else from the cache length."""
        if attention_mask is not None and attention_mask.ndim == 2:
            positions = attention_mask.long().cumsum(-1) - 1
            return positions.clamp(min=0)[:, -seq_len:]
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(seq_len, device=device) + past).unsqueeze(0).expand(batch_size, -1)


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    """Ouro LM head model. `forward(..., depth=t)` runs t loops; logits come from the last one run."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only used if tie_word_embeddings

    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self.model = OuroModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        depth: int | None = None,
        output_exits: bool = False,
        exit_threshold: float | None = None,
        past_key_values: Cache | None = None,
        exit_depth: torch.Tensor | None = None,
        **kwargs,
    ) -> OuroCausalLMOutput:
        """Args beyond the usual HF ones:
        depth: loops to run (default `config.total_ut_steps`); `depth < 1` or a non-integer is a ValueError.
        output_exits: also return `exit_hidden_states` (one normed [B, S, H] state per loop) and
            `exit_probs` [B, S, depth] in float32.
        exit_threshold: q; per token, read the logits of the first loop whose exit CDF reaches q
            (q >= 1 or None: the last loop). All loops still run, so the cache stays complete.
        labels: mean next-token cross-entropy of the returned logits (no cache is allocated).
        past_key_values: the pre-5.24 name of `cache`, still accepted.
        exit_depth: [B, S] per-position depth (OuroModel.forward): each position's logits are read from its
            own exit, the K/V of the loops it skipped are its last loop's (the adaptive rollout, reproduced).
        """
        depth = check_depth(depth, self.config.total_ut_steps)
        if exit_threshold is not None and exit_threshold < 0:
            raise ValueError(f"exit_threshold must be >= 0, got {exit_threshold}")
        use_threshold = exit_threshold is not None and exit_threshold < 1.0 and depth > 1
        if labels is not None:
            use_cache = False

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            depth=depth,
            return_exits=output_exits or use_threshold,
            exit_depth=exit_depth,
            **kwargs,
        )
        exit_probs = None
        if output_exits or use_threshold:
            lambdas = torch.sigmoid(self.model.exit_gate_logits(outputs.exit_hidden_states))
            exit_probs = exit_probs_from_lambdas(lambdas)

        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep, :]
        if use_threshold:
            chosen = threshold_exit_index(exit_probs[:, keep, :], exit_threshold)  # [B, S']
            stacked = torch.stack([h[:, keep, :] for h in outputs.exit_hidden_states], dim=2)  # [B, S', T, H]
            index = chosen[..., None, None].expand(-1, -1, 1, stacked.shape[-1])
            hidden_states = stacked.gather(2, index).squeeze(2)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return OuroCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            exit_hidden_states=outputs.exit_hidden_states if output_exits else None,
            exit_probs=exit_probs if output_exits else None,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """`generate()` applies the config's exit threshold (q = 1.0 for Ouro: always the last loop)
        unless `exit_threshold=` is passed to generate."""
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if model_inputs.get("exit_threshold") is None:
            model_inputs["exit_threshold"] = self.config.early_exit_threshold
        return model_inputs

    def make_static_cache(
        self,
        batch_size: int,
        max_cache_len: int,
        depth: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StaticCache:
        """Preallocate static K/V buffers, one slot per (loop, layer), for a decode loop at `depth`."""
        depth = check_depth(depth, self.config.total_ut_steps)
        cache = StaticCache(config=self.config, max_cache_len=max_cache_len)
        _ensure_loop_slots(cache, self.config.num_hidden_layers * depth, depth)
        cache.early_initialization(
            batch_size=batch_size,
            num_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim,
            dtype=dtype or self.dtype,
            device=device or self.device,
        )
        return cache


__all__ = [
    "OuroForCausalLM",
    "OuroModel",
    "OuroPreTrainedModel",
    "OuroCausalLMOutput",
    "exit_probs_from_lambdas",
    "threshold_exit_index",
]
