"""LoRA fine-tuning of the policy through peft: adapters on the shared block, the base frozen.

    adapted = apply_lora(model, cfg)          # peft model; adapted.base_model.model is `model`, adapted in place
    keep_trainable_state(model)               # state_dict / load_state_dict: trainable tensors only
    with adapted.disable_adapter(): ...       # the base model: the KL reference without a second copy

Why this shape: a looped model applies its shared block T times, so one adapter on the shared
linears acts in every loop. The trainer keeps training the model object itself (peft injects the
adapter layers into it): depth=, output_exits= and the exit gate work unchanged, the rollout worker
samples from the adapted model (rollout/torch_worker.py, looped/adapters.py), and accelerate's
checkpoints hold what trains (the adapter, a fully trained gate) and its optimizer state only.
"""

from __future__ import annotations

import contextlib

import torch

from rl.config import ConfigError, TrainConfig

# the fully trained copy of the exit gate, when gate_loss_coef > 0 (peft's modules_to_save)
GATE_MODULE = "early_exit_gate"


def default_targets(model) -> list[str]:
    """Every linear layer of the shared block: the leaf names of the Linear modules under the decoder
    layers (Ouro: q/k/v/o and gate/up/down projections); the exit gate and lm_head are not under them."""
    names = {name.split(".")[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    if not names:
        raise ConfigError(f"config key 'lora_target_modules': {type(model).__name__} has no linear layers under "
                          "'layers'; name the modules to adapt")
    return sorted(names)


def apply_lora(model, cfg: TrainConfig):
    """Wrap `model` with a LoRA adapter (peft); only the adapter trains, plus the exit gate fully when
    gate_loss_coef > 0 (and it is not itself a LoRA target). Returns the peft model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("config key 'lora_rank': LoRA needs peft (pip install 'looprl[lora]')") from None
    targets = cfg.lora_target_modules or default_targets(model)
    train_gate = cfg.gate_loss_coef > 0 and GATE_MODULE not in targets and hasattr(model, "model") \
        and hasattr(model.model, GATE_MODULE)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(targets), bias="none",
                        modules_to_save=[GATE_MODULE] if train_gate else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"config key 'lora_target_modules': {' '.join(str(e).split())[:300]}") from None


def trainable_summary(model) -> str:
    """'trainable 12,345 of 1,234,567 parameters (1.00%): lora 12,288, early_exit_gate 57' for the start log."""
    total = trainable = 0
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            kind = "lora" if ".lora_" in name else next(
                (part for part in name.split(".") if part == GATE_MODULE), "base")
            groups[kind] = groups.get(kind, 0) + p.numel()
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(groups.items()))
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%): {parts}"


def keep_trainable_state(model) -> None:
    """Make `model.state_dict()` hold only the trainable tensors and `load_state_dict` accept that.

    accelerate's save_state/load_state take the model's state dict, so checkpoints (whatever their
    file format) hold the adapter and its optimizer state, not a frozen base copy per checkpoint. On
    load the frozen tensors are supplied from the model itself (they never change), so a strict load
    still checks that every trainable tensor is there.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in trainable}

    def drop_frozen(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in frozen]:
            del state_dict[key]

    def supply_frozen(module, state_dict, prefix, *args):
        for key, tensor in frozen.items():
            state_dict.setdefault(prefix + key, tensor)

    model.register_state_dict_post_hook(drop_frozen)
    model.register_load_state_dict_pre_hook(supply_frozen)


@contextlib.contextmanager
def dropout_active(model, p: float):
    """The adapter's dropout (lora_dropout = p) on for the update's gradient forward only. Everywhere
    else it is off (disable_dropout zeroes it with every other dropout, in train mode too), so rollouts
    and logprob scoring stay deterministic."""
    drops = [m for name, m in model.named_modules()
             if p > 0 and name.split(".")[-2:-1] == ["lora_dropout"] and isinstance(m, torch.nn.Dropout)]
    modes = [m.training for m in drops]
    for m in drops:
        m.p = p
        m.train(True)
    try:
        yield
    finally:
        for m, mode in zip(drops, modes):
            m.p = 0.0
            m.train(mode)
