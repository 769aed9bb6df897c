"""Adapter layers (peft LoRA) seen as the plain linears they stand for.

Why: with LoRA the rollout must sample from the adapted model. The fused decode step
(looped/fast_decode.py) concatenates projection weights, and the vLLM engine loads plain
checkpoint names; both need W + scale * B @ A under the base layer's own name, not peft's
`base_layer` / `lora_A` / `lora_B` parts. Duck-typed (any module with `base_layer` and
`get_delta_weight`), so looped/ and rollout/ need no peft import; a model without adapters passes
through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# name parts peft inserts: the wrapped layer, and a fully trained copy (modules_to_save) of a module
_WRAPPED = "base_layer"
_SAVED_COPY = "modules_to_save"


def is_adapter_layer(module) -> bool:
    return hasattr(module, _WRAPPED) and callable(getattr(module, "get_delta_weight", None))


def effective_weight(linear) -> torch.Tensor:
    """The weight a (possibly LoRA-wrapped) linear applies now: W, plus each active adapter's delta
    unless the adapters are disabled or already merged into W. No copy for a plain linear."""
    if not is_adapter_layer(linear):
        return linear.weight
    weight = linear.get_base_layer().weight
    if linear.disable_adapters or linear.merged:
        return weight
    for name in linear.active_adapters:
        if name in getattr(linear, "lora_A", {}):
            weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight


def base_weight(linear) -> torch.Tensor:
    """The weight of the plain linear a LoRA layer wraps (the linear's own weight otherwise)."""
    return linear.get_base_layer().weight if is_adapter_layer(linear) else linear.weight


def adapter_output(linear, x: torch.Tensor) -> torch.Tensor | None:
    """What a LoRA layer adds to its base output for input `x`, computed as its forward does
    (lora_B(lora_A(x)) * scaling per active adapter, no dropout: inference), so a fused matmul over
    base weights plus this term rounds like the model's forward; None when nothing is added."""
    if not is_adapter_layer(linear) or linear.disable_adapters or linear.merged:
        return None
    out = None
    for name in linear.active_adapters:
        if name in getattr(linear, "lora_A", {}):
            term = linear.lora_B[name](linear.lora_A[name](x.to(linear.lora_A[name].weight.dtype))) \
                * linear.scaling[name]
            out = term if out is None else out + term
    return out


def merged_named_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, tensor) of every parameter as the adapted model would have it merged: a LoRA layer
    yields `<name>.weight` = W + delta (and its base bias), a fully trained copy of a module yields its
    copy under the module's own name, adapter factors and frozen originals are left out. Names are the
    model's own (no wrapper parts), so they match the base model's state dict."""
    adapter_layers = {name: m for name, m in model.named_modules() if is_adapter_layer(m)}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if _WRAPPED in parts:
            owner = ".".join(parts[:parts.index(_WRAPPED)])
            layer = adapter_layers.get(owner)
            if layer is not None and parts[-1] == "weight" and parts[-2] == _WRAPPED:
                yield f"{owner}.weight", effective_weight(layer).detach()
            elif parts[-2] == _WRAPPED:
                yield f"{owner}.{parts[-1]}", param.detach()
            continue  # lora_A / lora_B inside a wrapped layer never reach here (not under base_layer)
        if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
            continue
        if _SAVED_COPY in parts:  # <module>.modules_to_save.<adapter>.<param> -> <module>.<param>
            i = parts.index(_SAVED_COPY)
            yield ".".join(parts[:i] + parts[i + 2:]), param.detach()
            continue
        yield name, param.detach()
