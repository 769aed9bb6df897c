"""Checkpoints that are either complete or absent: written to a temp dir, then renamed.

A checkpoint holds everything needed for a bit-identical continuation on CPU: model, optimizer,
scheduler and every process's RNG states (through `accelerate`'s save_state, which also handles
DeepSpeed/FSDP sharding) plus `trainer_state.json` (step, data position, counters), written last.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rl.config import ConfigError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write checkpoints/step-<step>/ atomically (all processes must call this)."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
    except Exception as e:  # a full disk: leave no half checkpoint behind, say so in one line
        from rl.run_dir import RunWriteError, newest_file, one_line

        file = newest_file(tmp)  # the file being written, named where it was going
        file = final / file.relative_to(tmp) if file else None
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunWriteError(f"cannot write checkpoint {final}: {one_line(e, root, file)}; older checkpoints are "
                            "intact") from e
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem: readers see no checkpoint or a complete one
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temp dirs and dirs without trainer_state.json are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG in place; return the trainer state dict."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())


class CheckpointError(ConfigError):
    """No checkpoint of the run could be read; the message names the newest one and why."""


def load_latest_checkpoint(accelerator, output_dir: str | Path, warn: Callable[[str], None]
                           ) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint that reads completely; None when the run has none.

    A truncated or corrupt newest checkpoint (weights, optimizer, scheduler, RNG or trainer state)
    is skipped with a warning naming it, and the next older one is tried: a crash while a disk
    filled up must not cost the whole run. A partly restored bad checkpoint is harmless because the
    fallback restores every piece again. Raises CheckpointError when none can be read.
    """
    found = list_checkpoints(output_dir)
    failures = []
    for _, path in reversed(found):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError(f"{STATE_FILE} has no integer 'step'")
            accelerator.load_state(str(path))
        except Exception as e:  # torch/pickle/json raise many types for a truncated file
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            failures.append(f"{path} ({reason})")
            warn(f"WARNING: checkpoint {path} is unreadable ({reason}); trying the previous one")
            continue
        return path, state
    if failures:
        raise CheckpointError(f"--resume: no readable checkpoint; newest: {failures[0]}")
    return None

