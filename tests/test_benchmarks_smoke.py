"""benchmarks/verify.py still runs end to end (smallest size), so the numbers in docs/BENCHMARKS.md can be
reproduced; it must also keep agreeing between the inline and the pooled verifier."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "verify.py"


def test_verify_benchmark_smallest_size() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--n", "16", "--batch", "8", "--workers", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "short (integer)" in out and "mixed (MATH-like)" in out
    disagreements = re.findall(r"inline vs pool disagree on (\d+)", out)
    assert disagreements == ["0", "0"]
    fast = re.search(r"pool run: (\d+) fast-path, (\d+) symbolic", out)
    assert fast and int(fast.group(2)) == 0  # the integer set never reaches the symbolic pool
