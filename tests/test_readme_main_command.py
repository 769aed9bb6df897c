"""The README's main command must work on the releases a fresh install picks: run it, for a few steps.

The command is read from README.md ("Set up", first bash block), so the test follows the README: if the
documented command changes or breaks (as it did when transformers 5.24 landed), CI goes red.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    """The shell commands of the README's "Set up" section, in order (one per bash block)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_install_plus_train_and_install_plus_tests():
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    main, tests = commands
    assert main.startswith("pip install ") and main.endswith("&& looprl train"), main
    assert tests.startswith("pip install ") and tests.endswith("&& python -m pytest -q"), tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci, ".ci/run must call the README's test command"


def test_readme_main_command_runs_three_steps(tmp_path):
    main = readme_setup_commands()[0]
    job = shlex.split(main.split("&&")[-1])  # ["looprl", "train"]: the install part has already run
    exe = shutil.which(job[0]) or shutil.which(job[0], path=str(Path(sys.executable).parent))
    assert exe, f"{job[0]!r} is not on PATH: the README's install step did not install the console script"
    out = tmp_path / "run"
    proc = subprocess.run(
        [exe, *job[1:], "--max_steps", "3", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3], steps
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
