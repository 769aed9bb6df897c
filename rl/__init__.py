"""looprl trainer package. Importing it registers the Ouro model with the transformers Auto classes."""

import looped  # noqa: F401  (registers OuroConfig / OuroForCausalLM with AutoConfig / AutoModel)

__version__ = "0.1.0"
