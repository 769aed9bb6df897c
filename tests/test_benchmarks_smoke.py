"""Every benchmark in benchmarks/ runs end to end at a toy size, so a refactor cannot break one unseen.

They load by file path (benchmarks/ is not a package, and benchmarks/rollout.py would shadow the `rollout`
package on sys.path) and run in-process with tiny arguments; the numbers are not checked, only that each
produces its report.
"""

import importlib.util
import json
import os
import re
import subprocess
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


def test_speculative_benchmark():
    """Plain and speculative rows for both workloads, with an accept rate in [0, 1]."""
    text = load("speculative").main(["--models", "tiny", "--batches", "2", "--specs", "1:2", "--repeats", "1",
                                     "--max_new", "6"])
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| tiny")]
    assert [(r[1].strip(), r[3].strip()) for r in rows] == [
        ("decode", "plain"), ("decode", "d1k2"), ("rl", "plain"), ("rl", "d1k2")]
    for r in rows:
        assert int(r[4]) > 0 and float(r[5]) > 0  # tokens produced, tokens/s
    assert 0.0 <= float(rows[1][7]) <= 1.0  # accept rate of the speculative row


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
def test_trainer_vs_trl_benchmark_with_async_rollouts(tmp_path):
    """--max-staleness 1: the reward function reaches the rollout process through the re-imported script
    (run as a script, as the docs' command does)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "trainer_vs_trl.py"), "--steps", "3", "--repeats", "1",
                           "--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--hidden", "64", "--layers",
                           "1", "--max-staleness", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "looprl (async k=1)" in proc.stdout and "TRL 1.x GRPOTrainer" in proc.stdout
    assert "asynchronous rollouts: max_staleness 1" in proc.stderr


@pytest.mark.slow
def test_self_distill_experiment_benchmark(tmp_path, capsys):
    out = tmp_path / "exp"
    code = load("self_distill_experiment").main([
        "--seeds", "0", "--steps", "1", "--arms", "rl_sd", "--limit", "2", "--thresholds", "0.9",
        "--out", str(out), "--train_args", "--prompts_per_step 2 --num_generations 2 --max_new_tokens 4 "
        "--eval_every 0 --progress false"])
    assert code == 0
    assert (out / "table.md").is_file() and (out / "report.json").is_file()


def test_verify_benchmark_smallest_size() -> None:
    """It must also keep agreeing between the inline and the pooled verifier (a subprocess: it starts a pool)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "verify.py"), "--n", "16", "--batch", "8", "--workers", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "short (integer)" in out and "mixed (MATH-like)" in out
    disagreements = re.findall(r"inline vs pool disagree on (\d+)", out)
    assert disagreements == ["0", "0"]
    fast = re.search(r"pool run: (\d+) fast-path, (\d+) symbolic", out)
    assert fast and int(fast.group(2)) == 0  # the integer set never reaches the symbolic pool


def test_verify_benchmark_against_another_checkout() -> None:
    """`--against DIR` (here: this checkout against itself) prints CPU s per 1,000 answers for both sides
    and no changed verdict; a DIR without a verifier is a one-line error."""
    root = BENCHMARKS.parent
    out = subprocess.run([sys.executable, str(BENCHMARKS / "verify.py"), "--against", str(root), "--n", "8",
                          "--sets", "short", "--workers", "1"], capture_output=True, text=True, timeout=300, check=True)
    row = re.search(r"short\s+inline sympy\s+([\d.]+)\s+([\d.]+)\s+\S+\s+([\d.]+)\s+([\d.]+)\s+(\d+)", out.stdout)
    assert row and row.group(3) == row.group(4) and row.group(5) == "0", out.stdout
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "verify.py"), "--against", str(BENCHMARKS)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no rewards/math.py there" in bad.stderr
    assert len(load("verify").labelled_pairs()) > 400  # every labelled pair of the repo, for --changed-verdicts


@pytest.mark.slow
def test_exit_policy_experiment_benchmark(tmp_path, capsys):
    out, other = tmp_path / "exp", tmp_path / "other"
    train_args = "--prompts_per_step 2 --num_generations 2 --max_new_tokens 4 --eval_every 0 --progress false"
    bench = load("exit_policy_experiment")
    # a second process's runs (here: run first), merged into the first table with --merge
    assert bench.main(["--seeds", "0", "--steps", "1", "--arms", "dapo_sd_c0.3_w100", "--limit", "2",
                       "--thresholds", "0.9", "--out", str(other), "--train_args", train_args]) == 0
    code = bench.main([
        "--seeds", "0", "--steps", "1", "--arms", "dapo,dapo_exits_gatefit", "--limit", "2", "--thresholds", "0.9",
        "--gate_thresholds", "0.5", "--out", str(out), "--figure", str(tmp_path / "fig.png"),
        "--merge", str(other), "--train_args", train_args])
    assert code == 0
    assert (tmp_path / "fig.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "dapo_exits_gatefit" in table and "median time/step" in table and "| dapo_sd_c0.3_w100 | 1 |" in table
    assert "gate q=0.5: acc / depth" in table  # the gate-rule early-exit table
    assert re.search(r"\| dapo_exits_gatefit \| 0 \| [+-]\d+\.\d \|", table)  # paired with dapo, seed 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"dapo/0", "dapo_exits_gatefit/0"}
    assert 50 < report["facts"]["dapo/0"]["peak_rss_mib"] < 8192  # the training process's own peak, MiB


def test_long_completions_benchmark(tmp_path, capsys):
    out = tmp_path / "long.json"
    code = load("long_completions").main(["--size", "tiny", "--lengths", "8", "--arms", "plain,both",
                                          "--budget", "64", "--rows", "4", "--rollout-contexts", "16",
                                          "--rollout-new-tokens", "4", "--design-tokens", "16", "--out", str(out)])
    assert code == 0
    update = json.loads(out.read_text())["update"]
    assert [r["arm"] for r in update] == ["plain", "both"]  # each in its own subprocess
    assert update[1]["micro_batches"] > update[0]["micro_batches"] == 1  # the budget cut the step
    assert update[1]["loss"] == pytest.approx(update[0]["loss"], rel=1e-5, abs=1e-7)
    designs = json.loads(out.read_text())["designs"]  # checkpoint per layer / per loop / none: same gradient
    assert len({round(r["grad_norm"], 6) for r in designs}) == 1 and len(designs) == 6
    assert "decode tok/s" in capsys.readouterr().out


def test_lora_mismatch_benchmark(capsys):
    pytest.importorskip("peft")
    bench = load("lora_mismatch")
    assert bench.main(["--dtypes", "float32", "--n", "2", "--new", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32 |")]
    assert len(rows) == 4  # one row per depth of the embedded model
    assert bench.main(["--dtypes", "float32", "--n", "2", "--new", "3", "--depths", "4"]) == 0
    alone = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32 |")]
    cells = lambda row: row.split("|")[1:5]  # noqa: E731  dtype, depth, max, mean (not the seconds)
    assert [cells(r) for r in alone] == [cells(rows[3])]  # one depth alone measures the same cell


def test_adaptive_depth_benchmark(capsys):
    assert load("adaptive_depth").main(["--models", "tiny", "--batches", "2", "--repeats", "1",
                                        "--max_new_tokens", "4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and "confidence 0.6" in rows[0]


@pytest.mark.slow
def test_exit_policy_experiment_adaptive_arms(tmp_path, capsys):
    """Issue 22's arms: the adaptive table with the rule's eval, rollout time and the runs' metric means."""
    train_args = "--prompts_per_step 2 --num_generations 2 --max_new_tokens 4 --eval_every 0 --progress false"
    out = tmp_path / "exp"
    assert load("exit_policy_experiment").main([
        "--seeds", "0", "--steps", "1", "--arms", "fixed_T,adaptive", "--limit", "2", "--thresholds", "0.9",
        "--tau", "0.8", "--reference", "fixed_T", "--out", str(out), "--train_args", train_args]) == 0
    table = (out / "table.md").read_text()
    assert "acc rule τ=0.8" in table and "train rollout mean depth" in table
    facts = json.loads((out / "report.json").read_text())["facts"]
    assert facts["fixed_T/0"]["rollout_depth_mean"] == 4.0 and facts["adaptive/0"]["rollout_depth_mean"] < 4.0
    assert facts["adaptive/0"]["mismatch_max_mean"] < 1e-3


def test_async_rollouts_benchmark(tmp_path, capsys):
    """Sync and max_staleness 1 side by side: a summary row each, the baseline's speedup 1, the curves' PNG."""
    out = tmp_path / "bench"
    code = load("async_rollouts").main(["--steps", "2", "--seeds", "0", "--staleness", "0,1", "--out", str(out),
                                        "--eval_limit", "4", "--train_args", "--prompts_per_step 2 "
                                        "--num_generations 2 --max_new_tokens 4 --eval_every 0 --progress false"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["by_staleness"]) == ["0", "1"]
    assert summary["by_staleness"]["0"]["speedup_step"] == 1.0
    assert summary["runs"]["k1_s0"]["steps"] == 2 and summary["runs"]["k1_s0"]["s_per_step"] > 0
    assert (out / "reward_vs_wallclock.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 | 1 |" in capsys.readouterr().out
    for run in ("k0_s0", "k1_s0"):  # --eval_limit: each final model's held-out accuracy, paired with the baseline
        assert 0.0 <= summary["runs"][run]["test_accuracy"] <= 1.0
        assert json.loads((out / run / "eval.json").read_text())["num_prompts"] == 4
    assert "minus max_staleness 0" in summary["eval_table"]


def test_exit_policy_experiment_paired_interval():
    """Issue 27's confirmation rule: paired differences with a Student-t 95 % interval (table values for n = 2,
    5, 10 seeds) and the interval of a hand-made set of differences."""
    exp = load("exit_policy_experiment")
    for df, t in ((1, 12.706), (4, 2.776), (9, 2.262)):
        assert abs(exp.t_quantile(0.975, df) - t) < 1e-3
    # diffs 1, 2, 3, -1, 0.5: mean 1.1, sd 1.517, half-width 2.776 * 1.517 / sqrt(5) = 1.884
    assert exp.paired_cell([1, 2, 3, -1, 0.5]) == "+1.1 ± 1.5 [-0.8, +3.0]"
    runs = {"a": {"0": {"fixed": {4: 0.5}, "early_exit": {}}, "1": {"fixed": {4: 0.6}, "early_exit": {}}},
            "b": {"0": {"fixed": {4: 0.52}, "early_exit": {}}, "1": {"fixed": {4: 0.64}, "early_exit": {}}}}
    row = [line for line in exp.paired_table(runs, "a", 4, []).splitlines() if line.startswith("| b |")][0]
    assert row.startswith("| b | 0,1 | +3.0 ± 1.4 [-9.7, +15.7]")  # diffs +2, +4 points



@pytest.mark.vllm
def test_lora_vllm_sync_benchmark(capsys):
    pytest.importorskip("vllm", reason="the vLLM lane (tools/vllm_cpu_env.sh) with peft on PYTHONPATH")
    pytest.importorskip("peft")
    assert load("lora_vllm_sync").main(["--repeats", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index('{\n "adapter"'):])  # vLLM may log to stdout before it
    assert report["greedy_equal_torch_worker"] and report["sampled_logp_abs_max"] < 1e-4  # the merged policy
    assert len(report["sync_s"]) == len(report["sync_plain_s"]) == 1


def test_shared_prompt_benchmark(capsys):
    """A row per model and case, the two forms agreeing on the trained tokens' logprobs."""
    assert load("shared_prompt").main(["--cases", "3:4", "--prompts", "2", "--group", "2", "--repeats", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "model" not in line]
    assert [r[0].split()[0] for r in rows] == ["tiny-ouro", "qwen2"]
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[6]) < 1e-4
