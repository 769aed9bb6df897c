"""tools/readme_numbers.py without the 300-step run (that one is tests/test_readme_main_command.py): which runs it
accepts, the cross-check of in-training eval against `looprl eval`, and that a changed number is a difference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rl.config import TrainConfig, save_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_numbers)

BEFORE = {"1": 0.285, "2": 0.49, "3": 0.49, "4": 0.47}
AFTER = {"1": 0.41, "2": 0.65, "3": 0.775, "4": 0.825}


def fake_run(root: Path, **overrides) -> Path:
    """A run directory as the default job leaves it (config.yaml, metrics.jsonl), with made-up metrics."""
    root.mkdir()
    cfg = TrainConfig(output_dir=str(root), progress=False, **overrides)
    save_config(cfg, root / "config.yaml")
    rows = [{"step": 0, **{f"eval/accuracy_d{d}": v for d, v in BEFORE.items()}}]
    for step in range(1, cfg.max_steps + 1):
        rows.append({"step": step, "accuracy": 0.5 if step <= 30 else 0.8, "mismatch/logp_abs_max": 4e-5,
                     "mismatch/kl": 2e-12, "exit/kl_t1": 0.2})
    rows[-1].update({f"eval/accuracy_d{d}": v for d, v in AFTER.items()})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_only_the_default_job_is_accepted(tmp_path):
    assert readme_numbers.default_job_config(fake_run(tmp_path / "default")) == readme_numbers.resolved(
        TrainConfig(output_dir=str(tmp_path / "default"), progress=False))
    with pytest.raises(readme_numbers.NumbersError, match="not the default job: config keys lr differ"):
        readme_numbers.default_job_config(fake_run(tmp_path / "other", lr=1e-3))


def test_eval_table_must_equal_the_runs_own_eval_and_a_changed_number_is_a_difference(tmp_path):
    run = fake_run(tmp_path / "default")
    cfg = readme_numbers.default_job_config(run)
    n = readme_numbers.numbers(run, BEFORE, AFTER, cfg)
    assert n["accuracy"] == pytest.approx((0.5, 0.8)) and n["exit_kl"] == pytest.approx((0.2, 0.2))
    block = readme_numbers.render(n, readme_numbers.eval_args(cfg))
    assert "| after RL (trained at depth 4) | 0.410 | 0.650 | 0.775 | 0.825 |" in block
    assert "accuracy 0.500 in the first tenth of the steps, 0.800 in the" in block
    assert "looprl eval --model runs/default/final --data arith --max_new_tokens 16 --limit 200" in block
    text = f"intro\n{readme_numbers.BEGIN} old -->\nold table\n{readme_numbers.END}\nrest\n"
    new = readme_numbers.replace_block(text, block)
    assert new.startswith("intro\n") and new.endswith("\nrest\n") and "old table" not in new
    assert readme_numbers.replace_block(new, block) == new  # --check passes on what --write wrote
    changed = readme_numbers.render({**n, "after": {**AFTER, "4": 0.83}}, readme_numbers.eval_args(cfg))
    assert readme_numbers.replace_block(new, changed) != new  # one number moved: --check fails
    with pytest.raises(readme_numbers.NumbersError, match="in-training eval and looprl eval disagree"):
        readme_numbers.numbers(run, BEFORE, {**AFTER, "4": 0.83}, cfg)
    with pytest.raises(readme_numbers.NumbersError, match="no .* block"):
        readme_numbers.replace_block("no markers\n", block)
