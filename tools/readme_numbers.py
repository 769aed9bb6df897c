"""README's numbers of the embedded default job, generated from a run: the single source of them.

    python tools/readme_numbers.py --write              # run the default job + two evals, rewrite README + plot
    python tools/readme_numbers.py --check              # the same run, compare with README (exit 1 on a difference)
    python tools/readme_numbers.py --run runs/default --check    # reuse a finished default run

It runs (or reads) the default job, `looprl train` with no arguments (only --output_dir and --progress
set), then `looprl eval` with the job's eval settings on the shipped model (before RL) and on the run's
`final/` (after RL), and renders the "Reward curves" block of README.md between the markers
`<!-- readme_numbers:begin -->` and `<!-- readme_numbers:end -->`: the training-accuracy summary (the
run's end-of-run line), the rollout/update mismatch, the before/after table and the per-exit KL.
`--write` also redraws docs/reward_curve.png (`looprl plot`). The eval table must equal the run's own
in-training eval (`eval/accuracy_d{t}` at step 0 and at the last step): training and `looprl eval`
decide correct the same way (rl/accuracy.py), and the script stops if they disagree.

The default job is deterministic on CPU, so CI runs `--check` on the README's main command's run
(tests/test_readme_main_command.py): a change of defaults that moves the numbers fails until
`--write` is run and the new numbers are committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLOT = ROOT / "docs" / "reward_curve.png"
BEGIN, END = "<!-- readme_numbers:begin", "<!-- readme_numbers:end -->"
WIDTH = 110
RUN_ONLY_KEYS = {"output_dir", "progress", "resume", "overwrite"}  # where / how it shows, not what trains


class NumbersError(RuntimeError):
    """The run is not the default job, or its numbers contradict each other; one line."""


def _rl(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "rl", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise NumbersError(f"looprl {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def resolved(cfg):
    """`cfg` with what the trainer resolves from the embedded model before a run records config.yaml: depth
    None = its loop count, max_prompt_length fitted to its positions (rl.config.fit_to_positions)."""
    from looped.facts import max_depth
    from rl.config import fit_to_positions
    from rl.data import EMBEDDED_MODEL
    from rl.model_io import load_model_config

    model_config = load_model_config(EMBEDDED_MODEL, "the embedded model")
    cfg = dataclasses.replace(cfg)
    if cfg.depth is None:
        cfg.depth = max_depth(model_config)
    fit_to_positions(cfg, getattr(model_config, "max_position_embeddings", None))
    return cfg


def default_job_config(run: Path):
    """The run's config, checked to be the default job's in every key that changes what trains (both
    resolved as the trainer resolves them)."""
    from rl.config import TrainConfig, build_config

    path = run / "config.yaml"
    if not path.is_file():
        raise NumbersError(f"{run}: no config.yaml (not a looprl run directory)")
    cfg = resolved(build_config(yaml.safe_load(path.read_text()), str(path)))
    default = resolved(TrainConfig())
    differ = [f.name for f in dataclasses.fields(TrainConfig)
              if f.name not in RUN_ONLY_KEYS and getattr(cfg, f.name) != getattr(default, f.name)]
    if differ:
        raise NumbersError(f"{run} is not the default job: config keys {', '.join(differ)} differ from the defaults")
    return cfg


def train_default(out: Path) -> float:
    start = time.perf_counter()
    _rl("train", "--output_dir", str(out), "--progress", "false")
    return time.perf_counter() - start


def eval_args(cfg) -> list[str]:
    """`looprl eval` options that reproduce the job's in-training eval (data, prompts, length, verifier)."""
    from rl.accuracy import accuracy_kwargs

    args = ["--data", cfg.eval_data, "--max_new_tokens", str(cfg.eval_max_new_tokens or cfg.max_new_tokens)]
    if cfg.eval_limit:
        args += ["--limit", str(cfg.eval_limit)]
    if cfg.eval_depths:
        args += ["--depths", ",".join(map(str, cfg.eval_depths))]
    if cfg.accuracy_reward != "math_accuracy":
        args += ["--reward", cfg.accuracy_reward]
    for key, value in accuracy_kwargs(cfg.reward_specs(), cfg.reward_kwargs, cfg.accuracy_reward).items():
        args += ["--option", f"{key}={json.dumps(value)}"]
    return args


def evaluate(model: Path | None, args: list[str], out: Path) -> dict[str, float]:
    _rl("eval", *(["--model", str(model)] if model else []), *args, "--no_progress", "--out", str(out))
    return {depth: m["accuracy"] for depth, m in json.loads(out.read_text())["depths"].items()}


def _tenths(values: list[float]) -> tuple[float, float]:
    tenth = max(1, len(values) // 10)  # the same split as rl.metrics.summarize (the end-of-run line)
    return sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth


def _sci(x: float) -> str:
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def numbers(run: Path, before: dict[str, float], after: dict[str, float], cfg) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("step", 0) > 0]
    if len(steps) != cfg.max_steps:
        raise NumbersError(f"{run}: {len(steps)} steps logged, the default job runs {cfg.max_steps}")
    for row, table, what in ((rows[0], before, "step 0 / the shipped model"), (rows[-1], after, "the last step / final/")):
        logged = {k[len("eval/accuracy_d"):]: v for k, v in row.items() if k.startswith("eval/accuracy_d")}
        if logged != table:
            raise NumbersError(f"in-training eval and looprl eval disagree at {what}: {logged} vs {table}")
    return {"steps": cfg.max_steps, "depth": cfg.depth, "data": cfg.eval_data, "limit": cfg.eval_limit,
            "accuracy": _tenths([r["accuracy"] for r in steps]),
            "mismatch": max(r.get("mismatch/logp_abs_max", 0.0) for r in steps),
            "kl": max(r.get("mismatch/kl", 0.0) for r in steps),
            "exit_kl": _tenths([r["exit/kl_t1"] for r in steps]), "before": before, "after": after}


def render(n: dict, eval_cmd: list[str]) -> str:
    depths = sorted(n["after"], key=int)
    cmd = " ".join(eval_cmd)
    first, last = n["accuracy"]
    kl_first, kl_last = n["exit_kl"]
    lines = [
        f"{BEGIN} generated by `python tools/readme_numbers.py --write` from a fresh default run; "
        "CI checks it (tests/test_readme_main_command.py) -->",
        f"The embedded default run (`looprl train`, no arguments: {n['steps']} steps on CPU), plotted with "
        "`looprl plot runs/default --out docs/reward_curve.png`:",
        "",
        "![Reward curves of the embedded default run](docs/reward_curve.png)",
        "",
        f"Reward and training accuracy rise (accuracy {first:.3f} in the first tenth of the steps, {last:.3f} in "
        "the last: the run's end-of-run line), while rollout and update log-probs at the same depth agree to "
        f"within {_sci(n['mismatch'])} nats per token (max |Δlogp| over each step's batch; KL at most "
        f"{_sci(n['kl'])}). Eval accuracy per depth (greedy, the first {n['limit']} `{n['data']}` test prompts) "
        f"shows what depth-{n['depth']} RL does to the other depths. Before → after RL, from `looprl eval` on "
        f"the shipped model and on `runs/default/final` (equal to the run's own `eval/accuracy_d{{t}}` at step 0 "
        f"and step {n['steps']}):",
        "",
        "```bash",
        f"looprl eval {cmd}                              # before RL",
        f"looprl eval --model runs/default/final {cmd}   # after RL",
        "```",
        "",
        "| depth | " + " | ".join(depths) + " |",
        "|---" * (len(depths) + 1) + "|",
        "| before RL | " + " | ".join(f"{n['before'][d]:.3f}" for d in depths) + " |",
        f"| after RL (trained at depth {n['depth']}) | " + " | ".join(f"{n['after'][d]:.3f}" for d in depths) + " |",
        "",
        "These numbers and the plot come from one script: `python tools/readme_numbers.py --write` (runs the "
        "default job and both evals; `--check` compares instead).",
        "",
        f"The shallow exits gain less, and their KL to the last exit grows during training (exit 1: "
        f"{kl_first:.2f} → {kl_last:.2f} nats per token, first vs last tenth of the steps; the per-exit KL panel).",
        END,
    ]
    prose = ("The", "Reward", "These")  # paragraphs wrapped as the rest of README.md
    return "\n".join(textwrap.fill(line, WIDTH, break_long_words=False, break_on_hyphens=False)
                     if line.startswith(prose) else line for line in lines)


def replace_block(text: str, block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise NumbersError(f"{README}: no {BEGIN} ... {END} block")
    return text[:start] + block + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite README.md's block and docs/reward_curve.png")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md's block differs")
    parser.add_argument("--run", type=Path, default=None,
                        help="a finished default run to read (default: train one in a temporary directory)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's rl, as the `python -m rl` it runs
    try:
        with tempfile.TemporaryDirectory(prefix="readme-numbers-") as tmp:
            run = args.run.resolve() if args.run else None
            if run is None:
                run = Path(tmp) / "default"
                print(f"training the default job in {run} ...", file=sys.stderr)
                print(f"trained in {train_default(run):.0f} s", file=sys.stderr)
            cfg = default_job_config(run)
            eval_cmd = eval_args(cfg)
            before = evaluate(None, eval_cmd, Path(tmp) / "before.json")
            after = evaluate(run / "final", eval_cmd, Path(tmp) / "after.json")
            block = render(numbers(run, before, after, cfg), eval_cmd)
            text = README.read_text(encoding="utf-8")
            new = replace_block(text, block)
            if args.check:
                if new != text:
                    diff = difflib.unified_diff(text.splitlines(), new.splitlines(), "README.md",
                                                "README.md (from the run)", lineterm="", n=0)
                    print("\n".join(diff))
                    print("README.md's default-job numbers differ from the default run; regenerate them with "
                          "`python tools/readme_numbers.py --write`", file=sys.stderr)
                    return 1
                print("README.md's default-job numbers match the run", file=sys.stderr)
                return 0
            README.write_text(new, encoding="utf-8")
            _rl("plot", str(run), "--out", str(PLOT))
            print(f"wrote {README} and {PLOT}", file=sys.stderr)
            return 0
    except NumbersError as e:
        print(f"readme_numbers: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
