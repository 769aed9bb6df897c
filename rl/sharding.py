"""FSDP2 for the policy: torch's `fully_shard`, asked for through accelerate's launcher.

Why our own call instead of accelerate's FSDP plugin: accelerate 1.15 only turns `distributed_type:
FSDP` into FSDP on accelerator devices; with CPU processes (gloo) it silently falls back to plain
multi-CPU data parallelism (AcceleratorState keeps DistributedType.MULTI_CPU and drops the plugin).
So the trainer reads the launcher's request (`ACCELERATE_USE_FSDP=true`, `FSDP_VERSION=2`, set by
`accelerate launch --config_file configs/accelerate/fsdp2*.yaml`), removes it from the environment
before building the Accelerator (so accelerate never wraps the model a second time), and shards the
model here, on CPU and GPU alike: the path CI runs on two gloo processes is the path a GPU node runs.

What is sharded: parameters, gradients and AdamW states, dim 0 over all processes (one FSDP unit per
decoder layer, `_no_split_modules`, plus the root for embeddings, final norm, lm_head and the exit
gate). The root keeps its parameters gathered from forward to backward (`reshard_after_forward=False`,
FSDP2's own default for the root), so code that calls `lm_head` or the gate on the forward's hidden
states (exit metrics, self-distillation, the gate loss) sees full weights. Every forward all-gathers,
so every process must run the same number of forwards (rl/policy.py pads with dummy passes).

The rollout worker cannot decode through sharded weights (processes stop at different lengths, and
each decode step would all-gather every layer), so it gets a full-weight copy, refreshed by
`gather_into` after every update (all processes take part; vLLM then reloads from that copy).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

from rl.config import ConfigError

FSDP_ENV = "ACCELERATE_USE_FSDP"
TAKEN_ENV = "LOOPRL_FSDP2"  # the request, once taken from accelerate (a second Trainer in the process sees it)


def take_fsdp_request(env: MutableMapping[str, str]) -> bool:
    """True when the launcher asked for FSDP2; moves the request out of accelerate's variable so accelerate
    leaves the model to us. FSDP1 (`fsdp_version: 1`) is refused in one line: only FSDP2 is implemented."""
    if env.get(FSDP_ENV, "false").lower() != "true":
        return env.get(TAKEN_ENV) == "1"
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"accelerate config: fsdp_version {version} is not supported; set `fsdp_version: 2` "
                          "(configs/accelerate/fsdp2.yaml)")
    env.pop(FSDP_ENV)
    env[TAKEN_ENV] = "1"
    return True


def shard_model(model: torch.nn.Module) -> None:
    """fully_shard each decoder layer (the model's `_no_split_modules`), then the root, in place."""
    from torch.distributed.fsdp import fully_shard

    unit_names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in unit_names]
    if not units:
        raise ConfigError(f"FSDP2: {type(model).__name__} names no layer class in _no_split_modules to shard by")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=False)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded one: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def like_sharded(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`local` (this process's shard) as a tensor sharded like `like`; unchanged when `like` is not sharded."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


@torch.no_grad()
def gather_into(sharded: torch.nn.Module, full: torch.nn.Module) -> None:
    """Copy `sharded`'s weights, gathered, into the plain module `full` (same architecture). Collective."""
    if hasattr(sharded, "reshard"):
        sharded.reshard()  # a forward without backward leaves the root gathered: state_dict wants shards
    targets = full.state_dict()
    for name, tensor in sharded.state_dict().items():
        targets[name].copy_(full_tensor(tensor))
