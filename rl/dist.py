"""Reductions over training processes (identity with one process), for metrics and stop flags."""

from __future__ import annotations

import torch


def reduce_sum(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum each value over processes (float64, sorted keys so every process packs the same vector)."""
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


def reduce_max(accelerator, value: float) -> float:
    """The largest `value` over processes."""
    if accelerator.num_processes == 1:
        return value
    t = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return float(t.max())


def broadcast_from_main(accelerator, value):
    """The main process's `value` (any picklable object) on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
