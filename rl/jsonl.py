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
        f = Path(path).open("rb")  # decoded line by line, so a bad byte is reported on its own line
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
    """Numbered decoded lines; bytes that are not UTF-8 are an error naming the file, line and column,
    not a traceback (decoding the whole stream would report the line where its read buffer began)."""
    for number, raw in enumerate(f, start=1):
        if b"\0" in raw:  # valid UTF-8, but no text file holds NUL bytes
            raise error(f"{path}: {unit} {number}: not UTF-8 text (NUL bytes: a binary file?)")
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{path}: {unit} {number}: not UTF-8 text (byte {e.start + 1} of the line; a binary "
                        "file or another encoding?)") from None
