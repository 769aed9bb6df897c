"""The run directory's policy: one run per directory, nothing already written is ever lost or mixed.

Why a module of its own: mixing two runs in one directory (the second run's first steps glued to the
first run's continuation) and losing a finished model to a full disk are silent failures; every
rule that prevents them lives here, torch-free, so the trainer calls one function per rule.

- `prepare_output_dir`: before any compute, refuse an output_dir that is a file or unwritable, and a
  directory that already holds a run unless `--resume` (continue it) or `--overwrite` (replace it).
- `atomic_dir`: write a directory (final/) next to its place and rename it in, so a crash or a full
  disk leaves the previous version intact instead of a config.json without weights.
- `check_writable_file`: eval/plot `--out` is checked before minutes of compute, not after.
- `one_line`: an OSError or a library's write error (torch's "unexpected pos") as one line naming the file.
- `RunLock`: one process per output_dir for the run's life (a second `--resume` or `--overwrite` while
  a run is live would interleave its metrics.jsonl with the first's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from rl.config import ConfigError

# What a looprl run writes into its output_dir; anything else there belongs to the user and is left alone.
RUN_ARTEFACTS = ("metrics.jsonl", "samples.jsonl", "config.yaml", "config_changes.jsonl", "checkpoints", "final",
                 "looprl")
# Held (flock) by the run's main process; not an artefact: it stays, an --overwrite keeps it.
LOCK_FILE = ".looprl.lock"
# A checkpoint directory is complete once this file is in it (rl/checkpoint.py writes it last).
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDirError(ConfigError):
    """The output directory cannot take this run; the message says why and what to do, in one line."""


class RunWriteError(OSError):
    """Something the run had to write could not be written (full disk, permissions); one line."""


def _writable_dir(path: Path, what: str) -> None:
    """Create `path` if needed and prove a file can be created in it (os.access lies on some mounts)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".looprl-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{what} {path}: not writable ({e.strerror or e})") from None


def existing_run(output_dir: str | Path) -> list[str]:
    """The run artefacts already present in `output_dir` (empty list: a fresh directory)."""
    root = Path(output_dir)
    return [name for name in RUN_ARTEFACTS if (root / name).exists()] if root.is_dir() else []


def prepare_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool, clear: bool = False) -> None:
    """Check `output_dir` (call it before loading anything); `clear=True` (main process, once the
    whole config is known to be valid) then removes the previous run's artefacts under `overwrite`.

    `--resume` in a used directory without a complete checkpoint is refused: it would silently start
    over on top of the old metrics. Every process may run the checks (they only read).
    """
    root = Path(output_dir)
    if resume and overwrite:
        raise RunDirError("config keys 'resume' and 'overwrite': give one of them, not both")
    _writable_dir(root, "config key 'output_dir':")
    found = existing_run(root)
    if not found:
        return
    if resume:
        if not list_checkpoints(root):
            raise RunDirError(
                f"--resume: {root} holds a run ({', '.join(found)}) but no complete checkpoint to continue from; "
                "add --overwrite instead of --resume to start over there")
        return
    if not overwrite:
        raise RunDirError(
            f"config key 'output_dir': {root} already holds a run ({', '.join(found)}); add --resume to "
            "continue it or --overwrite to replace it")
    if clear:
        for name in found:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


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


def check_writable_file(path: str | Path, what: str) -> None:
    """Raise ValueError (one line) unless `path` can be written, without creating anything: a missing
    directory is fine when its nearest existing ancestor is a writable directory (it is made later)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a directory")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path}: {ancestor} is a file, not a directory")
    if ancestor != path.parent or not path.exists():
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path}: {ancestor} is not writable")
        return
    try:
        with path.open("a"):  # the file exists: appending nothing proves it can be rewritten
            pass
    except OSError as e:
        raise ValueError(f"{what} {path}: not writable ({e.strerror or e})") from None


# A write that fails with this little room left failed for lack of it, whatever the library said
# (torch's zip writer reports a full disk as "unexpected pos ...").
LOW_SPACE_BYTES = 64 << 20


# torch's zip writer (torch.save) reports a short write, full disk or file-size limit, only as
# "[enforce fail at inline_container.cc:NNN] . unexpected pos A vs B" or "PytorchStreamWriter failed ...".
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed")


def one_line(exc: BaseException, path: str | Path | None = None, file: str | Path | None = None) -> str:
    """A write failure as one line; a full disk is named as such whatever library raised it.
    `path`: where the write went, used to look at the free space when the error does not say;
    `file`: the file being written when it failed (see `newest_file`), named when the error does not."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, RunWriteError):
        return text
    where = getattr(exc, "filename", None) or file
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return f"no space left on device{f' writing {where}' if where else ''}"
    if code == errno.EFBIG or "File too large" in text or "os error 27" in text:
        return f"file too large (a file-size limit) writing {where or path or 'a file'}"
    if any(sign in text for sign in _TORCH_SHORT_WRITE):
        free = _free_bytes(path or where)
        room = f"{free // 1024} KiB free" if free is not None else "free space unknown"
        return (f"could not finish writing {where or path or 'a file'}: the disk is full or a file-size limit "
                f"was hit ({room})")
    free = _free_bytes(path or where)
    if free is not None and free < LOW_SPACE_BYTES:
        return f"disk almost full ({free // 1024} KiB free) ({text[:120]})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    return text


def newest_file(directory: str | Path) -> Path | None:
    """The most recently modified file under `directory`: after a failed write, the one being written."""
    try:
        files = [p for p in Path(directory).rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def _free_bytes(path: str | Path | None) -> int | None:
    if not path:
        return None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; on success it replaces `path` in one rename.

    On any failure the temporary directory is removed and `path` is untouched; the error becomes a
    RunWriteError saying what could not be written.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
    except Exception as e:
        file = newest_file(tmp)
        file = path / file.relative_to(tmp) if file else None  # named where it was going
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunWriteError(f"cannot write {path}: {one_line(e, path.parent, file)}; "
                            "its previous contents (if any) are intact") from e
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def check_resume_step(step: int, max_steps: int, path: str | Path, log) -> None:
    """A checkpoint beyond max_steps cannot be continued to max_steps: refuse instead of doing nothing."""
    if step > max_steps:
        raise RunDirError(f"--resume: checkpoint {path} is at step {step}, beyond max_steps {max_steps}; "
                          f"set --max_steps above {step} to train further")
    if step == max_steps:
        log(f"--resume: checkpoint {path} is at max_steps {max_steps}: nothing to train, final/ is written "
            "again (set a larger --max_steps to continue)")


_HELD_LOCKS: set[int] = set()  # lock file descriptors of this process


def _close_locks_in_child() -> None:
    """A forked child (a verifier pool worker) closes its copies of the lock: closing them does not release
    the parent's lock, but a child that outlived a killed parent would otherwise keep holding it."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


class RunLock:
    """An exclusive `flock` on <output_dir>/.looprl.lock for the run's life (its main process only).

    The kernel releases it when the holder dies however it dies (kill -9, OOM), so a lock file left
    behind never blocks a later run; the file holds the holder's pid for the refusal message. A
    filesystem without locks gets a warning and an unlocked run rather than no run.
    """

    def __init__(self, output_dir: str | Path, warn) -> None:
        root = Path(output_dir)
        _writable_dir(root, "config key 'output_dir':")
        path = root / LOCK_FILE
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise RunDirError(f"config key 'output_dir': {root} is in use by another looprl run (pid {holder}); "
                              "wait for it to end, stop it, or choose another output_dir") from None
        except OSError as e:  # ENOLCK / EOPNOTSUPP: some network filesystems
            warn(f"WARNING: cannot lock {path} ({e.strerror or e}); nothing stops a second run from writing "
                 f"into {root} at the same time")
            return
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        _HELD_LOCKS.add(self.fd)

    def __del__(self) -> None:  # a Trainer dropped without train() or close() frees its output_dir
        self.release()

    def release(self) -> None:
        if getattr(self, "fd", None) is None:
            return
        _HELD_LOCKS.discard(self.fd)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
