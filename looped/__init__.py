"""Ouro-compatible looped causal LM (HF PreTrainedModel), registered with the transformers Auto classes.

`looped.facts` says whether a model is looped and what its T is; `looped.fast_decode` is its fused decode
step. Importing this package (or `rl`) makes `AutoConfig` / `AutoModelForCausalLM` resolve `model_type="ouro"`
to these classes, so saved models and real Ouro checkpoint directories load without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ouro import OuroConfig
from .facts import LOOP_COUNT_KEYS, is_looped, max_depth
from .modeling_ouro import (
    OuroCausalLMOutput,
    OuroForCausalLM,
    OuroModel,
    OuroPreTrainedModel,
    exit_probs_from_lambdas,
    threshold_exit_index,
)

AutoConfig.register("ouro", OuroConfig, exist_ok=True)
AutoModel.register(OuroConfig, OuroModel, exist_ok=True)
AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)

__all__ = [
    "LOOP_COUNT_KEYS",
    "is_looped",
    "max_depth",
    "OuroConfig",
    "OuroForCausalLM",
    "OuroModel",
    "OuroPreTrainedModel",
    "OuroCausalLMOutput",
    "exit_probs_from_lambdas",
    "threshold_exit_index",
]
