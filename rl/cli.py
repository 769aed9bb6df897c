"""`looprl` command line: one subcommand per job, each implemented in its own module.

Subcommands are imported lazily so `looprl reward ...` does not pay for torch start-up.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rl.train:main", "GRPO/DAPO training at a fixed depth (no arguments: the embedded default job)"),
    "eval": ("rl.evaluate:main", "accuracy / pass@k of a model at each depth"),
    "export": ("rl.export:main", "a training checkpoint (runs/x/checkpoints/step-N) as a model directory"),
    "plot": ("rl.plot:main", "reward curves of one or more run directories as a PNG"),
    "reward": ("rl.reward_cli:main", "score completions with a reward function and show why"),
    "make-tiny": ("rl.make_tiny:main", "rebuild the embedded tiny looped model from a seed"),
}

MODEL_COMMANDS = ("train", "eval", "export", "make-tiny")


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: looprl <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`looprl <command> --help` shows the options of one command."]
    return "\n".join(lines)


def train_precheck(argv: list[str]) -> int | None:
    """`looprl train` answered from rl.config alone, before torch loads (~seconds): --help, --print_config,
    and any config error that needs neither torch nor the model (keys, types, values). None: go on."""
    from rl.config import ConfigError, help_text, portable_dict
    from rl.resume import load_run_config

    if argv[:1] in (["-h"], ["--help"]):
        print(help_text())
        return 0
    printing = "--print_config" in argv
    try:
        cfg = load_run_config([a for a in argv if a != "--print_config"], registries=False)
    except ConfigError as e:
        print(f"looprl train: {e}", file=sys.stderr)
        return 2
    if printing:
        import yaml

        print(yaml.safe_dump(portable_dict(cfg), sort_keys=False), end="")
        return 0
    from rl.rollout_process import spawn_early

    spawn_early(cfg.max_staleness)  # max_staleness >= 1 (validated: torch engine): overlaps our start-up
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"looprl: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "train":
        code = train_precheck(rest)
        if code is not None:
            return code
    if name in MODEL_COMMANDS:  # only these pay for transformers (start-up of the others stays < 1 s)
        # transformers' own per-file load/save bars would interleave with ours and say nothing for small models
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
