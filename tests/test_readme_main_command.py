"""The README's main command must work on the releases a fresh install picks: run it, the whole default job,
and check that README's numbers of that job are what it produces (tools/readme_numbers.py --check).

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

import pytest

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


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The README's main command exactly as written (no arguments): the full default job, run once for the
    tests below. Deterministic on CPU, so its numbers are the README's."""
    main = readme_setup_commands()[0]
    job = shlex.split(main.split("&&")[-1])  # ["looprl", "train"]: the install part has already run
    exe = shutil.which(job[0]) or shutil.which(job[0], path=str(Path(sys.executable).parent))
    assert exe, f"{job[0]!r} is not on PATH: the README's install step did not install the console script"
    cwd = tmp_path_factory.mktemp("readme-main")
    proc = subprocess.run([exe, *job[1:]], capture_output=True, text=True, timeout=1800, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "default"


@pytest.mark.slow
def test_readme_main_command_runs_the_default_job(default_run):
    from rl.config import TrainConfig

    steps = [json.loads(line).get("step") for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == list(range(1, TrainConfig().max_steps + 1)), steps
    assert (default_run / "final" / "config.json").is_file() and (default_run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_readme_numbers_are_what_the_default_job_produces(default_run):
    """README's after-RL table, accuracy summary, mismatch and exit-KL numbers equal what this run and
    `looprl eval` on its final/ give (tools/readme_numbers.py --check); a change of defaults that moves them
    fails here until `python tools/readme_numbers.py --write` is committed."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_numbers.py"), "--check", "--run",
                           str(default_run)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
