"""OuroConfig: the configuration of an Ouro looped language model (ByteDance Ouro-1.4B / 2.6B).

The field names are exactly the keys of the published Ouro `config.json` files (a Qwen2-style config
plus `total_ut_steps`, `early_exit_threshold`, `early_exit_step`), so a real checkpoint directory
loads unchanged. Unknown extra keys (e.g. `auto_map`, `architectures`, `chunk_size`) are accepted and
kept, which is what lets `AutoConfig.from_pretrained` read an Ouro hub directory without remote code.

Written in the transformers-5 dataclass style: `rope_theta` / `rope_scaling` from old files are
folded into the standard `rope_parameters` dict by the base class.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class OuroConfig(PreTrainedConfig):
    """Ouro LoopLM config. Defaults are Ouro-1.4B (24 weight-shared layers run `total_ut_steps` = 4 times).

    `total_ut_steps` (T) is the default number of loops; every forward can override it with `depth=`.
    `early_exit_threshold` (q) is only used by `generate()` (q >= 1 means "always the last loop").
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float | int = 1_000_000.0
    rope_parameters: RopeParameters | dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    total_ut_steps: int = 4
    early_exit_threshold: float | int = 1.0
    early_exit_step: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"OuroConfig: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"OuroConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if isinstance(self.total_ut_steps, bool) or self.total_ut_steps < 1:
            raise ValueError(f"OuroConfig: total_ut_steps must be an integer >= 1, got {self.total_ut_steps!r}")
        if self.early_exit_threshold < 0:
            raise ValueError(f"OuroConfig: early_exit_threshold must be >= 0, got {self.early_exit_threshold!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"OuroConfig: hidden_act must be 'silu' (Ouro's SwiGLU MLP), got {self.hidden_act!r}")
        if self.use_sliding_window:
            raise ValueError("OuroConfig: use_sliding_window=True is not supported (Ouro uses full attention only)")
        # Ouro checkpoints carry Qwen2's sliding_window value with use_sliding_window=false: it is unused.
        self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)


__all__ = ["OuroConfig"]
