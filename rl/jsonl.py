"""Reading JSON-lines files that users hand us (datasets, reward rows, metrics), with errors that name
the file and the line, so a bad row is one clear message instead of a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError, unit: str = "line"
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for every non-blank line; raise `error` naming file and line
    for a line that is not valid JSON or not a JSON object. `unit` is how messages call a line ("row")."""
    try:
        f = Path(path).open(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for number, line in _lines(f, path, error, unit):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}: {unit} {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise error(f"{path}: {unit} {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _lines(f, path: str | Path, error: type[Exception], unit: str) -> Iterator[tuple[int, str]]:
    """Numbered lines; a binary file (not UTF-8) is an error naming the file and line, not a traceback."""
    number = 0
    try:
        for number, line in enumerate(f, start=1):  # noqa: B007  (number is read after a decode error)
            yield number, line
    except UnicodeDecodeError:
        raise error(f"{path}: {unit} {number + 1}: not UTF-8 text (a binary file?)") from None
