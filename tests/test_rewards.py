"""Reward functions: answer extraction, equivalence (and its negatives), registry, TRL convention, CLI.

Cases are collected from DAPO's answer format (`Answer: $Answer` on the last line) and from the
categories of math-verify's public test suite (notations, malformed fractions, percent, units, sets,
intervals, styling), written here from scratch. Timeouts and the process pool: test_rewards_pool.py; TRL interop: test_rewards_trl.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pytest

import rewards
from rewards.math import extract_answer, normalize_answer, parse_literal, verify_batch

# ------------------------------------------------------------------------------------------ extraction

EXTRACTION = [
    ("Let me think step by step.\n3 + 4 = 7\nAnswer: 7", "7"),
    ("Answer: $34", "34"),  # the DAPO template says `Answer: $Answer`; models copy the dollar
    ("**Answer:** 42", "42"),
    ("**Answer**: $42$.", "42"),
    ("Answer: \\(42\\)", "42"),
    ("Answer: \\[ 42 \\]", "42"),
    ("Answer: $\\boxed{42}$", "42"),
    ("ANSWER: 42", "42"),
    ("answer:42", "42"),
    ("Answer: 42.", "42"),
    ("Answer: 42. This is the number of ways.", "42"),
    ("Answer: 42 (the number of apples)", "42"),
    ("Answer: 42, because the sum is even.", "42"),
    ("Answer: The answer is 42", "42"),
    ("Final Answer: The final answer is $28 \\%$. I hope it is correct.", "28 \\%"),
    ("Answer:\n42\n", "42"),
    ("Answer:\n$$\n\\frac{1}{2}\n$$", "\\frac{1}{2}"),
    ("Answer: `42`", "42"),
    ("Answer: 60<|im_end|>", "60"), ("Answer: 60</s>", "60"),  # decoded with special tokens
    ("Answer: 3. Actually 4", "3. Actually 4"),  # a number after the period: keep it, do not guess
    ("Answer: 1\nmore text\nAnswer: 2", "2"),  # the last Answer line wins
    ("We get \\boxed{3}. Answer: 5", "5"),  # the Answer line wins over an earlier box
    ("So the answer: 5 is wrong.\nFinally \\boxed{6}", "6"),  # ... but not over a later one
    ("so x = \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("first \\boxed{1}, later \\boxed{2}", "1, 2"),  # boxes on the same line: all of them
    ("first \\boxed{1}\nfinally \\boxed{2}", "2"),  # the last box
    ("\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.", "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}"),
    ("42", "42"),
    ("$\\frac{3}{4}$", "\\frac{3}{4}"),
    ("", None),
    ("I do not know.\nSorry about that.", None),
    ("Answer:", None),
    ("Answer: \n\n", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize("text,value", [("42", 42), ("-7", -7), ("007", 7), ("34.0", 34), (".5", 0.5),
                                        ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("\\frac34", 0.75),
                                        ("-\\frac{1}{2}", -0.5), ("\\frac{-1}{2}", -0.5),
                                        ("0.\\overline{3}", Fraction(1, 3)), ("0.1\\overline{6}", Fraction(1, 6))])
def test_parse_literal(text: str, value: float | Fraction) -> None:
    assert parse_literal(text) == value


@pytest.mark.parametrize("text", ["x", "2^5", "\\sqrt{2}", "1,2", "1/0", "9" * 100, "3 4"])
def test_parse_literal_rejects(text: str) -> None:
    assert parse_literal(text) is None


def test_normalize_answer() -> None:
    assert normalize_answer("$\\dfrac{1}{2}$") == "\\frac{1}{2}"
    assert normalize_answer("1{,}000") == "1000"
    assert normalize_answer("12,345,678") == "12345678"
    assert normalize_answer("90^{\\circ}") == "90"
    assert normalize_answer("5\\text{ cm}^2") == "5"
    assert normalize_answer("\\left( 1, 2 \\right)") == "( 1, 2 )"
    assert normalize_answer("x = 5") == "5"
    assert normalize_answer("\\text{(B)}") == "B"


# ---------------------------------------------------------------------------------------- equivalence

EQUIVALENT = [  # (response, gold): must score as correct
    ("Answer: 42", "42"), ("**Answer:** $42$", "42"), ("Answer: \\boxed{42}", "42"), ("Answer: $34", "34"),
    ("Answer: x = 42", "42"), ("Answer: $n=42$.", "42"), ("The final answer is \\boxed{42}.", "42"), ("42", "42"),
    ("Answer: 1,000", "1000"), ("Answer: 7,425,000", "7425000"), ("Answer: 1 000", "1000"),
    ("Answer: $14{,}916$", "14916"), ("Answer: 007", "7"), ("Answer: 34.0", "34"), ("Answer: 34.00", "34"),
    ("Answer: −3", "-3"), ("Answer: $-3$", "-3"), ("Answer: 1000.0", "1000"),
    ("Answer: 0.5", "\\frac{1}{2}"), ("Answer: .5", "1/2"), ("Answer: \\dfrac{10}{9}", "10/9"),
    ("Answer: -\\frac{10}{9}", "-10/9"), ("Answer: \\frac13", "1/3"), ("Answer: \\tfrac{1}{3}", "\\frac{1}{3}"),
    ("Answer: \\cfrac{1}{3}", "1/3"), ("Answer: \\frac{2}{4}", "\\frac{1}{2}"),
    ("Answer: 42 dollars", "42"), ("Answer: \\$42", "42"), ("Answer: $5\\text{ cm}^2$", "5"),
    ("Answer: \\frac{1}{3} \\text{meters}", "1/3"), ("Answer: 30^\\circ", "30"), ("Answer: $90^{\\circ}$", "90^\\circ"),
    ("Answer: 30°", "30"), ("Answer: 50\\%", "50"), ("Answer: 28 percent", "28\\%"), ("Answer: 50%", "50\\%"),
    ("Final Answer: The final answer is $28 \\%$. I hope it is correct.", "28\\%"),
    ("Answer: \\text{Evelyn}", "\\text{Evelyn}"), ("Answer: evelyn", "\\text{Evelyn}"),
    ("Answer: (C)", "C"), ("Answer: C", "\\text{(C)}"),
    # symbolic path (math-verify in a worker)
    ("Answer: 2^5", "32"), ("Answer: \\sqrt{4}", "2"), ("Answer: $\\frac{\\sqrt{3}}{2}$", "\\frac{\\sqrt3}{2}"),
    ("Answer: \\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"), ("Answer: 2\\sqrt{2}", "\\sqrt{8}"),
    ("Answer: (x+1)^2", "x^2+2x+1"), ("Answer: \\{2,1\\}", "\\{1,2\\}"), ("Answer: [0,1)", "[0,1)"),
    ("Answer: (-\\infty, 2]", "(-\\infty,2]"), ("Answer: (3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Answer: 10^{-3}", "0.001"), ("Answer: 2\\pi", "2 \\pi"), ("Answer: 2 + 3i", "3i+2"),
    ("Answer: \\sqrt3", "\\sqrt{3}"), ("Answer: 2\\frac{1}{2}", "\\frac{5}{2}"),
    ("Answer: 4\\frac{2}{3}", "\\frac{14}{3}"), ("Answer: 1\\frac{1}{2}", "1.5"), ("Answer: (x+2)(x+5)", "x^2+7x+10"),
    ("Answer: (-\\infty, -4) \\cup (-4, 6) \\cup (6, \\infty)", "(-\\infty,-4)\\cup(-4,6)\\cup(6,\\infty)"),
    ("Answer: 32,348 dollars", "\\$32,348"), ("Answer: -1, 1, 2", "\\{1,-1,2\\}"), ("Answer: \\pm 2", "2, -2"),
    ("Answer: East", "\\text{east}"), ("Answer: \\frac13", "0.\\overline{3}"), ("Answer: 2^{1/3}", "\\sqrt[3]{2}"),
    ("Answer: 3 and 5", "3, 5"), ("Answer: \\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}"),
    ("Answer: 6-5i", "6 - 5i"), ("Answer: \\frac{b+a}{2}", "\\frac{a+b}{2}"),
    ("so \\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.",
     "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}"),
    # issue 26: answer forms of real outputs
    ("Answer: 3, 8, and 12", "3, 8, 12"), ("Answer: \\frac{1}{3^{81}}", "3^{-81}"), ("Answer: x \\gt 5", "x > 5"),
    ("Answer: x \\neq 5", "x != 5"), ("Answer: x ≥ 5", "x \\geq 5"), ("Answer: x <= 5", "x \\le 5"),
    ("Answer: $\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}$", "\\left[\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right]"),
    ("work\nso the answer is 23. <|im_start|>user\nWhat is 5+5?", "23"),
    ("work\nThe final answer is 23. I hope it is correct.", "23"),
    ("work\n(a) \\boxed{3}\n(b) \\boxed{5}", "3, 5"), ("x \\in \\boxed{(1,2)\\cup(3,4)}", "(1,2)\\cup(3,4)"),
    ("Hence $x \\in (1,2) \\cup (3,4)$.", "(1,2)\\cup(3,4)"),
]

NOT_EQUIVALENT = [  # (response, gold): must score as wrong — false positives teach the model to cheat
    ("Answer: 43", "42"), ("Answer: -42", "42"), ("Answer: 4.2", "42"), ("Answer: 420", "42"),
    ("Answer: 142", "42"), ("Answer: 42", "4"), ("Answer: 42", "420"),
    # several candidate answers, one of them right
    ("Answer: 3 or 4", "3"), ("Answer: 3, 4", "3"), ("Answer: 3 and 4", "4"), ("Answer: $3$ or $4$", "3"),
    ("\\boxed{3} or \\boxed{4}", "4"), ("Answer: 3. Actually 4", "4"), ("Answer: 3. Actually 4", "3"),
    ("Answer: x = 3, y = 4", "3"), ("Answer: 3 apples and 5 pears", "3"), ("Answer: 42 or more", "42"),
    ("Answer: 42\nAnswer: 43", "42"), ("Answer: 12 \\text{ and } 15", "12"),
    # numbers side by side (math-verify reads `3 \\quad 4` as 7)
    ("Answer: 3 \\quad 4", "7"), ("Answer: 1 2", "3"), ("Answer: 3 (4)", "7"), ("Answer: 2(3)", "5"),
    ("Answer: 3~4", "3"),
    # look-alikes and approximations
    ("Answer: 3.14159", "\\pi"), ("Answer: 3.141593", "\\pi"), ("Answer: 0.333333", "\\frac{1}{3}"),
    ("Answer: 2.718281828", "e"), ("Answer: 1.0000001", "1"), ("Answer: 1000.05", "1000"),
    ("Answer: 0.5", "50"), ("Answer: 50\\%", "0.5"), ("Answer: 28", "0.28"), ("Answer: 28/100", "28"),
    ("Answer: (0,1)", "[0,1]"), ("Answer: (1,2)", "(2,1)"), ("Answer: 12", "1,2"),
    ("Answer: \\sqrt{3}/2", "\\sqrt{3/2}"), ("Answer: \\frac{2}{1}", "\\frac{1}{2}"), ("Answer: 10^{3}", "10^{-3}"),
    ("Answer: 2^{10}", "2^{11}"), ("Answer: Leveny", "\\text{Evelyn}"), ("Answer: forty-two", "42"),
    ("Answer: x^2+2x", "x^2+2x+1"), ("Answer: (D)", "C"),
    ("Answer: \\frac{1}{2}", "\\frac{1}{2}, \\frac{3}{4}"), ("Answer: 3 and 4", "3, 5"), ("Answer: 0.25", "25\\%"),
    ("Answer: (C) 17", "C"),
    # issue 26: a list shares only its last element; tiny values are not all equal
    ("Answer: 4, 9, and 12", "3, 8, and 12"), ("The answers are 4, 9, and 12.", "3, 8, and 12"),
    ("work\nso $4$, $9$, and $12$", "3, 8, and 12"), ("work\nso $4$, $9$, and $12$", "12"),
    ("Answer: \\frac{1}{3000!}", "\\frac{1}{3001!}"), ("Answer: \\frac{1}{3^{81}}", "\\frac{1}{3^{80}}"),
    ("Answer: 10^{-20}", "10^{-21}"), ("Answer: x \\geq 6", "x \\ge 5"), ("Answer: x \\neq 5", "x = 5"),
    ("work\nso the answer is 24. <|im_start|>user\nWhat is 5+5?", "23"),
    ("Answer: 23<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nAnswer: 4", "4"),
    ("work\n(a) \\boxed{3}\n(b) \\boxed{6}", "3, 5"), ("Hence $x \\in (1,2) \\cup (3,5)$.", "(1,2)\\cup(3,4)"),
    # no answer at all
    ("No answer here, sorry.\nI give up.", "42"), ("", "42"), ("Answer:", "42"),
]


@pytest.fixture(scope="module")
def verdicts() -> dict[tuple[str, str], rewards.math.Verdict]:
    """All equivalence cases in one batch: the undecided ones run in parallel in the worker pool."""
    pairs = EQUIVALENT + NOT_EQUIVALENT
    results = verify_batch([r for r, _ in pairs], [g for _, g in pairs], timeout=20)
    return dict(zip(pairs, results))


@pytest.mark.parametrize("response,gold", EQUIVALENT)
def test_equivalent(verdicts, response: str, gold: str) -> None:
    verdict = verdicts[(response, gold)]
    assert verdict.correct, verdict


@pytest.mark.parametrize("response,gold", NOT_EQUIVALENT)
def test_not_equivalent(verdicts, response: str, gold: str) -> None:
    verdict = verdicts[(response, gold)]
    assert not verdict.correct, verdict
    assert verdict.path not in ("timeout", "error"), verdict  # wrong for a reason, not by accident


def test_is_equivalent_and_explain() -> None:
    assert rewards.is_equivalent("work...\nAnswer: 12", "12")
    assert not rewards.is_equivalent("work...\nAnswer: 13", "12")
    verdict = rewards.explain("Answer: $\\frac{6}{8}$", "0.75")
    assert (verdict.extracted, verdict.correct, verdict.path) == ("\\frac{6}{8}", True, "fast")


def test_integer_answers_take_the_fast_path() -> None:
    """The arith task's answers are decided in-process: no worker round trip at all."""
    before = rewards.counters()
    responses = [f"Answer: {n}" for n in range(500)] + ["Answer: 007", "Answer: 1,000", "**Answer:** $-5$."]
    golds = [str(n if n % 3 else n + 1) for n in range(500)] + ["7", "1000", "-5"]
    scores = rewards.get("dapo_math")(None, responses, ground_truth=golds)
    assert scores == [1.0 if n % 3 else -1.0 for n in range(500)] + [1.0, 1.0, 1.0]
    after = rewards.counters()
    assert after.get("symbolic", 0) == before.get("symbolic", 0)
    assert after["fast"] - before.get("fast", 0) == 503


# --------------------------------------------------------------------------------------- reward fns

def test_dapo_math_and_accuracy_scales() -> None:
    completions = ["Answer: 5", "Answer: 6", "no answer"]
    golds = ["5", "5", "5"]
    assert rewards.get("dapo_math")(None, completions, ground_truth=golds) == [1.0, -1.0, -1.0]
    assert rewards.get("math_accuracy")(None, completions, ground_truth=golds) == [1.0, 0.0, 0.0]


def test_chat_message_completions_and_column_aliases() -> None:
    chats = [[{"role": "assistant", "content": "Answer: 5"}], [{"role": "assistant", "content": "Answer: 4"}]]
    fn = rewards.get("math_accuracy")
    assert fn(prompts=None, completions=chats, ground_truth=["5", "5"]) == [1.0, 0.0]
    assert fn(prompts=None, completions=chats, solution=["5", "5"]) == [1.0, 0.0]  # TRL / open-r1 column name
    with pytest.raises(ValueError, match="ground_truth, answer, solution"):
        fn(prompts=None, completions=chats)
    with pytest.raises(ValueError, match="2 completions but 1 values"):
        fn(prompts=None, completions=chats, ground_truth=["5"])
    with pytest.raises(ValueError, match="completion must be a string or a list of chat messages"):
        fn(prompts=None, completions=[123], ground_truth=["5"])


def test_overlong_penalty_matches_dapo_formula() -> None:
    ids = [[0] * n for n in (10, 80, 81, 90, 100, 120)]
    fn = rewards.get("overlong_penalty")
    scores = fn(None, None, completion_ids=ids, max_completion_length=100, buffer_len=20)
    assert scores == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0, -1.0])
    half = fn(None, None, completion_ids=ids, max_completion_length=100, buffer_len=20, penalty_factor=0.5)
    assert half == pytest.approx([s * 0.5 for s in scores])
    from trl.rewards import get_soft_overlong_punishment  # same numbers as TRL's version

    assert scores == pytest.approx(get_soft_overlong_punishment(100, 20)(completion_ids=ids))
    with pytest.raises(ValueError, match="buffer_len"):
        fn(None, None, completion_ids=ids, max_completion_length=100)
    with pytest.raises(ValueError, match="completion_ids"):
        fn(None, ["x"], max_completion_length=100, buffer_len=10)


def test_format_reward() -> None:
    fn = rewards.get("format")
    completions = ["work\nAnswer: 12", "**Answer:** $12$", "Answer: 12\nthen more text", "\\boxed{12}", "nothing",
                   "Answer:"]
    assert fn(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert fn(None, completions, style="boxed") == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert fn(None, completions, style="any") == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="style"):
        fn(None, completions, style="xml")


def test_pop_counters_and_trl_log_metric() -> None:
    rewards.pop_counters()
    logged: dict[str, float] = {}
    rewards.get("dapo_math")(None, ["Answer: 1", "no answer\nhere"], ground_truth=["1", "1"],
                             log_metric=logged.__setitem__)
    assert logged == {"rewards/timeouts": 0.0, "rewards/errors": 0.0}
    popped = rewards.pop_counters()
    assert popped["rewards/items"] == 2 and popped["rewards/no_answer"] == 1 and popped["rewards/timeouts"] == 0
    assert rewards.pop_counters()["rewards/items"] == 0  # reset after a pop


# ------------------------------------------------------------------------------------------ registry

def test_registry() -> None:
    assert {"dapo_math", "math_accuracy", "overlong_penalty", "format"} <= set(rewards.available())
    assert rewards.get("dapo_math") is rewards.builtin.dapo_math
    assert rewards.get("rewards.builtin:math_accuracy") is rewards.builtin.math_accuracy
    with pytest.raises(rewards.UnknownRewardError, match=r"unknown reward 'nope'; registered: dapo_math, format"):
        rewards.get("nope")
    with pytest.raises(rewards.UnknownRewardError, match="cannot import module"):
        rewards.get("no_such_pkg.mod:fn")
    with pytest.raises(rewards.UnknownRewardError, match="has no attribute"):
        rewards.get("rewards.builtin:nope")

    @rewards.register("test_length_reward")
    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert "test_length_reward" in rewards.available()
    assert rewards.get("test_length_reward")(None, ["ab"]) == [2.0]
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("test_length_reward")(lambda prompts, completions, **kw: [])
    bound = rewards.get("overlong_penalty", max_completion_length=10, buffer_len=5)
    assert bound.__name__ == "overlong_penalty"
    assert bound(None, None, completion_ids=[[0] * 10]) == [-1.0]


def test_rewards_imports_neither_torch_nor_rl() -> None:
    code = "import sys, rewards; rewards.get('dapo_math'); bad = {'torch', 'rl'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_single(capsys) -> None:
    from rl.reward_cli import main

    assert main(["--fn", "dapo_math", "--completion", "work\n**Answer:** $\\frac{1}{2}$.", "--answer", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "extracted: '\\\\frac{1}{2}'" in out and "score: 1.0" in out and "exact number comparison" in out


def test_cli_jsonl_and_errors(tmp_path, capsys) -> None:
    from rl.reward_cli import main

    good = tmp_path / "rows.jsonl"
    good.write_text(json.dumps({"completion": "Answer: 4", "answer": "4"}) + "\n"
                    + json.dumps({"completion": [{"role": "assistant", "content": "Answer: 5"}], "ground_truth": 4})
                    + "\n")
    assert main(["--fn", "math_accuracy", "--jsonl", str(good)]) == 0
    out = capsys.readouterr().out
    assert "[1] extracted: '4'" in out and "[2] extracted: '5'" in out and "mean score 0.5000" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"completion": "Answer: 4", "answer": "4"}) + "\n{not json\n")
    assert main(["--jsonl", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"looprl reward: {bad}: line 2: not valid JSON") and "\n" not in err
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"completion": "Answer: 4"}) + "\n")
    assert main(["--jsonl", str(missing)]) == 2
    assert "line 1: missing field 'answer'" in capsys.readouterr().err
    assert main(["--fn", "nope", "--completion", "x", "--answer", "1"]) == 2
    assert "registered: dapo_math" in capsys.readouterr().err
    assert main(["--completion", "x"]) == 2
    assert main(["--fn", "overlong_penalty", "--completion", "x" * 9, "--answer", "1",
                 "--option", "max_completion_length=10", "--option", "buffer_len=4"]) == 0
    assert "score: -0.75" in capsys.readouterr().out


def test_cli_runs_trl_reward_functions(capsys) -> None:
    """`looprl reward` calls functions as TRL does (keywords, assistant messages), so TRL's own work."""
    pytest.importorskip("trl")
    from rl.reward_cli import main

    assert main(["--fn", "trl.rewards:accuracy_reward", "--completion", "so \\boxed{1}", "--answer", "1"]) == 0
    assert "score: 1.0" in capsys.readouterr().out
    assert main(["--fn", "trl.rewards:accuracy_reward", "--completion", "so \\boxed{2}", "--answer", "1"]) == 0
    assert "score: 0.0" in capsys.readouterr().out
