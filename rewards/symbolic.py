"""The expensive half of verification: math-verify + sympy on two normalised answer strings.

Runs inside the worker processes of `rewards.pool` (which enforce the hard time limit), or inline for
benchmarks. math-verify's own signal timeouts are switched off here: they only work on a main thread,
and the pool kills a stuck worker anyway. Returns (equal, reason); never trusts a partial parse (a
list must keep every item).

Numbers inside math-verify's comparison (of plain values and of the entries of sets, tuples,
intervals, matrices and relations) are compared by `_numeric_eq` instead of math-verify's own, which
rounds to 6 places or chops tiny differences (so `\\frac{1}{3^{81}}` equalled `\\frac{1}{3^{80}}`): exact
values compare exactly, and a decimal (a sympy Float) with a RELATIVE tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from fractions import Fraction

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, grader, parse, verify

from rewards import forms
from rewards.forms import parse_literal

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings on every call

_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
_DIGITS = re.compile(r"\d+")


EXACT_DIGITS = 50  # an exact irrational value (sqrt, pi, exp) is evaluated to this many digits ...
EXACT_RELATIVE = sympy.Float("1e-40", EXACT_DIGITS)  # ... and must agree to this relative difference
INEXACT_RELATIVE = sympy.Float("1e-12", EXACT_DIGITS)  # a decimal: 15-digit floats, rounding noise only


def _values_close(a: sympy.Expr, b: sympy.Expr, relative: sympy.Float) -> bool:
    """|a - b| <= relative * max(|a|, |b|): relative, so tiny values never all look equal."""
    x, y = sympy.N(a, EXACT_DIGITS), sympy.N(b, EXACT_DIGITS)
    if not (x.is_finite and y.is_finite):  # oo vs -oo: no tolerance applies
        return bool(x == y)
    try:
        return bool(abs(x - y) <= relative * max(abs(x), abs(y)))
    except TypeError:  # infinities, nan, values sympy cannot order
        return bool(x == y)


def _numeric_eq(a, b, float_rounding: int = 6, numeric_precision: int = 15) -> bool:
    """Stands in for math-verify's `sympy_numeric_eq` (same signature) during our calls. Two exact
    numbers: equal when both are rational and the same (sympy Rational equality), or when irrational
    values agree to EXACT_DIGITS; a decimal on either side: relative tolerance INEXACT_RELATIVE (the
    exact policy: `0.333333 != 1/3`). Not numbers (`x/3`): False here, sympy's simplify decides."""
    if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
        a, b = grader.safe_sympy_doit(a), grader.safe_sympy_doit(b)
        return a.shape == b.shape and all(_numeric_eq(x, y) for x, y in zip(a, b))
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number):
        return False
    a, b = grader.safe_sympy_doit(a), grader.safe_sympy_doit(b)
    if a.has(sympy.Float) or b.has(sympy.Float):
        return _values_close(a, b, INEXACT_RELATIVE)
    if a.is_Rational and b.is_Rational:
        return bool(a == b)
    return _values_close(a, b, EXACT_RELATIVE)


_SWAP_LOCK = threading.Lock()


@contextlib.contextmanager
def _exact_numbers() -> Iterator[None]:
    """math-verify compares with our `_numeric_eq` inside this block (and only there: other users of
    math-verify in the process keep its own)."""
    with _SWAP_LOCK:
        original, grader.sympy_numeric_eq = grader.sympy_numeric_eq, _numeric_eq
        try:
            yield
        finally:
            grader.sympy_numeric_eq = original


def _parse(answer: str) -> list:
    return parse(f"${answer}$", extraction_config=_CONFIG, parsing_timeout=None)


def _covers_all_numbers(answer: str, parsed_text: str) -> bool:
    """math-verify may parse only a prefix (`3 apples 5` -> 3); every number must survive."""
    # Digit characters in order: math-verify rewrites `\\frac12` as `\\frac{1}{2}`, never reorders digits.
    return "".join(_DIGITS.findall(answer)) == "".join(_DIGITS.findall(parsed_text))


def _exact_vs_literal(literal: Fraction, literal_text: str, expr: sympy.Basic,
                      precision: int | None) -> tuple[bool, str] | None:
    """A plain number against a sympy value: exact when the value is rational, never equal to an
    irrational one (3.141593 is not pi) unless `precision` allows a rounded decimal. None when the
    value is not a number (sets, equations, ...)."""
    if not isinstance(expr, sympy.Expr) or not expr.is_number:
        return None
    if expr.is_real is False:
        return False, "a plain number cannot equal a complex value"
    if expr.is_rational is False:
        if precision is not None and _number_equal(literal_text, expr, precision):
            return True, f"{literal_text} is the value rounded (numeric_precision={precision})"
        return False, "a plain number cannot equal an irrational value"
    if expr.is_rational:
        equal = sympy.simplify(expr - sympy.Rational(literal.numerator, literal.denominator)) == 0
        if not equal and precision is not None and _number_equal(literal_text, expr, precision):
            return True, f"{literal_text} is the value rounded (numeric_precision={precision})"
        return bool(equal), "exact rational comparison"
    return None


def _as_fraction(expr: sympy.Basic) -> Fraction | None:
    if isinstance(expr, sympy.Rational):
        return Fraction(int(expr.p), int(expr.q))
    if isinstance(expr, sympy.Expr) and expr.is_number and expr.is_real:
        return Fraction(str(sympy.N(expr, 30)))
    return None


def _decimal_text(expr: sympy.Basic) -> str | None:
    """`2.6667` for the sympy Float math-verify made of it (trailing zeros dropped)."""
    if not isinstance(expr, sympy.Float):
        return None
    text = str(expr)
    return text.rstrip("0") if "." in text and "e" not in text.lower() else None


def _number_equal(text: str, expr: sympy.Basic, precision: int) -> bool:
    value = _as_fraction(expr)
    return value is not None and forms.rounded_match(text, value, precision)


def _rounded_equal(a, b, precision: int) -> bool:
    """Structure-by-structure equality where a decimal may stand for the value it rounds (policy
    "rounded"): numbers, intervals (same brackets), tuples, finite sets, matrices."""
    if isinstance(a, sympy.Interval) and isinstance(b, sympy.Interval):
        return (a.left_open, a.right_open) == (b.left_open, b.right_open) and \
            _rounded_equal(a.start, b.start, precision) and _rounded_equal(a.end, b.end, precision)
    if isinstance(a, (sympy.Tuple, tuple, list)) and isinstance(b, (sympy.Tuple, tuple, list)):
        return len(a) == len(b) and all(_rounded_equal(x, y, precision) for x, y in zip(a, b))
    if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
        return a.shape == b.shape and all(_rounded_equal(x, y, precision) for x, y in zip(a, b))
    if isinstance(a, sympy.FiniteSet) and isinstance(b, sympy.FiniteSet):
        unused = list(b.args)
        for x in a.args:
            match = next((y for y in unused if _rounded_equal(x, y, precision)), None)
            if match is None:
                return False
            unused.remove(match)
        return not unused
    if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number:
        if a == b or sympy.simplify(a - b) == 0:
            return True
        for decimal, other in ((a, b), (b, a)):
            text = _decimal_text(decimal)
            if text is not None and _number_equal(text, other, precision):
                return True
        return False
    return a == b


def _list_items(answer: str) -> int:
    """Top-level items of a list answer (`4, 9, 12` -> 3; `(1, 2)` and matrices count as one)."""
    if "," not in answer or "\\begin" in answer:
        return 1
    return len({item for item in forms.top_level_items(answer) if item})


def _parsed_items(value) -> int:
    if isinstance(value, (sympy.FiniteSet, sympy.Tuple, tuple, list)):
        return len(value)
    return 1


def _parse_checked(answer: str, what: str) -> tuple[list | None, str]:
    parsed = _parse(answer)
    if not parsed:
        return None, f"math-verify could not parse the {what}" + (f" {answer!r}" if what == "gold answer" else "")
    items = _list_items(answer)
    if _parsed_items(parsed[0]) < items:  # `4, 9,, 12` parsed as 12: never compare what is left of a list
        return None, f"only part of the {what} list parsed ({items} items, got {parsed[0]})"
    return parsed, ""


def _equal(pred: str, gold: str, precision: int | None) -> tuple[bool, str]:
    gold_parsed, error = _parse_checked(gold, "gold answer")
    if gold_parsed is None:
        return False, error
    pred_parsed, error = _parse_checked(pred, "answer")
    if pred_parsed is None:
        return False, error
    if not _covers_all_numbers(pred, str(pred_parsed[-1])):
        return False, f"only part of the answer parsed ({pred_parsed[-1]!r})"
    for literal, text, other in ((parse_literal(pred), pred, gold_parsed[0]), (parse_literal(gold), gold, pred_parsed[0])):
        if literal is not None:
            decided = _exact_vs_literal(literal, text, other, precision)
            if decided is not None:
                return decided
    # set_relation: `-2 \le x \le 7` is the interval [-2, 7] (both ways round)
    with _exact_numbers():
        equal = verify(gold_parsed, pred_parsed, timeout_seconds=None, allow_set_relation_comp=True)
    if not equal and precision is not None and _rounded_equal(pred_parsed[0], gold_parsed[0], precision):
        return True, f"equal up to rounded decimals (numeric_precision={precision})"
    return bool(equal), "math-verify: equivalent" if equal else "math-verify: not equivalent"


def symbolic_equal(pred: str, gold: str, numeric_precision: int | None = None) -> tuple[bool, str]:
    """Is the normalised predicted answer mathematically equal to the normalised gold answer?

    A chained equality (`5+5+1 = 11`) against a plain gold is equal when EVERY number-valued member is."""
    members = forms.chain_members(pred) if "=" in pred and "=" not in gold else None
    if members is None:
        return _equal(pred, gold, numeric_precision)
    for member in members:
        if forms.is_name(member):
            continue
        equal, reason = _equal(member, gold, numeric_precision)
        if not equal:
            return False, f"chained equality: member {member!r}: {reason}"
    return True, "chained equality: every member equals the gold answer"
