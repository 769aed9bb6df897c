"""Issues 17 and 26: the false-negative families of real model outputs and the false-positive classes
(lists compared by a suffix, tiny numbers), both directions, plus the options.

The labelled cases live in tests/data/verifier_cases.jsonl (policy "exact", the default) and
tests/data/verifier_cases_rounded.jsonl (policy "rounded"): every family has right answers that must be
accepted and near misses (a changed sign, bracket, matrix entry, unit magnitude, chain step, ...)
that must be rejected. The same files are what `looprl reward --jsonl FILE --report` reads.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

import rewards
from rewards import forms
from rewards.math import extract_answer, normalize_answer, verify_batch
from rewards.policy import Policy, resolve

DATA = Path(__file__).parent / "data"
CASE_FILES = {"exact": DATA / "verifier_cases.jsonl", "rounded": DATA / "verifier_cases_rounded.jsonl"}


def _rows(policy: str) -> list[dict]:
    return [json.loads(line) for line in CASE_FILES[policy].read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def judged() -> dict[str, list[tuple[dict, rewards.math.Verdict]]]:
    """Every labelled row of both files, verified once (undecided rows in parallel in the pool)."""
    out = {}
    for policy in CASE_FILES:
        rows = _rows(policy)
        verdicts = verify_batch([r["completion"] for r in rows], [r["answer"] for r in rows], timeout=30,
                                policy=policy)
        out[policy] = list(zip(rows, verdicts))
    return out


def test_near_miss_set_is_large_and_covers_every_family() -> None:
    rows = _rows("exact") + _rows("rounded")
    near_misses = [r for r in rows if r["expected"] is False]
    assert len(near_misses) >= 100
    families = {r["family"] for r in rows}
    assert families >= {"boxed_in_text", "thousands", "units", "relations", "chain", "equation", "matrix",
                        "answer_no_colon", "last_math", "exact_numbers", "rounded", "lists", "tiny_numbers",
                        "new_turn", "multi_box", "membership"}
    for family in families:  # both directions in every family ("general" holds look-alikes only)
        labels = {r["expected"] for r in rows if r["family"] == family}
        assert labels == {True, False} or family == "general", family


@pytest.mark.parametrize("policy", list(CASE_FILES))
def test_zero_false_positives(judged, policy: str) -> None:
    false_positives = [(r["family"], r["completion"][-60:], r["answer"], v.reason)
                       for r, v in judged[policy] if v.correct and not r["expected"]]
    assert false_positives == []
    assert sum(not r["expected"] for r, _ in judged[policy]) > 10


@pytest.mark.parametrize("policy", list(CASE_FILES))
def test_right_answers_of_every_family_are_accepted(judged, policy: str) -> None:
    false_negatives = [(r["family"], r["completion"][-60:], r["answer"], v.extracted, v.reason)
                       for r, v in judged[policy] if r["expected"] and not v.correct]
    assert false_negatives == []
    assert sum(r["expected"] for r, _ in judged[policy]) > 5


def test_near_misses_are_rejected_for_a_reason_not_by_accident(judged) -> None:
    accidents = [(r["completion"][-60:], v.path) for policy in judged for r, v in judged[policy]
                 if not r["expected"] and v.path in ("timeout", "error")]
    assert accidents == []


def test_rounded_cases_stay_wrong_under_the_exact_default() -> None:
    """The exact policy (the default) keeps today's behaviour: a rounded decimal is a different answer."""
    rows = [r for r in _rows("rounded") if r["expected"]]
    verdicts = verify_batch([r["completion"] for r in rows], [r["answer"] for r in rows], timeout=30)
    assert [v.correct for v in verdicts] == [False] * len(rows)


# ----------------------------------------------------------------------------------- fast path kept

@pytest.mark.parametrize("response,gold", [
    ("Answer: 32,\\! 349", "32349"), ("Answer: $11,\\!111,\\!100$", "11111100"),
    ("\\boxed{5\\textnormal{ cm}}", "5"), ("\\boxed{x \\geq 5}", "x >= 5"), ("\\boxed{y \\lt 2}", "y < 2"),
    ("\\boxed{\\left[\\begin{array}{cc}1 & 2\\\\3 & 4\\end{array}\\right]}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\boxed{\\begin{bmatrix}1 & 2\\\\3 & 5\\end{bmatrix}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("Answer $ 9 $", "9"), ("\\boxed{5\\textnormal{ km}}", "5\\text{ m}"), ("Answer: n = 12 = 13", "13"),
    ("\\boxed{p=-1 \\text{ and } p=\\frac{15}{8}}", "-1, \\frac{15}{8}"),
])
def test_new_families_are_decided_without_the_pool(response: str, gold: str) -> None:
    assert rewards.explain(response, gold).path == "fast"


# ------------------------------------------------------------------------------------------- options

def test_policy_presets_and_overrides() -> None:
    assert resolve() == Policy(numeric_precision=None, decimal_comma=False, fallback="last_math")
    assert resolve("rounded") == Policy(numeric_precision=6, decimal_comma=True, fallback="last_math")
    assert resolve("rounded", numeric_precision=3).numeric_precision == 3
    assert resolve("rounded", numeric_precision=None).numeric_precision is None  # YAML null: exact numbers
    assert resolve(fallback="none").fallback == "none"


@pytest.mark.parametrize("kwargs,message", [
    ({"policy": "loose"}, "dapo_math: policy must be one of 'exact', 'rounded', got 'loose'"),
    ({"numeric_precision": 0}, "dapo_math: numeric_precision must be null (exact) or an int in 1..15, got 0"),
    ({"numeric_precision": "6"}, "numeric_precision must be null"),
    ({"decimal_comma": "yes"}, "dapo_math: decimal_comma must be true or false, got 'yes'"),
    ({"fallback": "first"}, "dapo_math: fallback must be one of 'last_math', 'none', got 'first'"),
])
def test_bad_options_fail_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:  # when bound, not at the first call (rewards.check_options)
        rewards.get("dapo_math", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError) as info:  # called directly with them: the same line
        rewards.get("dapo_math")(None, ["Answer: 1"], ground_truth=["1"], **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_reward_functions_take_the_options_through_reward_kwargs() -> None:
    completions = ["Answer: 0.0833", "Answer: 1,22", "work\n$3+4 = 7$\nso we get $7$ in the end"]
    golds = ["\\frac{1}{12}", "1.22", "7"]
    assert rewards.get("dapo_math")(None, completions, ground_truth=golds) == [-1.0, -1.0, 1.0]
    rounded = rewards.get("math_accuracy", policy="rounded", fallback="none")
    assert rounded(None, completions, ground_truth=golds) == [1.0, 1.0, 0.0]
    only_comma = rewards.get("math_accuracy", decimal_comma=True)
    assert only_comma(None, completions, ground_truth=golds) == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("response,expected", [
    ("work\nAnswer $ 9 $", "9"), ("work\nAnswer \\[ 9 \\]", "9"), ("work\nthe answer is $\\frac34$.", "\\frac34"),
    ("work\nAnswer $9$\nAnswer: 10", "10"),
    ("Note the answer $x$ must be positive.\nWe find\n$$x = 4$$\nand we are done.", "x = 4"),  # not an anchor
    ("lines\nof work\nso $y = 2x + 1$ is the line", "y = 2x + 1"),  # the variable stays: an equation answer
    ("lines\nof work\nwith no math at all", None),
])
def test_colon_less_answer_and_last_math_fallback(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


def test_fallback_none_and_the_format_reward_ignore_the_last_math() -> None:
    cot = "We add $3 + 4$.\nThat makes $7$."
    assert extract_answer(cot, fallback="none") is None
    assert rewards.get("format")(None, [cot], style="any") == [0.0]  # format wants an explicit answer
    assert rewards.get("math_accuracy", fallback="none")(None, [cot], ground_truth=["7"]) == [0.0]


# -------------------------------------------------------------------------------------- normalisation

def test_normalisation_of_the_new_notations() -> None:
    assert normalize_answer("32,\\! 349") == "32349"
    assert normalize_answer("11,\\!111,\\!100") == "11111100"
    assert normalize_answer("3,\\!2349") == "3,2349"  # not a thousands grouping: left as a list
    assert normalize_answer("5\\textnormal{ cm}") == "5"
    assert normalize_answer("x \\geqslant 5") == normalize_answer("x >= 5") == "x \\ge 5"
    assert normalize_answer("x \\lt 5") == "x < 5"
    assert normalize_answer("x \\in [-2, 7]") == "[-2, 7]"
    assert normalize_answer("p=-1 \\text{ and } p=\\frac{15}{8}") == "-1, \\frac{15}{8}"
    assert normalize_answer("x=1, y=2") == "x=1, y=2"  # a point, not a list of values
    assert normalize_answer("y = 2x", keep_assignment=True) == "y = 2x"
    assert normalize_answer("\\left[\\begin{array}{cc}1 & 2\\end{array}\\right]") == "\\begin{pmatrix}1 & 2\\end{pmatrix}"
    assert normalize_answer("\\begin{vmatrix}1 & 2\\\\3 & 4\\end{vmatrix}").startswith("\\begin{vmatrix}")


def test_forms_helpers() -> None:
    assert forms.unit_signature("5\\text{ cm}^2") == {"cm"}
    assert forms.unit_signature("5 kilometres") == {"km"}
    assert forms.unit_signature("30^\\circ") == {"deg"} and forms.unit_signature("\\$5") == {"$"}
    assert forms.unit_signature("5 ways") == frozenset() and forms.unit_signature("2x + 3") == frozenset()
    assert forms.chain_members("x = 5+5+1 = 11") == ["x", "5+5+1", "11"]
    assert forms.chain_members("x = 3, y = 4") is None and forms.chain_members("2x+4y-3=0") is None
    assert forms.matrix_cells("\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}") == [["1", "2"], ["3", "4"]]
    assert forms.decimal_comma_to_point("1,22") == "1.22" and forms.decimal_comma_to_point("1,222") == "1,222"
    assert forms.rounded_match("2.6667", Fraction(8, 3), 6)
    assert not forms.rounded_match("2.6668", Fraction(8, 3), 6)
    assert not forms.rounded_match("0.3", Fraction(1, 3), 6)  # fewer than 3 significant digits
    assert forms.rounded_match("0.0833333333", Fraction(1, 12), 6)
    assert forms.rounded_match("0.00000188", Fraction(1, 3 ** 12), 6)  # tiny: at its own 8 places ...
    assert not forms.rounded_match("0.00000150", Fraction(1, 3 ** 12), 6)  # ... never as 0.000002


# ------------------------------------------------------------------------------------- verifier report

def test_report_on_the_case_files_agrees_fully(capsys) -> None:
    from rl.reward_cli import main

    assert main(["--jsonl", str(CASE_FILES["exact"]), "--report"]) == 0
    out = capsys.readouterr().out
    total = len(_rows("exact"))
    assert f"agreement with 'expected': {total}/{total} (100.0 %)" in out
    assert "false positives (scored correct, labelled wrong): 0" in out and "matrix: 20/20" in out
    assert main(["--jsonl", str(CASE_FILES["rounded"]), "--report", "--option", "policy=rounded"]) == 0
    assert "numeric_precision=6, decimal_comma=True" in capsys.readouterr().out


def test_report_lists_false_positives_and_negatives_with_reasons(tmp_path, capsys) -> None:
    from rl.reward_cli import main

    rows = [{"completion": "Answer: 4", "answer": "4", "expected": True},
            {"completion": "Answer: 5", "answer": "4", "expected": 1},      # labelled wrongly: a "false negative"
            {"completion": "Answer: 4", "answer": "4", "expected": "false"},  # labelled wrongly: a "false positive"
            {"completion": "Answer: 0.0833", "answer": "\\frac{1}{12}", "expected": False}]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--jsonl", str(path), "--report"]) == 1
    out = capsys.readouterr().out
    assert "agreement with 'expected': 2/4 (50.0 %)" in out
    assert "false positives (scored correct, labelled wrong): 1\n  line 3: extracted '4', gold '4': " \
           "identical after normalisation (fast)" in out
    assert "false negatives (scored wrong, labelled correct): 1\n  line 2: extracted '5', gold '4': " \
           "exact number comparison (5 vs 4) (fast)" in out
    assert main(["--jsonl", str(path), "--report", "--option", "policy=rounded"]) == 1
    assert "false positives (scored correct, labelled wrong): 2" in capsys.readouterr().out  # 0.0833 now accepted


@pytest.mark.parametrize("row,args,message", [
    ({"completion": "Answer: 4", "answer": "4"}, [], "line 2: missing field 'expected' (needed by --report)"),
    ({"completion": "Answer: 4", "answer": "4", "expected": "maybe"}, [],
     "line 2: field 'expected' must be true/false (or 1/0), got 'maybe'"),
    ({"completion": "Answer: 4", "answer": "4", "expected": 2}, [], "line 2: field 'expected' must be true/false"),
    ({"completion": 4, "answer": "4", "expected": True}, [], "line 2: field 'completion' must be a string"),
    ({"completion": "Answer: 4", "expected": True}, [], "line 2: missing field 'answer'"),
    ({"completion": [{"role": "assistant"}], "answer": "4", "expected": True}, [],
     "line 2: field 'completion': completion must be a string or a list of chat messages"),
    ({"completion": "Answer: 4", "answer": "4", "expected": True}, ["--option", "policy=loose"],
     "--report: policy must be one of"),
    ({"completion": "Answer: 4", "answer": "4", "expected": True}, ["--option", "buffer_len=3"],
     "--report: unknown verifier option(s) buffer_len"),
])
def test_report_bad_rows_fail_with_one_line_naming_file_line_field(tmp_path, capsys, row, args, message) -> None:
    from rl.reward_cli import main

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"completion": "Answer: 1", "answer": "1", "expected": True}) + "\n"
                    + json.dumps(row) + "\n")
    assert main(["--jsonl", str(path), "--report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    if "line" in message:
        assert err.startswith(f"looprl reward: {path}: line 2: ")


def test_report_needs_a_file(capsys) -> None:
    from rl.reward_cli import main

    assert main(["--report", "--completion", "Answer: 1", "--answer", "1"]) == 2
    assert "--report needs --jsonl FILE" in capsys.readouterr().err


# ------------------------------------------------------------------------ issue 26: false positives

def test_numbers_compare_exactly_when_exact_and_relatively_when_a_decimal() -> None:
    import sympy

    from rewards.symbolic import _numeric_eq

    tiny, tinier = sympy.Pow(3, -81, evaluate=False), sympy.Pow(3, -80, evaluate=False)
    assert not _numeric_eq(tiny, tinier) and _numeric_eq(tiny, sympy.Rational(1, 3 ** 81))
    assert not _numeric_eq(1 / sympy.factorial(3000, evaluate=False), 1 / sympy.factorial(3001, evaluate=False))
    assert not _numeric_eq(sympy.exp(-100), sympy.exp(-101)) and _numeric_eq(sympy.sqrt(8), 2 * sympy.sqrt(2))
    assert _numeric_eq(sympy.Float("1.5e-30"), sympy.Rational(3, 2) * sympy.Pow(10, -30, evaluate=False))
    assert not _numeric_eq(sympy.Float("1.5e-30"), sympy.Float("1.5e-31"))  # relative, not absolute
    assert not _numeric_eq(sympy.Float("0.333333"), sympy.Rational(1, 3))  # the exact policy
    assert _numeric_eq(sympy.Float("0.5"), sympy.Rational(1, 2))
    assert not _numeric_eq(sympy.oo, -sympy.oo) and not _numeric_eq(sympy.Symbol("x") / 3, sympy.Symbol("x") / 3)
    assert _numeric_eq(sympy.Matrix([[1, sympy.sqrt(2)]]), sympy.Matrix([[1, sympy.sqrt(2)]]))
    assert not _numeric_eq(sympy.Matrix([[1, tiny]]), sympy.Matrix([[1, tinier]]))


def test_our_number_comparison_is_used_only_inside_our_calls() -> None:
    """Other users of math-verify in the same process (TRL's accuracy reward, the benchmark's baseline)
    keep math-verify's own comparison."""
    from math_verify import grader

    from rewards.symbolic import symbolic_equal

    original = grader.sympy_numeric_eq
    assert symbolic_equal("\\frac{1}{3^{81}}", "\\frac{1}{3^{80}}")[0] is False
    assert grader.sympy_numeric_eq is original


@pytest.mark.parametrize("pred,gold", [("4, 9,, 12", "3, 8, 12"), ("3, 8, 12", "4, 9,, 12")])
def test_a_list_that_parses_only_in_part_is_never_compared(pred: str, gold: str) -> None:
    from rewards.symbolic import symbolic_equal

    equal, reason = symbolic_equal(pred, gold)
    assert not equal and "only part of the" in reason and "list parsed" in reason


def test_list_and_relation_forms() -> None:
    assert forms.and_to_comma("4, 9, and 12") == "4, 9, 12" and forms.and_to_comma("3, 8 or 12") == "3, 8, 12"
    assert normalize_answer("3, 8, \\text{ and } 12") == "3, 8, 12"
    assert forms.or_relations_to_union("x < -1 or x > 2") == "(-\\infty, -1) \\cup (2, \\infty)"
    assert forms.or_relations_to_union("x \\le -1 or 2 \\le x") == "(-\\infty, -1] \\cup [2, \\infty)"
    assert forms.or_relations_to_union("-1 < x \\le 1 or x \\neq 5") == \
        "(-1, 1] \\cup (-\\infty, 5) \\cup (5, \\infty)"
    assert forms.or_relations_to_union("x < -1 or y > 2") == "x < -1 or y > 2"  # two unknowns
    assert forms.or_relations_to_union("x = 3 or x = -3") == "x = 3 or x = -3"  # values, not a union
    assert forms.or_relations_to_union("x < y or x > 2") == "x < y or x > 2"
    assert normalize_answer("x \\lt -1 \\text{ or } x \\gt 2") == "(-\\infty, -1) \\cup (2, \\infty)"
    assert normalize_answer("x\\in(1,2)\\cup(3,4)") == "(1,2)\\cup(3,4)"
    assert normalize_answer("\\begin{Bmatrix}1\\\\2\\end{Bmatrix}") == "\\begin{pmatrix}1\\\\2\\end{pmatrix}"


@pytest.mark.parametrize("response,expected", [
    ("work\nso the answer is 23. <|im_start|>user\nWhat is 2+2?\nAnswer: 4", "23"),
    ("Answer: 23<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nAnswer: 4", "23"),
    ("<|im_start|>assistant\nwork\nAnswer: 24", "24"),  # a turn token before any content is not a cut
    ("work\nThus the answer is 23<|eot_id|><|start_header_id|>user<|end_header_id|>\nAnswer: 7", "23"),
    ("<|begin_of_solution|>\nwork\nAnswer: 5\n<|end_of_solution|>", "5"),  # not a turn token
    ("work\nThe final answer is 23. I hope it is correct.", "23"),
    ("work\nI think the answer is (C).", "(C)"),
    ("work\nNote the answer is an integer.\nSo $x = 5$.", "x = 5"),  # a remark, then the math
    ("work\nNote the answer is positive.\nSo $x = 5$.", "x = 5"),
    ("work\nso $4$, $9$, and $12$.", "4, 9, and 12"),  # the last math keeps its list
    ("work\nso $3$ apples and $5$ pears", "3 apples and 5"),
    ("work\nwe get $3 + 4 = 7$ and so $7$", "7"),  # `and so` is not list glue
    ("Hence $x \\in (1,2) \\cup (3,4)$.", "x \\in (1,2) \\cup (3,4)"),  # one line: the math prose leads to
    ("$3$ apples and $5$ pears", "3 apples and 5 pears"),  # one line of mixed text: all of it
    ("So $x \\in \\boxed{(1,2)} \\cup \\boxed{(3,4)}$", "(1,2) \\cup (3,4)"),
    ("(a) \\boxed{3}\n(b) \\boxed{5}", "5"),  # without a list gold the last box is the answer
])
def test_extraction_of_the_issue_26_forms(response: str, expected: str) -> None:
    assert extract_answer(response) == expected


def test_several_boxes_form_the_answer_only_for_a_list_gold_of_as_many_items() -> None:
    response = "work\n(a) \\boxed{3}\n(b) \\boxed{5}"
    assert rewards.explain(response, "3, 5").extracted == "3, 5"
    assert rewards.explain(response, "3, 5, 7").extracted == "5"  # two boxes, three items: the last box
    assert rewards.explain("work\n\\boxed{1}\n(a) \\boxed{3}\n(b) \\boxed{5}", "3, 5").correct is False
    assert rewards.explain("Answer: 5\n(a) \\boxed{3}\n(b) \\boxed{5}", "3, 5").extracted == "3, 5"


_SPELLINGS = {">=": ["\\geq", "\\ge", "≥", "\\geqslant"], "<=": ["\\leq", "\\le", "≤", "\\leqslant"],
              "!=": ["\\neq", "\\ne", "≠"], ">": ["\\gt"], "<": ["\\lt"]}
_OTHER = {">=": ">", "<=": "<", "!=": "=", ">": ">=", "<": "<="}


@pytest.mark.parametrize("plain,spelled", [(p, s) for p, spellings in _SPELLINGS.items() for s in spellings])
def test_every_relation_spelling_matches_both_ways_and_near_misses_do_not(plain: str, spelled: str) -> None:
    pairs = [(f"Answer: $x {spelled} 5$", f"x {plain} 5", True), (f"Answer: x {plain} 5", f"x {spelled} 5", True),
             (f"\\boxed{{k {spelled} \\frac{{1}}{{2}}}}", f"k {plain} 1/2", True),
             (f"Answer: $x {spelled} 6$", f"x {plain} 5", False),
             (f"Answer: $x {spelled} 5$", f"x {_OTHER[plain]} 5", False)]
    verdicts = verify_batch([r for r, _, _ in pairs], [g for _, g, _ in pairs], timeout=30)
    assert [v.correct for v in verdicts] == [e for _, _, e in pairs], verdicts
