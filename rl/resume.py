"""What `--resume` may change: the checkpoint's config against this run's, refused or applied and recorded.

Why: a resumed run that silently trains with another model, data, loss or seed than its first steps is
two runs glued together under one name, and a changed `lr` that the restored optimizer overrides is a
config.yaml that lies. Every checkpoint holds the config it was trained with (`trainer_state.json`,
key "config"); on `--resume` each key that differs is either

- resumable (rl/config.py `RESUMABLE_KEYS`: schedule length, learning rates, intervals, memory and
  logging knobs): applied from the resume step on, logged, written to config.yaml (which then always
  holds what runs) and appended to `config_changes.jsonl` with the step it took effect; or
- anything else: refused in one line naming each key, old -> new, before any compute.

Torch-free: the learning-rate fix only touches the scheduler's and optimizer's attributes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from rl.config import (
    FIELDS,
    RESUMABLE_KEYS,
    RUN_CONTROL_KEYS,
    ConfigError,
    TrainConfig,
    coerce,
    load_config,
    portable_dict,
    validate,
)
from rl.run_dir import STATE_FILE, RunDirError, list_checkpoints

CHANGES_FILE = "config_changes.jsonl"
# keys whose change needs the restored lr schedule rebuilt (the optimizer keeps the checkpoint's rates)
SCHEDULE_KEYS = ("lr", "max_steps")


def _same(a: Any, b: Any) -> bool:
    """Equal as stored data (JSON and YAML round trips: tuples are lists, 1 == 1.0)."""
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def trained_config(state: Mapping[str, Any] | None, output_dir: str | Path) -> dict[str, Any] | None:
    """The config a checkpoint was trained with: its own record, else the run's config.yaml (checkpoints
    written before configs were recorded in them); None when neither can be read."""
    if state and isinstance(state.get("config"), dict):
        return dict(state["config"])
    path = Path(output_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def newest_state(output_dir: str | Path) -> dict[str, Any] | None:
    """The trainer state of the newest checkpoint whose state file reads (the one --resume will try first)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return state
    return None


def config_changes(old: Mapping[str, Any], cfg: TrainConfig, where: str | Path) -> dict[str, tuple[Any, Any]]:
    """The resumable keys that differ, {key: (old, new)}; RunDirError (one line) naming every other
    changed key. Keys the old config lacks (an older looprl) are not compared."""
    new = portable_dict(cfg)
    changed = {k: (old[k], v) for k, v in new.items()
               if k in old and k not in RUN_CONTROL_KEYS and not _same(old[k], v)}
    refused = {k: ov for k, ov in changed.items() if k not in RESUMABLE_KEYS}
    if refused:
        shown = "; ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in refused.items())
        raise RunDirError(f"--resume: {where} was trained with other settings: {shown}; these cannot change on "
                          "resume (`looprl train --help` lists what can): give the old values, or train into "
                          "a new output_dir")
    return changed


def adopt_trained_config(cfg: TrainConfig) -> list[str]:
    """On --resume, every key the user did not set (command line or --config file, `cfg.given_keys` from
    load_config) takes the newest checkpoint's value, so `--resume --max_steps 8` changes max_steps only,
    never lr or reward_on_error back to their defaults. A TrainConfig built in Python records nothing:
    all its keys count as set. Returns the adopted keys."""
    given = getattr(cfg, "given_keys", None)
    state = newest_state(cfg.output_dir) if given is not None else None
    old = trained_config(state, cfg.output_dir) if state is not None else None
    if not old:
        return []
    adopted = []
    for key, value in old.items():
        if key in given or key in RUN_CONTROL_KEYS or key not in FIELDS:
            continue
        try:
            setattr(cfg, key, coerce(key, value))
        except ConfigError as e:
            raise RunDirError(f"--resume: {cfg.output_dir}'s recorded config: {e}; set it explicitly") from None
        adopted.append(key)
    if "off_policy_ratio" not in given:
        if not cfg.max_staleness:  # read only with max_staleness >= 1: a resume that turns that off drops it
            cfg.off_policy_ratio = FIELDS["off_policy_ratio"].default
        elif old.get("max_staleness") and "off_policy_ratio" not in old:
            cfg.off_policy_ratio = "proximal"  # async runs recorded before the key trained with the decoupled ratio
            adopted.append("off_policy_ratio")
    return adopted


def load_run_config(argv: list[str], *, registries: bool = True) -> TrainConfig:
    """`looprl train`'s config: load_config, with a --resume's unset keys taken from the checkpoint before
    validation, so the checks (and --print_config) see the settings the resumed run will train with."""
    cfg = load_config(argv, registries=registries, check=False)
    if cfg.resume:
        adopt_trained_config(cfg)
    return validate(cfg, registries=registries)


def check_unchanged(cfg: TrainConfig) -> None:
    """Before any loading: refuse a --resume whose frozen keys differ from the newest checkpoint's config
    (the checkpoint actually restored is checked again, with its changes applied, by the trainer)."""
    state = newest_state(cfg.output_dir)
    old = trained_config(state, cfg.output_dir) if state is not None else None
    if old is not None:
        config_changes(old, cfg, cfg.output_dir)


def data_fingerprint(dataset) -> dict[str, Any]:
    """Rows and a content hash of the training prompts: the same `data` path may hold another file by
    the time a run is resumed (edited, regenerated, another working directory)."""
    digest = hashlib.sha256()
    for batch in dataset.iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return {"rows": len(dataset), "sha256": digest.hexdigest()}


def check_same_data(old: Mapping[str, Any] | None, new: Mapping[str, Any], data: str, where: str | Path) -> None:
    """Refuse (one line) a resume whose training prompts differ from the checkpoint's (None: not recorded)."""
    if old is not None and dict(old) != dict(new):
        rows = f"{old.get('rows')} -> {new['rows']} rows" if old.get("rows") != new["rows"] else "same row count"
        raise RunDirError(f"--resume: the prompts of data {data!r} differ from those {where} was trained on "
                          f"({rows}, content changed); restore them, or train into a new output_dir")


def record_changes(output_dir: str | Path, step: int, changes: Mapping[str, tuple[Any, Any]],
                   log: Callable[[str], None]) -> None:
    """Log each change and append it to config_changes.jsonl (main process)."""
    for key, (old, new) in changes.items():
        log(f"--resume: {key} {old!r} -> {new!r} from step {step + 1} ({RESUMABLE_KEYS[key]})")
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
    with (Path(output_dir) / CHANGES_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")


def reset_lr_schedule(scheduler, base_lrs: list[float]) -> None:
    """Make a restored LambdaLR use this run's base rates (and its lambdas, built from this run's
    max_steps) from its current position. Restoring a checkpoint brings back the old base rates and
    the optimizer's old current rates, which would silently override a changed lr or max_steps."""
    scheduler.base_lrs = list(base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, base_lrs, lrs):
        group["initial_lr"] = base
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() (the logged `lr`) reports until the next step
