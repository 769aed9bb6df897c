"""Checkpoints that are complete or absent, and that hold data only: safetensors and JSON, never a pickle.

Why our own format instead of accelerate's save_state: that one writes pickles (`random_states_*.pkl`,
`custom_checkpoint_*.pkl`, optimizer/scheduler `.bin`) and `--resume` unpickled them, so a checkpoint
someone shared could run code on resume. Here every file is parsed as data (safetensors, JSON); a
file of any other name in a checkpoint directory is never opened.

checkpoints/step-N/ (written to `.tmp-step-N`, then renamed: readers see no checkpoint or a complete one):

| file | what | written by |
|---|---|---|
| `model.safetensors` | the model's state dict (HF names; tied weights once, see `checkpoint.json`) | main process |
| `optimizer.safetensors` | optimizer state tensors, keyed `<param name>/<key>` (AdamW: step, exp_avg, exp_avg_sq) | main process |
| `optimizer.json` | param groups (hyper-parameters; params by name) and non-tensor state values | main process |
| `scheduler.json` | the LR scheduler's state dict | main process |
| `modules.safetensors` | extra trained modules (the learned policy-exit weights), `<module>.<tensor>` | main process |
| `rng-rank<r>.json` | python `random`, numpy, torch CPU (+ CUDA) generator states of process r | every process |
| `checkpoint.json` | format, process count, sharded or not, tied-weight aliases | main process |
| `trainer_state.json` | step, data position, counters; written last (its presence marks a complete checkpoint) | main process |

FSDP2 (rl/sharding.py): the model and optimizer files are per process, `model-rank<r>-of-<n>.safetensors`
and `optimizer-rank<r>-of-<n>.safetensors`, each holding that process's dim-0 shards; no process ever
holds the full training state. `--resume` needs the same number of processes (refused in one line
otherwise); `load_checkpoint_weights` consolidates the model shards into one state dict on any machine.

DeepSpeed: the engine's own checkpoint (accelerate's save_state/load_state, which DeepSpeed needs for
its partitioned optimizer) is kept for model and optimizer; those files are DeepSpeed's format, loaded
by DeepSpeed, and not covered by the no-pickle guarantee. Scheduler, extra modules and RNG are ours.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rl.config import ConfigError
from rl.dist import reduce_max
from rl.run_dir import STATE_FILE, RunWriteError, checkpoint_dir, list_checkpoints, newest_file, one_line
from rl.sharding import is_sharded, like_sharded, local_tensor

__all__ = ["STATE_FILE", "CheckpointError", "TrainState", "checkpoint_dir", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_checkpoint_weights", "load_latest_checkpoint", "save_checkpoint"]

FORMAT = 1
META_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_GROUPS_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
MODULES_FILE = "modules.safetensors"


def _rank_file(stem: str, rank: int, world: int) -> str:
    return f"{stem}-rank{rank}-of-{world}.safetensors"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.json"


@dataclass
class TrainState:
    """What a checkpoint restores besides the trainer's counters (rl/policy.py Policy.train_state)."""

    model: torch.nn.Module  # the bare model (not DDP-wrapped); FSDP2: the sharded module itself
    optimizer: Any  # a torch optimizer (or accelerate's wrapper of one)
    scheduler: Any  # an LR scheduler with state_dict/load_state_dict
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # trained modules outside the model
    engine: Any = None  # DeepSpeed: the prepared engine, saved through accelerate (see the module docstring)


class CheckpointError(ConfigError):
    """No checkpoint of the run could be read; the message names the newest one and why."""


# ---------------------------------------------------------------------------------------------- save

def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any], parts: TrainState
                    ) -> Path:
    """Write checkpoints/step-<step>/ atomically (all processes must call this)."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        if parts.engine is not None:
            accelerator.save_state(str(tmp), safe_serialization=True)  # DeepSpeed's partitioned engine state
        _write_parts(tmp, parts, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
    except Exception as e:  # a full disk: leave no half checkpoint behind, say so in one line
        file = getattr(e, "looprl_file", None) or newest_file(tmp)  # the file being written, named where it was going
        file = final / file.relative_to(tmp) if file else None
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunWriteError(f"cannot write checkpoint {final}: {one_line(e, root, file)}; older checkpoints are "
                            "intact") from e
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem
    accelerator.wait_for_everyone()
    return final


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return local_tensor(tensor).detach().to("cpu").contiguous()


def _base_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one


def _param_names(parts: TrainState) -> dict[int, str]:
    names = {id(p): n for n, p in parts.model.named_parameters()}
    for prefix, module in parts.modules.items():
        names.update({id(p): f"{prefix}.{n}" for n, p in module.named_parameters()})
    return names


def _write_parts(tmp: Path, parts: TrainState, rank: int, world: int, main: bool) -> None:
    writes_shared = main  # what every process holds alike is written once
    if parts.engine is None:
        model_state = parts.model.state_dict()
        sharded = any(is_sharded(t) for t in model_state.values())
        tensors, aliases = _dedupe({k: _cpu(v) for k, v in model_state.items()})
        optim_tensors, groups = _optimizer_payload(parts)
        if sharded:
            _save_tensors(tensors, tmp / _rank_file("model", rank, world))
            _save_tensors(optim_tensors, tmp / _rank_file("optimizer", rank, world))
        elif writes_shared:
            _save_tensors(tensors, tmp / MODEL_FILE)
            _save_tensors(optim_tensors, tmp / OPTIMIZER_FILE)
        if writes_shared:
            _write_json(tmp / OPTIMIZER_GROUPS_FILE, groups)
            _write_json(tmp / META_FILE, {
                "format": FORMAT, "world_size": world, "sharded": sharded, "aliases": aliases,
                "sharded_keys": sorted(k for k, v in model_state.items() if is_sharded(v))})
    elif writes_shared:
        _write_json(tmp / META_FILE, {"format": FORMAT, "world_size": world, "sharded": False, "deepspeed": True})
    if writes_shared:
        _write_json(tmp / SCHEDULER_FILE, parts.scheduler.state_dict())
        _save_tensors({f"{prefix}.{k}": _cpu(v) for prefix, m in parts.modules.items()
                       for k, v in m.state_dict().items()}, tmp / MODULES_FILE)
    _write_json(tmp / _rng_file(rank), rng_state())


def _write_json(path: Path, value: Any) -> None:
    _named_write(path, lambda: path.write_text(json.dumps(value, indent=1, allow_nan=True)))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    _named_write(path, lambda: save_file(tensors, str(path)))


def _named_write(path: Path, write: Callable[[], Any]) -> None:
    """Run `write`; a failure carries the file it was writing (`looprl_file`), which safetensors neither
    names nor leaves behind, so that save_checkpoint's one line can name it."""
    try:
        write()
    except Exception as e:
        e.looprl_file = path
        raise


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors stores no shared storage: a tied weight is kept once, its other names become aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, aliases


def _optimizer_payload(parts: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    opt = _base_optimizer(parts.optimizer)
    names = _param_names(parts)
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for param, state in opt.state.items():
        name = names[id(param)]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = _cpu(value)
            else:
                values.setdefault(name, {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return tensors, {"param_groups": groups, "values": values}


def rng_state() -> dict[str, Any]:
    """This process's generator states as JSON-able lists (what `set_rng_state` restores)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------- load

def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path.name} is missing")
    return json.loads(path.read_text())


def _meta(path: Path) -> dict[str, Any]:
    if not (path / META_FILE).is_file():
        raise ValueError(f"{META_FILE} is missing (not a looprl safetensors checkpoint; checkpoints of older "
                         "looprl versions hold pickles, which are never loaded)")
    meta = _read_json(path / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{META_FILE}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def load_checkpoint(accelerator, path: str | Path, parts: TrainState) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, extra modules and this process's RNG in place; return the
    trainer state dict. Reads safetensors and JSON only."""
    path = Path(path)
    state = _read_json(path / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{STATE_FILE} has no integer 'step'")
    meta = _meta(path)
    rank, world = accelerator.process_index, accelerator.num_processes
    if meta.get("world_size") != world and (meta.get("sharded") or meta.get("deepspeed")):
        raise ValueError(f"written by {meta.get('world_size')} processes (sharded); this run has {world}: "
                         "resume with the same number of processes")
    if parts.engine is not None:
        accelerator.load_state(str(path))  # DeepSpeed's engine files (see the module docstring)
    else:
        sharded = bool(meta.get("sharded"))
        model_file = _rank_file("model", rank, world) if sharded else MODEL_FILE
        optim_file = _rank_file("optimizer", rank, world) if sharded else OPTIMIZER_FILE
        _load_model_state(parts.model, _load_tensors(path / model_file), meta.get("aliases", {}))
        _load_optimizer(parts, _load_tensors(path / optim_file), _read_json(path / OPTIMIZER_GROUPS_FILE))
    parts.scheduler.load_state_dict(_read_json(path / SCHEDULER_FILE))
    modules = _load_tensors(path / MODULES_FILE)
    for prefix, module in parts.modules.items():
        own = {k[len(prefix) + 1:]: v for k, v in modules.items() if k.startswith(prefix + ".")}
        module.load_state_dict(own, strict=True)
    rng = path / _rng_file(rank)
    if not rng.is_file():  # a data-parallel checkpoint of fewer processes: no stream to continue here
        raise ValueError(f"{rng.name} is missing (written by {meta.get('world_size')} processes; this run has "
                         f"{world})")
    set_rng_state(_read_json(rng))
    return state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ValueError(f"{file.name} is missing")
    return load_file(str(file))


@torch.no_grad()
def _load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    targets = model.state_dict()
    expected = set(targets) - set(aliases)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"model weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, target in targets.items():
        value = tensors[aliases.get(name, name)]
        local = local_tensor(target)
        if local.shape != value.shape:
            raise ValueError(f"model weight {name}: shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(local.shape)} in the model")
        local.copy_(value)


def _load_optimizer(parts: TrainState, tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    opt = _base_optimizer(parts.optimizer)
    names = _param_names(parts)
    current = opt.state_dict()
    groups = saved["param_groups"]
    if [g["params"] for g in groups] != [[names[id(p)] for p in g["params"]] for g in opt.param_groups]:
        raise ValueError("optimizer parameter groups differ from the model's (another model or config?)")
    index, params = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
            params[names[id(p)]] = p
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, item = key.rpartition("/")
        if name not in index:
            raise ValueError(f"optimizer state for unknown parameter {name}")
        param = params[name]
        sharded_like_param = value.dim() == param.dim() > 0  # exp_avg & co; not AdamW's scalar step
        state.setdefault(index[name], {})[item] = like_sharded(value, param) if sharded_like_param else value
    for name, values in saved.get("values", {}).items():
        state.setdefault(index[name], {}).update(values)
    restored = []
    for now, old in zip(current["param_groups"], groups):
        group = {k: (tuple(v) if isinstance(now.get(k), tuple) else v) for k, v in old.items()}
        group["params"] = now["params"]
        restored.append(group)
    opt.load_state_dict({"state": state, "param_groups": restored})


def load_latest_checkpoint(accelerator, output_dir: str | Path, parts: TrainState, warn: Callable[[str], None]
                           ) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint that reads completely on every process; None when the run has none.

    A truncated or corrupt newest checkpoint (weights, optimizer, scheduler, RNG or trainer state)
    is skipped with a warning naming it, and the next older one is tried: a crash while a disk
    filled up must not cost the whole run. A partly restored bad checkpoint is harmless because the
    fallback restores every piece again. All processes agree on the one they continue from.
    Raises CheckpointError when none can be read.
    """
    found = list_checkpoints(output_dir)
    failures = []
    for _, path in reversed(found):
        reason = None
        try:
            state = load_checkpoint(accelerator, path, parts)
        except Exception as e:  # safetensors/json raise many types for a truncated file
            reason = " ".join(str(e).split())[:200] or type(e).__name__
        if reduce_max(accelerator, 0.0 if reason is None else 1.0) > 0:
            reason = reason or "unreadable on another process"
            failures.append(f"{path} ({reason})")
            warn(f"WARNING: checkpoint {path} is unreadable ({reason}); trying the previous one")
            continue
        return path, state
    if failures:
        raise CheckpointError(f"--resume: no readable checkpoint; newest: {failures[0]}")
    return None


def load_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict (HF names) from checkpoints/step-N, on any machine, without
    torch.distributed: FSDP2 shards are concatenated along dim 0 in rank order (their split).
    Raises ValueError (one line) for a directory that is not a readable looprl checkpoint."""
    path = Path(path)
    meta = _meta(path)
    if meta.get("deepspeed"):
        raise ValueError(f"{path}: a DeepSpeed checkpoint; its weights are in DeepSpeed's format "
                         "(use final/, or DeepSpeed's zero_to_fp32)")
    if meta.get("sharded"):
        world = int(meta["world_size"])
        shards = [_load_tensors(path / _rank_file("model", r, world)) for r in range(world)]
        sharded = set(meta.get("sharded_keys", []))
        tensors = {k: torch.cat([s[k] for s in shards]) if k in sharded else v for k, v in shards[0].items()}
    else:
        tensors = _load_tensors(path / MODEL_FILE)
    for alias, name in meta.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    return tensors
