"""The one place that knows whether a model is looped and what its T (loops per token) is.

A model family is looped when its `config.model_type` is a key of LOOP_COUNT_KEYS; the value names the
config attribute holding T. Adding a looped family = one entry here plus its modeling code in `looped/`
(and, for vLLM, whatever its vLLM implementation needs). Everything else (trainer, rollout workers, eval)
asks these functions instead of probing attributes.
"""

from __future__ import annotations

from typing import Any

# model_type -> name of the config attribute holding the number of loops T
LOOP_COUNT_KEYS: dict[str, str] = {"ouro": "total_ut_steps"}


def _config(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def is_looped(model_or_config: Any) -> bool:
    """True for a looped LM (its forward takes `depth=` and it builds per-loop KV caches)."""
    return getattr(_config(model_or_config), "model_type", None) in LOOP_COUNT_KEYS


def max_depth(model_or_config: Any) -> int:
    """T, the loops the model was trained with (its default depth); 1 for a standard LM."""
    config = _config(model_or_config)
    key = LOOP_COUNT_KEYS.get(getattr(config, "model_type", None) or "")
    return int(getattr(config, key, 1) or 1) if key else 1
