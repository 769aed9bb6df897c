"""`looprl eval`: pass@k / maj@k estimators, per-depth summaries, the eval loop and its JSON report."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from rl.evaluate import (
    evaluate_depths,
    flat_metrics,
    maj_at_k,
    parse_depths,
    pass_at_k,
    summarize_depth,
)

# ----------------------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) containing a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_known_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 0, 3) == 0.0
    for n in range(1, 8):
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable_and_matches_closed_form():
    n, c, k = 1000, 37, 100
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-10)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(3, 1, 0)


# ----------------------------------------------------------------------------- maj@k


def test_maj_at_k_majority_and_ties():
    # 3 votes for the right answer vs 2 for a wrong one.
    assert maj_at_k(["4", "4", "5", "4", "5"], [True, True, False, True, False]) == 1.0
    assert maj_at_k(["5", "5", "4", "5", "4"], [False, False, True, False, True]) == 0.0
    # 2-2 tie: half credit (expected value of a random tie-break).
    assert maj_at_k(["4", "4", "5", "5"], [True, True, False, False]) == 0.5
    # No extractable answers cast no vote; all-None is wrong.
    assert maj_at_k([None, None, "4"], [False, False, True]) == 1.0
    assert maj_at_k([None, None], [False, False]) == 0.0
    # Whitespace does not split the vote.
    assert maj_at_k(["x + 1", "x+1", "2"], [True, True, False]) == 1.0
    with pytest.raises(ValueError, match="2 answers but 3"):
        maj_at_k(["1", "2"], [True, False, False])


def test_maj_at_k_groups_votes_by_verifier_equivalence():
    """The issue's cases: answers the math verifier judges equal are one vote, however they are written."""
    # gold 1/2: three spellings of 1/2 outvote two 3s (grouping by text: 1+1+1 vs 2 -> 0)
    assert maj_at_k(["1/2", "0.5", "\\frac{1}{2}", "3", "3"], [True, True, True, False, False]) == 1.0
    # gold 2: three spellings of 1/4 outvote two right 2s (grouping by text: 2 wins -> 1)
    assert maj_at_k(["1/4", "0.25", "\\frac14", "2", "2"], [False, False, False, True, True]) == 0.0
    # 12, 12, 12.0 are one class of 3 against 13, 13: not a 2-2 tie
    assert maj_at_k(["12", "12", "12.0", "13", "13"], [True, True, True, False, False]) == 1.0
    assert maj_at_k(["12", "12", "12.0", "13", "13"], [False, False, False, True, True]) == 0.0
    # `\boxed{}` / `$...$` / units are the verifier's business too
    assert maj_at_k(["$\\dfrac{1}{2}$", "0.5", "7", None, None], [True] * 2 + [False] * 3) == 1.0
    assert maj_at_k(["90^\\circ", "90", "45", None], [True, True, False, False]) == 1.0


def test_maj_at_k_tie_rule_and_verifier_options():
    """Tie rule (documented in rl/evaluate._vote): a tie between classes scores the fraction of tied classes
    that are correct. The verifier's options decide what is equal: 0.333 is 1/3 only under policy rounded."""
    from rewards.policy import resolve

    assert maj_at_k(["1/2", "0.5", "3", "3.0"], [True, True, False, False]) == 0.5  # 2-2 after grouping
    assert maj_at_k(["1", "2", "3"], [True, False, False]) == pytest.approx(1 / 3)  # three-way tie
    assert maj_at_k(["1", "2", "3", "3"], [True, True, False, False]) == 0.0  # no tie: 3 wins
    answers = ["0.333", "\\frac{1}{3}", "2"]
    assert maj_at_k(answers, [False, True, False]) == pytest.approx(1 / 3)  # exact: three classes of one
    assert maj_at_k(answers, [True, True, False], policy=resolve("rounded")) == 1.0  # rounded: 2 vs 1
    # an unscored sample is left out; a class is correct when any scored member is
    m = summarize_depth([1.0, None, 0.0, 0.0], [1] * 4, [False] * 4, ["0.5", "1/2", "3", "3"], n=4)
    assert m["maj@k"] == 0.0 and m["accuracy"] == pytest.approx(1 / 3) and m["unscored_frac"] == 0.25


def test_maj_at_k_subset_average_matches_enumeration():
    answers = ["4", "5", "4", "6", "5", "4"]
    correct = [a == "4" for a in answers]
    for k in range(1, len(answers) + 1):
        wins = []
        for s in itertools.combinations(range(len(answers)), k):
            votes = [answers[i] for i in s]
            counts = {a: votes.count(a) for a in set(votes)}
            top = max(counts.values())
            winners = [a for a in counts if counts[a] == top]
            wins.append(("4" in winners) / len(winners))
        assert maj_at_k(answers, correct, k) == pytest.approx(sum(wins) / len(wins)), k
    # k=1 majority vote is just accuracy.
    assert maj_at_k(answers, correct, 1) == pytest.approx(sum(correct) / len(correct))


# ----------------------------------------------------------------------------- summaries


def test_summarize_depth_per_prompt_groups():
    # 2 prompts x n=3: prompt 0 has 1/3 correct, prompt 1 has 0/2 scored (one unscored: left out, counted).
    rewards = [1.0, 0.0, 0.0, 0.0, None, 0.0]
    m = summarize_depth(rewards, lengths=[4, 6, 8, 10, 12, 14], truncated=[False] * 5 + [True],
                        answers=["4", "5", "5", "1", None, "2"], n=3)
    assert m["accuracy"] == pytest.approx(1 / 5)  # None = unscored: not in the denominator
    assert m["pass@k"] == pytest.approx(0.5) and m["k"] == 3
    assert m["maj@k"] == 0.0  # prompt 0 votes "5" (wrong), prompt 1 has no right answer
    assert m["len_mean"] == pytest.approx(9.0) and m["len_max"] == 14
    assert m["truncated_frac"] == pytest.approx(1 / 6)
    assert m["unscored_frac"] == pytest.approx(1 / 6)
    assert m["num_prompts"] == 2
    single = summarize_depth([1.0, 0.0], [3, 3], [False, False], [None, None], n=1)
    assert "pass@k" not in single and single["accuracy"] == 0.5
    with pytest.raises(ValueError, match="multiple of n=3"):
        summarize_depth([1.0, 0.0], [1, 1], [False, False], [None, None], n=3)


def test_summarize_depth_none_and_non_binary_scores():
    """One rule for None everywhere (rl/accuracy.py): unscored samples leave the denominators and are counted;
    nothing scored gives accuracy None, not 0. A score that is not 1/0/None is refused naming the function."""
    from rl.accuracy import AccuracyError

    m = summarize_depth([None, None, 1.0, None], [1] * 4, [False] * 4, ["3", "3", "4", None], n=2)
    assert m["accuracy"] == 1.0 and m["unscored_frac"] == 0.75
    assert m["pass@k"] == 1.0 and m["maj@k"] == 1.0  # prompt 0 has no scored sample: left out
    none = summarize_depth([None, None], [1, 1], [False, False], ["3", "3"], n=2)
    assert none["accuracy"] is None and none["pass@k"] is None and none["unscored_frac"] == 1.0
    with pytest.raises(AccuracyError, match=r"'dapo_math' returned -1.0 for sample 1; .* 1 \(correct\), 0"):
        summarize_depth([1.0, -1.0], [1, 1], [False, False], [None, None], n=1, accuracy_name="dapo_math")
    with pytest.raises(AccuracyError, match="returned 0.5"):
        summarize_depth([0.5], [1], [False], [None], n=1)


def test_flat_metrics_names_match_the_trainer_keys():
    flat = flat_metrics({"1": {"accuracy": 0.25, "len_mean": 3.0}, "4": {"accuracy": 0.5}})
    assert flat == {"eval/accuracy_d1": 0.25, "eval/len_mean_d1": 3.0, "eval/accuracy_d4": 0.5}


def test_parse_depths():
    assert parse_depths("1,2, 4") == [1, 2, 4]
    with pytest.raises(ValueError, match="--depths"):
        parse_depths("1,x")
    with pytest.raises(ValueError, match="--depths"):
        parse_depths("0,1")


# ----------------------------------------------------------------------------- eval loop with fakes


class FakeTokenizer:
    """Chars <-> ids; the chat template is just the user content."""

    eos_token_id = 0
    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict=True):
        assert add_generation_prompt and tokenize
        return [ord(ch) for ch in messages[-1]["content"]]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


class FakeWorker:
    """Answers 'a+b' prompts; correct only when depth >= the number of digits in the sum (deeper = better)."""

    def __init__(self, depth):
        self.depth = depth
        self.calls = 0

    def generate(self, prompt_ids, params):
        from rollout import Rollout

        self.calls += 1
        out = Rollout(depth=self.depth)
        for p in prompt_ids:
            a, b = "".join(chr(i) for i in p).split("+")
            answer = str(int(a) + int(b)) if self.depth >= len(str(int(a) + int(b))) else "0"
            for j in range(params.n):
                text = answer if j % 2 == 0 or params.n == 1 else "7"
                ids = [ord(ch) for ch in text]
                truncated = len(ids) >= params.max_new_tokens
                ids = ids[: params.max_new_tokens] + ([] if truncated else [0])
                out.prompt_ids.append(list(p))
                out.completion_ids.append(ids)
                out.logprobs.append([0.0] * len(ids))
                out.finish_reasons.append("length" if truncated else "stop")
        return out


def exact_match(prompts, completions, ground_truth, **kwargs):
    """Completions arrive as assistant messages (the prompts are chat messages), as in TRL."""
    assert {"completion_ids", "max_completion_length", "truncated"} <= set(kwargs)
    return [float(c[0]["content"].strip() == g) for c, g in zip(completions, ground_truth)]


def fake_dataset():
    from datasets import Dataset

    rows = [("3+4", "7"), ("5+6", "11"), ("40+2", "42"), ("2+2", "4")]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p, _ in rows],
                              "ground_truth": [g for _, g in rows]})


def test_evaluate_depths_with_fake_worker():
    workers = {}

    def factory(depth):
        workers[depth] = FakeWorker(depth)
        return workers[depth]

    res = evaluate_depths(None, FakeTokenizer(), fake_dataset(), depths=[1, 2], n=1, max_new_tokens=8,
                          reward_fn=exact_match, batch_size=3, worker_factory=factory)
    assert set(res) == {"1", "2"}
    assert res["1"]["accuracy"] == pytest.approx(0.5)  # only the 1-digit sums
    assert res["2"]["accuracy"] == pytest.approx(1.0)
    assert res["1"]["num_prompts"] == 4 and "pass@k" not in res["1"]
    assert workers[1].calls == 2  # 4 prompts in batches of 3
    json.dumps(res)  # serialisable as is

    res = evaluate_depths(None, FakeTokenizer(), fake_dataset(), depths=[2], n=4, temperature=1.0,
                          max_new_tokens=2, reward_fn=exact_match, worker_factory=FakeWorker)
    m = res["2"]
    # Even samples give the sum, odd ones "7": prompt "3+4" is always right, the others half the time.
    assert m["accuracy"] == pytest.approx(10 / 16)
    assert m["pass@k"] == 1.0 and m["k"] == 4
    assert m["maj@k"] == pytest.approx((1 + 0.5 * 3) / 4)  # 2-2 ties score half
    # Two-digit sums fill max_new_tokens=2 with no room for EOS: 4 of 16 samples truncated.
    assert m["truncated_frac"] == pytest.approx(0.25)


def test_evaluate_depths_passes_the_accuracy_options_and_refuses_signed_scores():
    """reward_kwargs reach the accuracy function (here: the verifier policy), and dapo_math (+1/-1) is refused."""
    from datasets import Dataset

    from rl.accuracy import AccuracyError

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+2"}]], "ground_truth": ["0.3333"]})

    class Third(FakeWorker):
        def generate(self, prompt_ids, params):
            out = super().generate(prompt_ids, params)
            out.completion_ids = [[ord(ch) for ch in "Answer: \\frac{1}{3}"] + [0] for _ in out.completion_ids]
            return out

    def run(**kw):
        return evaluate_depths(None, FakeTokenizer(), data, [1], max_new_tokens=40, worker_factory=Third,
                               **kw)["1"]["accuracy"]

    assert run() == 0.0  # exact: 0.3333 is not 1/3
    assert run(reward_kwargs={"policy": "rounded"}) == 1.0
    with pytest.raises(AccuracyError, match="dapo_math scores \\+1 / -1.*use math_accuracy"):
        run(reward_fn="dapo_math")
    with pytest.raises(ValueError, match="math_accuracy: policy must be one of"):
        run(reward_kwargs={"policy": "loose"})


def test_evaluate_depths_rejects_greedy_n_gt_1_and_missing_columns():
    from datasets import Dataset

    with pytest.raises(ValueError, match="temperature"):
        evaluate_depths(None, FakeTokenizer(), fake_dataset(), [1], n=2, temperature=0.0,
                        reward_fn=exact_match, worker_factory=FakeWorker)
    with pytest.raises(ValueError, match="ground_truth"):
        evaluate_depths(None, FakeTokenizer(), Dataset.from_dict({"prompt": ["1+1"]}), [1],
                        reward_fn=exact_match, worker_factory=FakeWorker)


# ----------------------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Ouro model (T=4) with the embedded model's char-level tokenizer, saved to disk."""
    from rl.make_tiny import TinyConfig, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(TinyConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2), tokenizer)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_cli_writes_the_json_schema(tiny_model_dir, tmp_path, capsys):
    from rl.evaluate import main

    out = tmp_path / "eval.json"
    argv = ["--model", str(tiny_model_dir), "--data", "arith", "--limit", "4", "--depths", "1,4",
            "--n", "2", "--temperature", "1.0", "--max_new_tokens", "6", "--exit_threshold", "0.5",
            "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(tiny_model_dir) and report["data"] == "arith"
    assert set(report["depths"]) == {"1", "4"}
    for m in report["depths"].values():
        assert {"accuracy", "pass@k", "maj@k", "len_mean", "truncated_frac"} <= set(m)
        assert m["k"] == 2 and m["num_prompts"] == 4
        assert 0.0 <= m["accuracy"] <= m["pass@k"] <= 1.0
        assert 1.0 <= m["len_mean"] <= 6.0 and 0.0 <= m["truncated_frac"] <= 1.0
    exit_mode = report["exit_threshold"]
    assert exit_mode["exit_threshold"] == 0.5 and 1.0 <= exit_mode["depth_mean"] <= 4.0
    table = capsys.readouterr().out
    assert "pass@2" in table and "mean depth" in table


def test_exit_threshold_extremes_match_fixed_depth_decoding(tiny_model_dir):
    """q >= 1 reads the last loop and q = 0 the first, so greedy exit-gate decoding (the worker's gate rule) must
    produce the very completions the fixed-depth rollout worker produces at depth T and at depth 1."""
    from rl.data import load_prompts
    from rl.evaluate import _load_model, _load_tokenizer_and_config, evaluate_exit_threshold

    tokenizer, _ = _load_tokenizer_and_config(str(tiny_model_dir))
    model = _load_model(str(tiny_model_dir), "cpu")
    data = load_prompts("arith", split="test", limit=8)
    seen: dict[str, list[str]] = {}

    def record(prompts, completions, ground_truth, _into, **kwargs):
        seen[_into] += [c[0]["content"] for c in completions]
        return [0.0] * len(completions)

    for q, depth in ((1.0, 4), (0.0, 1)):
        seen.update(fixed=[], gate=[])

        fixed = evaluate_depths(model, tokenizer, data, [depth], max_new_tokens=12,
                                reward_fn=lambda *a, **k: record(*a, _into="fixed", **k))[str(depth)]
        gate = evaluate_exit_threshold(model, tokenizer, data, q, max_new_tokens=12,
                                       reward_fn=lambda *a, **k: record(*a, _into="gate", **k))
        assert gate["depth_mean"] == float(depth)
        assert seen["gate"] == seen["fixed"] and len(seen["gate"]) == 8
        assert gate["len_mean"] == fixed["len_mean"] and gate["truncated_frac"] == fixed["truncated_frac"]


def test_eval_cli_bad_input_is_one_line(tmp_path, capsys):
    from rl.evaluate import main

    assert main(["--model", str(tmp_path), "--data", "arith"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--data", "arith", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_eval_cli_refuses_a_signed_accuracy_function_and_bad_options_in_one_line(tmp_path):
    """`looprl eval --reward dapo_math` would count -1 as ... nothing sensible: refused before any loading,
    like a bad --option; as a user runs it."""
    import subprocess
    import sys

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "rl", "eval", "--data", "arith", "--limit", "2", *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        return proc.returncode, proc.stderr.strip().splitlines()

    code, err = run("--reward", "dapo_math")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("looprl eval: --reward: dapo_math scores +1 / -1") and "math_accuracy" in err[0]
    code, err = run("--option", "policy=loose")
    assert code == 2 and len(err) == 1 and "policy must be one of" in err[0], err
    code, err = run("--option", "policy")
    assert code == 2 and len(err) == 1 and "expected key=value" in err[0], err


def test_eval_cli_option_reaches_the_accuracy_function(tiny_model_dir, tmp_path):
    """--option binds the function's keyword options and is recorded in the report."""
    from rl.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--model", str(tiny_model_dir), "--data", "arith", "--limit", "2", "--depths", "1",
                 "--max_new_tokens", "4", "--option", "policy=rounded", "--option", "fallback=none",
                 "--out", str(out), "--no_progress"]) == 0
    report = json.loads(out.read_text())
    assert report["reward"] == "math_accuracy"
    assert report["reward_kwargs"] == {"policy": "rounded", "fallback": "none"}
    assert report["depths"]["1"]["unscored_frac"] == 0.0
