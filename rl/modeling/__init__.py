"""Ouro-compatible looped causal LM (HF PreTrainedModel), registered with the transformers Auto classes.

Importing this package (or `rl`) makes `AutoConfig` / `AutoModelForCausalLM` resolve `model_type="ouro"`
to these classes, so saved models and real Ouro checkpoint directories load without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ouro import OuroConfig
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
    "OuroConfig",
    "OuroForCausalLM",
    "OuroModel",
    "OuroPreTrainedModel",
    "OuroCausalLMOutput",
    "exit_probs_from_lambdas",
    "threshold_exit_index",
]
