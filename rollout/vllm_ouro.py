"""Ouro looped LM as an out-of-tree vLLM model (vLLM removed its own Ouro model in v0.27).

Why our own: vLLM derives one KV cache from each `Attention` module, keyed by exactly one integer
in the module's registered name. A looped model runs every physical layer `depth` times, and each
run computes different K/V for the same tokens, so it needs `depth * L` caches. vLLM's generic
Transformers backend attaches one cache per module and silently mixes the loops' K/V. Here every
physical layer owns one `Attention` per loop, registered as KV slot `loop * L + layer` (the slot
numbering of looped/), while the weights (projections, MLP, the four norms) are shared.

The forward pass follows shared/docs/ouro_spec.md section 3 (as looped/ does):
  h = embed(ids); for each loop: h = layers(h); h = norm(h)   (the normed state feeds the next loop)
and the logits read the last loop's normed state. The exit gate is never evaluated: the engine runs
a fixed depth, `config.total_ut_steps`, which the worker pins with `hf_overrides`.

Weight names are the HF checkpoint names (`model.layers.3.self_attn.q_proj.weight`, ...): q/k/v
and gate/up are fused here at load time into vLLM's tensor-parallel layers, so checkpoints and the
trainer's in-memory weights load unchanged. `register()` is the `vllm.general_plugins` entry point
(pyproject.toml), so every vLLM process, including spawned workers, knows the architecture.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

ARCHITECTURE = "OuroForCausalLM"
MODEL_CLASS_PATH = "rollout.vllm_ouro:OuroForCausalLM"

# HF checkpoint name part -> (fused vLLM parameter name part, shard id)
STACKED_PARAMS = (
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)
# Checkpoint tensors the fixed-depth engine has no use for: the exit gate (never read at a pinned
# depth) and rotary tables some exporters save.
SKIPPED_WEIGHTS = ("model.early_exit_gate.", "rotary_emb.inv_freq")


def register() -> None:
    """vLLM plugin entry point: make `OuroForCausalLM` resolve to this module. Idempotent.

    Also registers OuroConfig with transformers' AutoConfig (the `looped` package),
    so vLLM reads `model_type: ouro` directories without trust_remote_code.
    """
    from vllm import ModelRegistry

    import looped  # noqa: F401  (AutoConfig.register("ouro", OuroConfig))

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)


def _vllm_layers():
    """The vLLM building blocks, imported lazily so this module imports without vllm."""
    try:
        from vllm.model_executor.layers.attention import Attention
    except ImportError:  # vLLM < 0.2x kept it in vllm.attention
        from vllm.attention import Attention
    return Attention


try:  # class definitions need vLLM; without it the module still imports (register() then fails clearly)
    from vllm.compilation.decorators import support_torch_compile
    from vllm.config import VllmConfig
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    HAS_VLLM = True
except ImportError:
    HAS_VLLM = False


def head_dim_of(config) -> int:
    """Ouro configs may set head_dim explicitly; otherwise hidden_size / num_attention_heads."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


if HAS_VLLM:

    class OuroMLP(nn.Module):
        """SwiGLU, down(silu(gate(x)) * up(x)), with gate and up fused into one column-parallel matmul."""

        def __init__(self, config, quant_config, prefix: str) -> None:
            super().__init__()
            if config.hidden_act != "silu":
                raise ValueError(f"Ouro vLLM model: hidden_act must be 'silu', got {config.hidden_act!r}")
            self.gate_up_proj = MergedColumnParallelLinear(
                config.hidden_size, [config.intermediate_size] * 2, bias=False,
                quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
            self.down_proj = RowParallelLinear(
                config.intermediate_size, config.hidden_size, bias=False,
                quant_config=quant_config, prefix=f"{prefix}.down_proj")
            self.act_fn = SiluAndMul()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate_up, _ = self.gate_up_proj(x)
            out, _ = self.down_proj(self.act_fn(gate_up))
            return out

    class OuroAttention(nn.Module):
        """Shared q/k/v/o projections and RoPE; one vLLM `Attention` (one KV cache) per loop."""

        def __init__(self, config, layer_idx: int, depth: int, cache_config, quant_config, prefix: str,
                     model_prefix: str) -> None:
            super().__init__()
            Attention = _vllm_layers()
            tp_size = get_tensor_model_parallel_world_size()
            self.total_num_heads = config.num_attention_heads
            self.total_num_kv_heads = config.num_key_value_heads
            if self.total_num_heads % tp_size or (
                self.total_num_kv_heads % tp_size if self.total_num_kv_heads >= tp_size
                else tp_size % self.total_num_kv_heads
            ):
                raise ValueError(
                    f"Ouro vLLM model: {self.total_num_heads} heads / {self.total_num_kv_heads} KV heads "
                    f"cannot be split over tensor_parallel_size={tp_size}")
            self.num_heads = self.total_num_heads // tp_size
            self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
            self.head_dim = head_dim_of(config)
            self.q_size = self.num_heads * self.head_dim
            self.kv_size = self.num_kv_heads * self.head_dim
            scaling = self.head_dim**-0.5
            self.qkv_proj = QKVParallelLinear(
                config.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads, bias=False,
                quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
            self.o_proj = RowParallelLinear(
                self.total_num_heads * self.head_dim, config.hidden_size, bias=False,
                quant_config=quant_config, prefix=f"{prefix}.o_proj")
            self.rotary_emb = get_rope(
                self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                rope_parameters=rope_parameters_of(config))
            num_layers = config.num_hidden_layers
            # The registered name carries the KV slot as its ONLY integer (vLLM keys caches on it); the
            # module path (model.layers.{l}.self_attn.attn.{t}) has two and is not what vLLM reads.
            self.attn = nn.ModuleList(
                Attention(self.num_heads, self.head_dim, scaling, num_kv_heads=self.num_kv_heads,
                          cache_config=cache_config, quant_config=quant_config,
                          prefix=f"{model_prefix}.kv_slots.{loop * num_layers + layer_idx}.attn")
                for loop in range(depth)
            )

        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, loop: int) -> torch.Tensor:
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self.rotary_emb(positions, q, k)
            out, _ = self.o_proj(self.attn[loop](q, k, v))
            return out

    class OuroDecoderLayer(nn.Module):
        """Ouro's sandwich norm, x + norm2(sublayer(norm1(x))) for attention and MLP, written with vLLM's
        fused add+RMSNorm: `norm(h, residual)` returns (norm(residual + h), residual + h)."""

        def __init__(self, config, layer_idx: int, depth: int, cache_config, quant_config, prefix: str,
                     model_prefix: str) -> None:
            super().__init__()
            self.self_attn = OuroAttention(config, layer_idx, depth, cache_config, quant_config,
                                           prefix=f"{prefix}.self_attn", model_prefix=model_prefix)
            self.mlp = OuroMLP(config, quant_config, prefix=f"{prefix}.mlp")
            eps = config.rms_norm_eps
            self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
            self.input_layernorm_2 = RMSNorm(config.hidden_size, eps=eps)
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
            self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps=eps)

        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                    loop: int) -> tuple[torch.Tensor, torch.Tensor]:
            # On entry the stream is residual + hidden_states (residual None: hidden_states alone).
            if residual is None:
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            attn = self.input_layernorm_2(self.self_attn(positions, hidden_states, loop))
            hidden_states, residual = self.post_attention_layernorm(attn, residual)
            return self.post_attention_layernorm_2(self.mlp(hidden_states)), residual

    @support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
    class OuroModel(nn.Module):
        """Embedding, the L shared layers run `total_ut_steps` times, the final norm after every loop."""

        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
            super().__init__()
            config = vllm_config.model_config.hf_config
            self.config = config
            self.depth = int(config.total_ut_steps)
            if self.depth < 1:
                raise ValueError(f"Ouro vLLM model: total_ut_steps must be >= 1, got {self.depth}")
            quant_config = vllm_config.quant_config
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens")
            self.layers = nn.ModuleList(
                OuroDecoderLayer(config, i, self.depth, vllm_config.cache_config, quant_config,
                                 prefix=f"{prefix}.layers.{i}", model_prefix=prefix)
                for i in range(config.num_hidden_layers)
            )
            self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.embed_tokens(input_ids)

        def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
            for loop in range(self.depth):
                residual = None  # a loop starts from the previous loop's normed state alone
                for layer in self.layers:
                    hidden_states, residual = layer(positions, hidden_states, residual, loop)
                hidden_states, _ = self.norm(hidden_states, residual)
            return hidden_states

    class OuroForCausalLM(nn.Module):
        """vLLM entry class for `architectures: ["OuroForCausalLM"]` (HF checkpoint layout)."""

        packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
            super().__init__()
            config = vllm_config.model_config.hf_config
            self.config = config
            self.model = OuroModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config, prefix=_join(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)

        def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model.embed_input_ids(input_ids)

        get_input_embeddings = embed_input_ids  # the name vLLM used before embed_input_ids

        def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

        def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
            return self.logits_processor(self.lm_head, hidden_states)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            """Load HF-named tensors (a checkpoint or the trainer's parameters); returns the vLLM names set."""
            params = dict(self.named_parameters())
            loaded: set[str] = set()
            for name, tensor in weights:
                if any(part in name for part in SKIPPED_WEIGHTS):
                    continue
                if name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue  # tied: the embedding already holds it
                for hf_part, fused_part, shard in STACKED_PARAMS:
                    if hf_part in name:
                        target = name.replace(hf_part, fused_part)
                        param = _param(params, target, name)
                        param.weight_loader(param, tensor, shard)
                        break
                else:
                    target = name
                    param = _param(params, target, name)
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(target)
            return loaded

    def _param(params: dict[str, nn.Parameter], target: str, source: str) -> nn.Parameter:
        if target not in params:
            raise ValueError(f"Ouro vLLM model: checkpoint weight {source!r} has no parameter {target!r} here")
        return params[target]


def rope_parameters_of(config) -> dict:
    """RoPE settings for vLLM's get_rope: transformers 5 keeps them in `rope_parameters`; older files
    have `rope_theta` / `rope_scaling` at the top level."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    return params


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
