"""Every benchmark in benchmarks/ runs end to end at a toy size, so a refactor cannot break one unseen.

They load by file path (benchmarks/ is not a package, and benchmarks/rollout.py would shadow the `rollout`
package on sys.path) and run in-process with tiny arguments; the numbers are not checked, only that each
produces its report. (benchmarks/verify.py has its own smoke test.)
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_model_forward_benchmark(capsys):
    assert load("model_forward").main(["--configs", "tiny", "--max-depth", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ms/fwd" in out and out.count("tiny ") == 2  # one row per depth


def test_rollout_benchmark(capsys):
    code = load("rollout").main(["--sizes", "tiny", "--workloads", "decode", "--repeats", "1",
                                 "--max-new-tokens", "4", "--batch", "2"])
    assert code == 0
    assert "tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_trainer_vs_trl_benchmark(capsys, monkeypatch):
    from rewards import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # its reward stays out of the others'
    code = load("trainer_vs_trl").main(["--steps", "2", "--repeats", "1", "--prompts", "2", "--group", "2",
                                        "--max-new-tokens", "4", "--hidden", "64", "--layers", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "looprl (torch engine)" in out and "TRL 1.x GRPOTrainer" in out


@pytest.mark.slow
def test_self_distill_experiment_benchmark(tmp_path, capsys):
    out = tmp_path / "exp"
    code = load("self_distill_experiment").main([
        "--seeds", "0", "--steps", "1", "--arms", "rl_sd", "--limit", "2", "--thresholds", "0.9",
        "--out", str(out), "--train_args", "--prompts_per_step 2 --num_generations 2 --max_new_tokens 4 "
        "--eval_every 0 --progress false"])
    assert code == 0
    assert (out / "table.md").is_file() and (out / "report.json").is_file()


@pytest.mark.slow
def test_exit_policy_experiment_benchmark(tmp_path, capsys):
    out = tmp_path / "exp"
    code = load("exit_policy_experiment").main([
        "--seeds", "0", "--steps", "1", "--arms", "dapo,dapo_exits_gatefit", "--limit", "2", "--thresholds", "0.9",
        "--out", str(out), "--figure", str(tmp_path / "fig.png"), "--train_args",
        "--prompts_per_step 2 --num_generations 2 --max_new_tokens 4 --eval_every 0 --progress false"])
    assert code == 0
    assert (tmp_path / "fig.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "dapo_exits_gatefit" in table and "median time/step" in table
    assert set(json.loads((out / "report.json").read_text())["runs"]) == {"dapo/0", "dapo_exits_gatefit/0"}
