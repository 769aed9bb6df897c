"""tools/device_check.sh in CPU mode (--quick, CUDA hidden): exit 0, a report that names what it skipped,
and a default-job step with its times. The GPU parts themselves run only on a lent GPU machine."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device_check.sh"


@pytest.mark.slow
def test_device_check_quick_runs_its_cpu_parts_and_names_what_it_skipped(tmp_path):
    assert os.access(SCRIPT, os.X_OK), "tools/device_check.sh must be executable"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "LOOPRL_WHEELS": str(tmp_path / "no-wheels")}
    env.pop("OUT", None)
    res = subprocess.run([str(SCRIPT), "--quick", "--out", str(tmp_path / "report")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    report = (tmp_path / "report" / "report.md").read_text()
    assert res.returncode == 0, report + res.stderr[-2000:]
    assert "GPU: none" in report
    assert "**SKIPPED**: tests/test_gpu.py (no CUDA)" in report
    assert "**SKIPPED**: the Ouro-1.4B step (--quick)" in report
    assert "**PASS** default-job" in report and "**FAIL**" not in report
    row = next(line for line in report.splitlines() if line.startswith("| 1 |"))  # step 1's times
    assert float(row.split("|")[3]) > 0  # time/rollout
    assert "no part failed" in report
