"""A user's own data and reward functions are never silently mistrained (issue 21, data-and-reward part).

Class 1: reward functions that share a Python name keep their own identity (by position: rewards.reward_ids),
in metrics, reward_weights and reward_kwargs; an ambiguous reward_kwargs key is one line.
Class 2: every dataset column except the prompt reaches the reward functions; the gold answer column is one
documented rule (rewards/gold.py): a worked `solution` gives its \\boxed{} answer or is refused.
Rough edges: async rewards run, non-UTF-8 on the right line, a directory / an offline hub id as data,
"did you mean", policy_exit_weights with policy_exits: last, mask_truncated with everything truncated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rewards
from rl.config import ConfigError, TrainConfig, load_config
from rl.data import DataError, load_prompts

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max_steps", "1", "--prompts_per_step", "2", "--num_generations", "2", "--eval_every", "0",
        "--progress", "false", "--max_new_tokens", "4", "--dynamic_sampling", "false"]

WORKED = "We add: $2+3=5$, and so on.\nThe total is therefore \\boxed{5}."


def _train(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{cwd}", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rl", "train", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if needle in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------- class 1 + class 2, as a user runs it


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """Two modules that each define `reward` (one of them async), and a MATH-style file: a worked
    `solution` with \\boxed{} and an extra `weight` column."""
    (tmp_path / "mod_a.py").write_text(
        "def reward(prompts, completions, scale=1.0, **kw):\n"
        "    return [0.25 * scale for _ in completions]\n")
    (tmp_path / "mod_b.py").write_text(
        "import asyncio\n\n"
        "async def reward(prompts, completions, weight, ground_truth, solution, **kw):\n"
        "    await asyncio.sleep(0)\n"
        "    assert all(s.startswith('We add') for s in solution), solution  # the column as it is (TRL)\n"
        "    return [float(w) + (ground_truth[i] == '5') for i, w in enumerate(weight)]\n")
    _write_jsonl(tmp_path / "math.jsonl", [{"problem": f"What is 2+3 ({k})?", "solution": WORKED, "weight": 0.5}
                                           for k in range(3)])
    return tmp_path


@pytest.mark.slow  # a training subprocess (~20 s on a busy 2-core machine)
def test_same_named_rewards_keep_their_scores_weights_and_options(user_dir: Path):
    out = user_dir / "run"
    proc = _train(user_dir, *TINY, "--data", "math.jsonl", "--rewards", "[mod_a:reward, mod_b:reward]",
                  "--reward_weights", "[1.0, 2.0]", "--reward_kwargs", "{mod_a:reward: {scale: 4.0}}",
                  "--accuracy_reward", "mod_a:reward", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "gold answers from 'solution'" in proc.stdout  # said at load, not guessed silently
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["reward/mod_a:reward/mean"] == pytest.approx(1.0)  # 0.25 * scale 4: its own kwargs
    # extra column `weight` (0.5) reached the async function; gold 5 = the \boxed{} of the worked solution
    assert row["reward/mod_b:reward/mean"] == pytest.approx(1.5)
    assert row["reward/mean"] == pytest.approx(1.0 * 1.0 + 2.0 * 1.5)  # each weight on its own function
    assert row["accuracy"] == pytest.approx(1.0)  # accuracy_reward names mod_a's function, not mod_b's
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["ground_truth"] == "5" and {"reward/mod_a:reward", "reward/mod_b:reward"} <= set(sample)


@pytest.mark.slow  # a training subprocess (~20 s on a busy 2-core machine)
def test_ambiguous_reward_kwargs_key_and_worked_solution_are_one_line(user_dir: Path):
    out = user_dir / "run"
    proc = _train(user_dir, *TINY, "--data", "math.jsonl", "--rewards", "[mod_a:reward, mod_b:reward]",
                  "--reward_kwargs", "{reward: {scale: 4.0}}", "--output_dir", str(out))
    assert proc.returncode == 2
    line = _one_line(proc, "reward_kwargs")
    assert "'reward' names 2 reward functions (mod_a:reward, mod_b:reward)" in line
    assert not (out / "metrics.jsonl").exists()

    _write_jsonl(user_dir / "worked.jsonl", [{"problem": "1+1?", "answer": "2"},
                                            {"problem": "2+3?", "solution": "We add.\nSo it is five."}])
    proc = _train(user_dir, *TINY, "--data", "worked.jsonl", "--output_dir", str(out))
    assert proc.returncode == 2
    line = _one_line(proc, "worked.jsonl")
    assert "row 1: field 'solution' is a worked solution (2 lines) with no \\boxed{} or '#### ' answer" in line
    assert "config key 'data'" in line and not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------- class 1: names, unit level


def test_reward_ids_are_unique_and_readable():
    def brevity(prompts, completions, **kw):
        return [0.0] * len(completions)

    lam = lambda prompts, completions, **kw: [1.0] * len(completions)  # noqa: E731
    assert rewards.reward_ids(["dapo_math", "format"]) == ["dapo_math", "format"]  # unchanged when unique
    assert rewards.reward_ids(["a.x:reward", "b:reward", "c:other"]) == ["a.x:reward", "b:reward", "other"]
    assert rewards.reward_ids([lam, brevity, lambda p, c: c]) == ["lambda_1", "brevity", "lambda_3"]
    assert rewards.reward_ids(["format", "format"]) == ["format#1", "format#2"]
    specs = ["format", "format", "dapo_math"]
    with pytest.raises(ValueError, match=r"'format' names 2 reward functions \(format#1, format#2\)"):
        rewards.options_by_position(specs, {"format": {"style": "boxed"}})
    assert rewards.options_by_position(specs, {"format#2": {"style": "boxed"}}) == [{}, {"style": "boxed"}, {}]
    with pytest.raises(ValueError, match=r"'dapo_mth' is not one of the rewards .*did you mean 'dapo_math'"):
        rewards.options_by_position(specs, {"dapo_mth": {}})
    with pytest.raises(ValueError, match="both name reward"):
        rewards.options_by_position(["m:brevity"], {"brevity": {}, "m:brevity": {}})


@pytest.mark.slow  # a training subprocess (~20 s on a busy 2-core machine)
def test_lambda_rewards_are_logged_by_position_not_as_lambda(tmp_path: Path):
    from rl.train import Trainer

    out = tmp_path / "run"
    cfg = TrainConfig(max_steps=1, prompts_per_step=2, num_generations=2, eval_every=0, progress=False,
                      max_new_tokens=4, dynamic_sampling=False, output_dir=str(out),
                      rewards=[lambda prompts, completions, **kw: [1.0] * len(completions),
                               lambda prompts, completions, **kw: [-0.5] * len(completions)])
    assert Trainer(cfg).train() == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["reward/lambda_1/mean"] == 1.0 and row["reward/lambda_2/mean"] == -0.5
    assert row["reward/mean"] == pytest.approx(0.5) and not any("<lambda>" in k for k in row)


# --------------------------------------------------------------------- class 2: the gold-answer rule


def test_gold_answer_rule_for_the_loader_and_the_builtin_rewards(tmp_path: Path):
    rows = [{"problem": "a", "solution": WORKED, "answer": "7"},  # answer wins over a solution
            {"problem": "b", "solution": WORKED},  # the boxed answer of a worked solution
            {"problem": "c", "solution": "\\frac{1}{2}"},  # a bare answer (TRL's convention)
            {"problem": "d", "ground_truth": 3, "level": "hard"},
            {"question": "e", "answer": "Half of 144 is 72.\n#### 72"}]  # GSM8K's answer column
    ds = load_prompts(str(_write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert ds["ground_truth"] == ["7", "5", "\\frac{1}{2}", "3", "72"]
    # every other column passes through unchanged (None where a row lacks it): reward functions get them
    assert ds["solution"] == [WORKED, WORKED, "\\frac{1}{2}", None, None]
    assert ds["level"] == [None, None, None, "hard", None]

    fn = rewards.get("math_accuracy")  # as TRL calls it, with the raw columns
    completions = ["The answer is \\boxed{5}", "Answer: 7"]
    assert fn(prompts=None, completions=completions, solution=[WORKED, WORKED]) == [1.0, 0.0]
    assert fn(prompts=None, completions=completions, solution=[WORKED] * 2, answer=["7", "7"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="sample 1: field 'solution' is a worked solution"):
        fn(prompts=None, completions=completions, solution=[WORKED, "We add. Then we stop."])
    with pytest.raises(ValueError, match=r"sample 0: field 'answer' is a worked solution \(2 lines\)"):
        fn(prompts=None, completions=completions, answer=["We add.\nIt is 5.", "7"])


def test_reserved_and_mixed_columns(tmp_path: Path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"problem": "a", "answer": "1", "truncated": True}])
    with pytest.raises(DataError, match="column 'truncated' has the name of a keyword the trainer passes"):
        load_prompts(str(path))
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "a", "answer": "1", "meta": [1]},
                                               {"problem": "b", "answer": "2", "meta": {"x": 1}}])
    with pytest.raises(DataError, match="column 'meta' holds values of several types"):
        load_prompts(str(path))


# --------------------------------------------------------------------- rough edges


def test_async_reward_functions_run():
    async def scored(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    assert rewards.call(scored, [None, None], ["ab", "c"]) == [2.0, 1.0]


def test_non_utf8_byte_is_reported_on_its_own_line(tmp_path: Path):
    good = json.dumps({"problem": "x" * 200, "answer": "1"}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([good] * 700 + [b'{"problem": "caf\xe9", "answer": "1"}'] + [good] * 50) + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl: line 701: not UTF-8 text \(byte 17 of the line"):
        load_prompts(str(path))
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b"[\n" + b",\n".join([good] * 3 + [b'{"problem": "caf\xe9", "answer": "1"}']) + b"\n]")
    with pytest.raises(DataError, match=r"latin1\.json: line 5: not UTF-8 text"):
        load_prompts(str(whole))


def test_directory_and_offline_hub_id_say_what_they_are(tmp_path: Path, monkeypatch):
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"is a directory; give one file: .parquet, .jsonl or .json "
                                        r"\(it holds train.parquet\)"):
        load_prompts(str(tmp_path))
    import rl.data

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(rl.data, "_no_hub_connection", lambda: "no connection to huggingface.co: unreachable")
    with pytest.raises(DataError, match=r"'someone/mathset' from the Hugging Face hub.*unreachable.*"
                                        r"HF_HUB_OFFLINE=1.*--data /path/to/mathset.parquet"):
        load_prompts("someone/mathset")


@pytest.mark.slow  # a training subprocess (~20 s on a busy 2-core machine)
def test_offline_hub_id_is_one_line_in_train(tmp_path: Path):
    proc = _train(tmp_path, *TINY, "--data", "someone/mathset", "--output_dir", str(tmp_path / "run"),
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2
    line = _one_line(proc, "someone/mathset")
    assert "offline mode is on" in line and "not found" not in line and "--data /path/to/" in line


def test_did_you_mean_for_trl_aliases_and_reward_names():
    with pytest.raises(ConfigError, match=r"did you mean 'learning_rate', TRL name of 'lr'"):
        load_config(["--learning_rat", "1e-5"])
    with pytest.raises(rewards.UnknownRewardError, match=r"did you mean 'dapo_math'"):
        rewards.get("dapo_mth")
    with pytest.raises(ConfigError, match=r"reward_kwargs.*'dapo_mth' is not one of the rewards.*did you mean"):
        load_config(["--reward_kwargs", "{dapo_mth: {policy: rounded}}"])
    with pytest.raises(ConfigError, match=r"'overlong_penalty' is not one of the rewards"):  # was ignored
        load_config(["--reward_kwargs", "{overlong_penalty: {penalty_factor: 2}}"])


def test_exit_weights_without_exits_are_refused():
    with pytest.raises(ConfigError, match=r"policy_exit_weights: 'gate' has no effect with policy_exits: last"):
        load_config(["--policy_exit_weights", "gate"])
    with pytest.raises(ConfigError, match=r"policy_exit_alpha: 2.0 is used only by policy_exit_weights: progressive"):
        load_config(["--policy_exits", "all", "--policy_exit_alpha", "2"])
    assert load_config(["--policy_exits", "all", "--policy_exit_weights", "progressive",
                        "--policy_exit_alpha", "2"]).policy_exit_alpha == 2.0


@pytest.mark.slow  # a training subprocess (~20 s on a busy 2-core machine)
def test_mask_truncated_with_everything_truncated_warns_once(tmp_path: Path):
    out = tmp_path / "run"
    proc = _train(tmp_path, *TINY, "--max_steps", "2", "--max_new_tokens", "1", "--mask_truncated", "true",
                  "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    line = _one_line(proc, "mask_truncated is on")
    assert "WARNING step 1" in line and "policy loss is 0" in line
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["completion/masked_frac"] for r in rows] == [1.0, 1.0]
