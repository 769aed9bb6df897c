"""What reward functions receive is what the user's data and config say (adversarial new-user pass).

TRL's completion shape (plain strings for string prompts), options a function does not declare or a bad
option value refused before training, an option named like a column refused, columns with their own values
and types, duplicated prompts with conflicting golds / a NaN gold refused, `looprl reward` passing the
file's columns and describing the policy used, and functions that cannot change what later ones see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rewards
from rl.config import ConfigError, load_config
from rl.data import DataError, load_prompts

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(fn, dataset, texts: list[str]) -> list:
    columns = {c: list(dataset[c]) for c in dataset.column_names if c != "prompt"}
    return rewards.score_completions(fn, list(dataset["prompt"]), texts, columns=columns,
                                     completion_ids=[[1]] * len(texts), truncated=[False] * len(texts),
                                     max_completion_length=8)


def reward_len(completions, **kw):  # TRL's documented example reward
    return [-abs(3 - len(c)) for c in completions]


def test_string_prompts_give_string_completions_and_chat_prompts_messages(tmp_path: Path) -> None:
    text = load_prompts(str(_write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+2=", "answer": 3}])))
    assert text[0]["prompt"] == "1+2="
    assert _score(reward_len, text, ["abc"]) == [0]  # a string of length 3, not one message
    chat = load_prompts(str(_write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "user", "content": "1+2="}], "answer": 3}])))
    assert _score(reward_len, chat, ["abc"]) == [-2]  # a list of one assistant message, as in TRL
    for ds in (text, chat):  # built-ins take both shapes
        assert _score(rewards.get("math_accuracy"), ds, ["Answer: 3"]) == [1.0]
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is chat messages.*one form"):
        load_prompts(str(_write_jsonl(tmp_path / "m.jsonl", [
            {"prompt": "1+2=", "answer": 3}, {"prompt": [{"role": "user", "content": "2+2="}], "answer": 4}])))


@pytest.mark.parametrize("args, message", [
    (["--reward_kwargs", "{dapo_math: {polcy: rounded}}"],
     r"^config key 'reward_kwargs': reward 'dapo_math' has no option 'polcy' \(did you mean 'policy'\?\); "
     r"its options: timeout, policy, .*fallback$"),
    (["--reward_kwargs", "{dapo_math: {policy: roundd}}"], r"reward_kwargs.*dapo_math: policy must be one of"),
    (["--rewards", "[dapo_math, format]", "--reward_kwargs", "{format: {style: boxd}}"],
     r"reward_kwargs.*format: style must be"),
    (["--accuracy_reward", "math_accuracy", "--reward_kwargs", "{math_accuracy: {polcy: rounded}}"],
     r"math_accuracy' has no option 'polcy'"),
])
def test_unknown_option_or_bad_value_refused_at_validation(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_reward_and_eval_refuse_unknown_option(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rl", "reward", "--fn", "dapo_math", "--completion", "Answer: 2",
                           "--answer", "2", "--option", "polcy=rounded"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no option 'polcy' (did you mean 'policy'?)" in proc.stderr.strip().splitlines()[-1]
    from rl.evaluate import _accuracy_fn
    with pytest.raises(ValueError, match="has no option 'polcy'"):
        _accuracy_fn("math_accuracy", {"polcy": "rounded"})


def test_option_named_like_a_column_is_refused() -> None:
    from rl.scoring import Scorer

    cfg = load_config(["--rewards", "[dapo_math]", "--reward_kwargs", "{dapo_math: {timeout: 5}}"])
    Scorer(cfg, columns=["ground_truth", "level"])  # no clash
    with pytest.raises(ConfigError, match=r"option 'timeout' of reward 'dapo_math' clashes with the dataset "
                                          r"column 'timeout'"):
        Scorer(cfg, columns=["ground_truth", "timeout"])


def test_columns_keep_their_own_values_and_types(tmp_path: Path) -> None:
    ds = load_prompts(str(_write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": f"{k}+1=", "answer": k + 1, "problem": f"mine {k}", "index": 100 + k, "data_source": "src"}
        for k in range(2)])))
    seen = {}

    def spy(completions, problem, index, data_source, **kw):
        seen.update(problem=problem, index=index, data_source=data_source)
        return [0.0] * len(completions)

    _score(spy, ds, ["a", "b"])
    assert seen == {"problem": ["mine 0", "mine 1"], "index": [100, 101], "data_source": ["src", "src"]}


def test_conflicting_golds_refused_and_same_id_different_prompt_kept(tmp_path: Path, capsys) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1=", "answer": "2"}, {"problem": "1+1=", "answer": "2"},
                                               {"problem": "1+1=", "answer": "3"}])
    with pytest.raises(DataError, match=r"d.jsonl: rows 0 and 2 have the same prompt but different gold answers "
                                        r"\('2' vs '3'\)"):
        load_prompts(str(path))
    ds = load_prompts(str(_write_jsonl(tmp_path / "i.jsonl", [
        {"prompt": "1+1=", "answer": 2, "extra_info": {"index": 7}},
        {"prompt": "5+5=", "answer": 10, "extra_info": {"index": 7}},
        {"prompt": "1+1=", "answer": 2, "extra_info": {"index": 7}}])))
    assert list(ds["prompt"]) == ["1+1=", "5+5="]
    assert "warning: 1 extra_info.index values are shared by rows with different prompts" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_nan_or_inf_gold_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text('{"problem": "1+1=", "answer": 2}\n{"problem": "2+2=", "answer": ' + value + '}\n')
    with pytest.raises(DataError, match=r"n.jsonl: row 1: field 'answer' is (nan|inf)"):
        load_prompts(str(path))


def test_reward_functions_get_their_own_lists() -> None:
    def mutate(prompts, completions, ground_truth, **kw):
        for i in range(len(completions)):
            ground_truth[i] = "999"
            completions[i][0]["content"] = "Answer: 7"
        return [0.0] * len(completions)

    guard = rewards.scoring.strict_guard()
    scores, _ = guard.score_all([("m", mutate), ("acc", rewards.get("math_accuracy"))],
                                [[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": "Answer: 2"}]],
                                ground_truth=["2"])
    assert scores["acc"] == [1.0]
    completions = ["Answer: 2"]
    guard.score_all([("m", lambda prompts, completions, **kw: completions.clear() or [0.0])], ["q"], completions)
    assert completions == ["Answer: 2"]


def test_looprl_reward_passes_columns_and_names_the_policy_used(tmp_path: Path) -> None:
    (tmp_path / "lvl.py").write_text("def lvl(prompts, completions, level, **kw):\n"
                                     "    return [float(x) for x in level]\n")
    _write_jsonl(tmp_path / "lab.jsonl", [{"completion": "12", "answer": "12", "level": 3},
                                          {"completion": "13", "answer": "12", "level": 5}])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}

    def reward(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "rl", "reward", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = reward("--fn", "lvl:lvl", "--jsonl", "lab.jsonl")
    assert "score: 3.0" in out and "score: 5.0" in out
    out = reward("--fn", "dapo_math", "--completion", "Answer: 0.0833", "--answer", "\\frac{1}{12}",
                 "--option", "policy=rounded")
    assert "score: 1.0" in out and "rounded (numeric_precision=6)" in out and "exact" not in out


def test_options_named_like_a_passed_keyword_or_a_column_are_refused_everywhere(tmp_path):
    """An option the call's own keyword (max_completion_length, truncated, ...) or a dataset column would
    override at every call: refused in training's registry check, `looprl eval` and `looprl reward` alike."""
    def ml(prompts, completions, max_completion_length=None, level=None, **kw):
        return [float(max_completion_length or 0)] * len(completions)

    with pytest.raises(ValueError, match="option 'max_completion_length' of reward 'ml' has the name of a keyword"):
        rewards.check_column_clash("ml", {"max_completion_length": 100}, ["ground_truth"])
    with pytest.raises(ConfigError, match="option 'max_completion_length' of reward 'overlong_penalty' has the"):
        from rl.scoring import Scorer

        Scorer(load_config(["--rewards", "dapo_math,overlong_penalty", "--overlong_buffer_len", "4",
                            "--reward_kwargs", '{"overlong_penalty": {"max_completion_length": 100}}']), columns=[])
    with pytest.raises(ValueError, match="option 'level' of reward 'ml' clashes with the dataset column 'level'"):
        rewards.check_column_clash("ml", {"level": 9}, ["level", "ground_truth"])
    rewards.check_column_clash("ml", {"level": 9}, ["ground_truth"])  # no such column: fine
    (tmp_path / "showmod.py").write_text("def show(prompts, completions, level=None, **kw):\n"
                                         "    return [float(x) for x in level]\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"completion": "4", "answer": "4", "level": 5}) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "rl", "reward", "--fn", "showmod:show", "--jsonl",
                          str(tmp_path / "rows.jsonl"), "--option", "level=2"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "clashes with the dataset column 'level'" in res.stderr
