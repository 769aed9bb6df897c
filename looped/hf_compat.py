"""The one place that knows which transformers internals the Ouro model relies on, and how they are spelled.

transformers moves fast: 5.24 renamed the cache argument and output field from `past_key_values` to `cache`
(the old name warns and goes away in 5.40). Everything version-dependent the model needs (cache classes, the
mask helper, `repeat_kv`, the name of the cache) is imported or decided here, so the next rename is a change to
this file alone. Supported range: see pyproject.toml (tested in CI on both ends, see README "Supported versions").
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

__all__ = [
    "CACHE_NAME",
    "Cache",
    "DynamicCache",
    "DynamicLayer",
    "StaticCache",
    "StaticLayer",
    "causal_mask",
    "enable_activation_checkpointing",
    "model_output",
    "pick_cache",
    "repeat_kv",
]

# "cache" on transformers >= 5.24, "past_key_values" before: the keyword `generate()` passes to `forward` and
# reads back from the model output.
CACHE_NAME: str = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OLD_CACHE_NAME = "past_key_values"


def pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed to a forward under either name (generic callers on older releases use the old one)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once: as `cache` (or the deprecated `past_key_values`), not both")
    return cache if cache is not None else past_key_values


def causal_mask(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None,
) -> Any:
    """transformers' causal mask for this attention implementation (None, a tensor or a BlockMask)."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_NAME: cache},
    )


def model_output(cls: type) -> type:
    """Turn `cls` (a ModelOutput subclass whose body declares `cache`) into a dataclass that works on every release.

    On releases that still call the field `past_key_values` (generate() reads it by that name), the field is renamed,
    `cache=` is still accepted by the constructor and `.cache` still reads it, so our own code uses `cache` only.
    """
    if not issubclass(cls, ModelOutput) or "cache" not in cls.__annotations__:
        raise TypeError(f"{cls.__name__}: model_output() needs a ModelOutput subclass with a `cache` field")
    if CACHE_NAME == "cache":
        return dataclasses.dataclass(cls)
    cls.__annotations__ = {(_OLD_CACHE_NAME if k == "cache" else k): v for k, v in cls.__annotations__.items()}
    setattr(cls, _OLD_CACHE_NAME, cls.__dict__["cache"])
    delattr(cls, "cache")
    cls = dataclasses.dataclass(cls)
    init = cls.__init__

    def __init__(self, *args: Any, cache: Cache | None = None, **kwargs: Any) -> None:
        if cache is not None:
            kwargs[_OLD_CACHE_NAME] = cache
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.cache = property(lambda self: getattr(self, _OLD_CACHE_NAME))
    return cls


def enable_activation_checkpointing(model: Any, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing; 5.2x renamed `gradient_checkpointing_enable` and deprecated it."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
