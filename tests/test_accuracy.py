"""One definition of correct (rl/accuracy.py) for training's `accuracy`, the in-training eval and `looprl eval`:
the same function with the same verifier options, scores checked to be 1 / 0 / None, None = unscored (left out
of the denominator and counted), and the +1/-1 dapo_math refused as an accuracy function in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rl.accuracy import AccuracyError, accuracy_kwargs, verdicts
from rl.config import ConfigError, TrainConfig, load_config


def test_accuracy_options_come_from_its_own_kwargs_else_the_rewards_verifier_options():
    rounded = {"dapo_math": {"policy": "rounded", "timeout": 3}}
    # not among the rewards: inherits the verifier options (not the others) of the rewards
    assert accuracy_kwargs(["dapo_math"], rounded, "math_accuracy") == {"policy": "rounded"}
    # its own entry wins, allowed although math_accuracy is not in rewards
    own = {**rounded, "math_accuracy": {"policy": "exact", "fallback": "none"}}
    assert accuracy_kwargs(["dapo_math"], own, "math_accuracy") == {"policy": "exact", "fallback": "none"}
    cfg = load_config(["--reward_kwargs", json.dumps(own)])
    assert cfg.reward_kwargs["math_accuracy"] == {"policy": "exact", "fallback": "none"}
    # one of the rewards: exactly the options it trains with
    assert accuracy_kwargs(["dapo_math", "math_accuracy"], rounded, "math_accuracy") == {}
    # a function without verifier options inherits nothing; neither does anything without any set
    assert accuracy_kwargs(["dapo_math"], rounded, "format") == {}
    assert accuracy_kwargs(["dapo_math"], {}, "math_accuracy") == {}


def test_reward_functions_with_different_verifier_options_need_a_choice():
    kwargs = {"dapo_math": {"policy": "rounded"}, "rewards.builtin:dapo_math": {"policy": "exact"}}
    argv = ["--rewards", "dapo_math,rewards.builtin:dapo_math", "--reward_kwargs", json.dumps(kwargs)]
    with pytest.raises(ConfigError, match=r"config key 'accuracy_reward': reward functions .* verify with "
                                          r"different options.*reward_kwargs: \{math_accuracy"):
        load_config(argv)
    chosen = {**kwargs, "math_accuracy": {"policy": "rounded"}}
    assert load_config(argv[:3] + [json.dumps(chosen)]).reward_kwargs["math_accuracy"] == {"policy": "rounded"}
    with pytest.raises(ConfigError, match="'nope' is not one of the rewards"):
        load_config(["--reward_kwargs", '{"nope": {}}'])


def test_verdicts_accept_1_0_none_only():
    assert verdicts([1.0, 0.0, None, True, 0], "f") == [True, False, None, True, False]
    with pytest.raises(AccuracyError, match=r"'f' returned -1.0 for sample 1"):
        verdicts([1.0, -1.0], "f")


def test_train_refuses_dapo_math_as_accuracy_in_one_line(tmp_path):
    """As a user hits it: exit 2, one line naming the key and the 1/0 function to use, nothing written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rl", "train", "--accuracy_reward", "dapo_math",
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("looprl train: config key 'accuracy_reward': dapo_math scores +1 / -1")
    assert "use math_accuracy" in lines[0]
    assert not out.exists()


def _scorer(**overrides):
    from rl.scoring import Scorer

    cfg = TrainConfig(**overrides)
    from rl.config import validate

    validate(cfg)
    return Scorer(cfg, columns=["ground_truth"])


def _score(scorer, texts, gold):
    from rollout import Rollout

    ids = [[ord(c) for c in t] for t in texts]
    rollout = Rollout(prompt_ids=[[1]] * len(texts), completion_ids=ids, logprobs=[[0.0] * len(i) for i in ids],
                      finish_reasons=["stop"] * len(texts))
    row = {"prompt": "q", "ground_truth": gold}
    return scorer.score([0], [row], rollout, texts)


def test_training_accuracy_verifies_with_the_rewards_options():
    """The issue's case: with policy rounded the reward said right and the logged accuracy said wrong."""
    texts = ["Answer: 0.3333", "Answer: 0.5"]
    samples = _score(_scorer(reward_kwargs={"dapo_math": {"policy": "rounded"}}), texts, "\\frac{1}{3}")
    assert [s.reward for s in samples] == [1.0, -1.0]
    assert [s.correct for s in samples] == [1.0, 0.0]
    exact = _score(_scorer(), texts, "\\frac{1}{3}")
    assert [s.reward for s in exact] == [-1.0, -1.0] and [s.correct for s in exact] == [0.0, 0.0]


def test_training_accuracy_none_is_unscored_and_other_values_are_refused():
    from rl.metrics import reward_metrics

    def maybe(prompts, completions, **kw):
        return [None if "?" in c else 1.0 for c in completions]

    samples = _score(_scorer(accuracy_reward=maybe), ["Answer: 1", "Answer: ?", "Answer: 2", "?"], "1")
    assert [s.correct for s in samples] == [1.0, None, 1.0, None]
    m = reward_metrics(samples, ["dapo_math"])
    assert m["accuracy"] == 1.0 and m["accuracy/unscored_frac"] == 0.5

    def halves(prompts, completions, **kw):
        return [0.5] * len(completions)

    with pytest.raises(ConfigError, match=r"config key 'accuracy_reward': 'halves' returned 0.5 for sample 0"):
        _score(_scorer(accuracy_reward=halves), ["Answer: 1"], "1")


def test_in_training_eval_logs_accuracy_and_unscored_per_depth(tmp_path):
    """eval/unscored_frac_d{t} beside eval/accuracy_d{t}, and accuracy/unscored_frac every step."""
    from rl.train import main

    out = tmp_path / "run"
    assert main(["--max_steps", "1", "--prompts_per_step", "2", "--eval_every", "1", "--eval_limit", "4",
                 "--eval_depths", "1,4", "--progress", "false", "--output_dir", str(out),
                 "--reward_kwargs", '{"math_accuracy": {"policy": "rounded"}}']) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # step 0 (before RL) and step 1
        assert {"eval/accuracy_d1", "eval/accuracy_d4", "eval/unscored_frac_d1", "eval/unscored_frac_d4"} <= set(row)
        assert row["eval/unscored_frac_d4"] == 0.0
    assert rows[-1]["accuracy/unscored_frac"] == 0.0
