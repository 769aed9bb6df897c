"""Run the test suite on the oldest or the newest releases of the fast-moving dependencies, in a scratch venv.

    python tools/deps_check.py --oldest    # every bounded dependency at its lower bound (what CI also runs)
    python tools/deps_check.py --newest    # the newest releases, upper bounds ignored: finds the next break

Why: a fresh install picks the newest release the pins allow, so a release we never ran reaches users first
(transformers 5.24 did). The bounded dependencies are the ones in pyproject.toml with an upper bound; `--newest`
drops those upper bounds and says which installed release lies beyond them. When it passes, raise the bound.
Extra arguments after `--` go to pytest (e.g. `-- -x tests/test_modeling.py`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name[extras] then a comma-separated specifier list; we only look at >= and < bounds.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*?)\s*$")


def project_requirements() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        sys.exit("tools/deps_check.py: needs Python >= 3.11 (tomllib) to read pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])


def bounds(spec: str) -> tuple[str | None, str | None]:
    """(lower, upper) from a specifier such as '>=5.16.1,<5.25'."""
    lower = re.search(r">=\s*([^,\s]+)", spec)
    upper = re.search(r"<\s*([^,=\s]+)", spec)
    return (lower.group(1) if lower else None, upper.group(1) if upper else None)


def rewrite(requirements: list[str], mode: str) -> tuple[list[str], dict[str, str | None]]:
    """Requirements for `mode`, and {name: upper bound} of the bounded (fast-moving) dependencies."""
    out, bounded = [], {}
    for line in requirements:
        match = REQUIREMENT.match(line)
        if not match:
            sys.exit(f"tools/deps_check.py: cannot parse dependency {line!r} in pyproject.toml")
        name, extras, spec = match.group(1), match.group(2) or "", match.group(3)
        lower, upper = bounds(spec)
        if upper is None or lower is None:
            out.append(line)
            continue
        bounded[name] = upper
        out.append(f"{name}{extras}=={lower}" if mode == "oldest" else f"{name}{extras}>={lower}")
    return out, bounded


REPORT = """
import sys, importlib.metadata as m
from packaging.version import Version
for arg in sys.argv[1:]:
    name, upper = arg.split("<")
    have = m.version(name)
    print(f"  {name:14s} {have:10s}" + (f" beyond the upper bound <{upper}" if Version(have) >= Version(upper) else ""))
"""


def requirements_of(requirements: list[str], names: dict[str, str | None]) -> list[str]:
    return [r for r in requirements if REQUIREMENT.match(r).group(1) in names]


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--oldest", action="store_const", const="oldest", dest="mode", help="lower bounds")
    mode.add_argument("--newest", action="store_const", const="newest", dest="mode", help="newest, no upper bounds")
    parser.add_argument("--venv", type=Path, help="scratch venv (default: /tmp/looprl-deps-<mode>); reused if present")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed first (CPU wheel)")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --); default: -q")
    args = parser.parse_args(argv)

    env_dir = args.venv or Path(f"/tmp/looprl-deps-{args.mode}")
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.create(env_dir, with_pip=True)
    requirements, bounded = rewrite(project_requirements(), args.mode)
    start = time.perf_counter()
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, args.torch])
    run([*pip, *requirements])
    if args.mode == "newest":  # a reused venv: move only the bounded packages (an unbounded torch would pull CUDA)
        run([*pip, "--upgrade", "--upgrade-strategy", "only-if-needed", *requirements_of(requirements, bounded)])
    run([*pip, "--no-deps", "-e", str(ROOT)])
    print(f"installed in {time.perf_counter() - start:.0f} s", flush=True)

    # Which releases does this run test, and which lie beyond today's upper bounds? (packaging: a transformers dep)
    subprocess.run([str(python), "-c", REPORT, *(f"{n}<{u}" for n, u in bounded.items())], check=True)
    test = subprocess.run([str(python), "-m", "pytest", *(args.pytest_args or ["-q"])], cwd=ROOT)
    print(f"deps_check --{args.mode}: pytest exited {test.returncode}", flush=True)
    return test.returncode


if __name__ == "__main__":
    sys.exit(main())
