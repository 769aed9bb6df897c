"""The expensive half of verification: math-verify + sympy on two normalised answer strings.

Runs inside the worker processes of `rewards.pool` (which enforce the hard time limit), or inline for
benchmarks. math-verify's own signal timeouts are switched off here: they only work on a main thread,
and the pool kills a stuck worker anyway. Returns (equal, reason); never trusts a partial parse.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.math import parse_literal

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings on every call

_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
_DIGITS = re.compile(r"\d+")


def _parse(answer: str) -> list:
    return parse(f"${answer}$", extraction_config=_CONFIG, parsing_timeout=None)


def _covers_all_numbers(answer: str, parsed_text: str) -> bool:
    """math-verify may parse only a prefix (`3 apples 5` -> 3); every number must survive."""
    # Digit characters in order: math-verify rewrites `\\frac12` as `\\frac{1}{2}`, never reorders digits.
    return "".join(_DIGITS.findall(answer)) == "".join(_DIGITS.findall(parsed_text))


def _exact_vs_literal(literal: Fraction, expr: sympy.Basic) -> tuple[bool, str] | None:
    """A plain number against a sympy value: exact when the value is rational, never equal to an
    irrational one (3.141593 is not pi). None when the value is not a number (sets, equations, ...)."""
    if not isinstance(expr, sympy.Expr) or not expr.is_number:
        return None
    if expr.is_rational is False or expr.is_real is False:
        return False, "a plain number cannot equal an irrational/complex value"
    if expr.is_rational:
        equal = sympy.simplify(expr - sympy.Rational(literal.numerator, literal.denominator)) == 0
        return bool(equal), "exact rational comparison"
    return None


def symbolic_equal(pred: str, gold: str) -> tuple[bool, str]:
    """Is the normalised predicted answer mathematically equal to the normalised gold answer?"""
    gold_parsed = _parse(gold)
    if not gold_parsed:
        return False, f"math-verify could not parse the gold answer {gold!r}"
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False, "math-verify could not parse the answer"
    if not _covers_all_numbers(pred, str(pred_parsed[-1])):
        return False, f"only part of the answer parsed ({pred_parsed[-1]!r})"
    for literal, other in ((parse_literal(pred), gold_parsed[0]), (parse_literal(gold), pred_parsed[0])):
        if literal is not None:
            decided = _exact_vs_literal(literal, other)
            if decided is not None:
                return decided
    equal = verify(gold_parsed, pred_parsed, timeout_seconds=None)
    return bool(equal), "math-verify: equivalent" if equal else "math-verify: not equivalent"
