"""Answer shapes that need more than one regex: matrices, relations, chains, lists of assignments,
units, rounded decimals. Pure string work (no sympy), so `rewards.math` can use it on the fast path.

Why a module of its own: each helper turns one family of equivalent notations into one canonical
form (or says "not this shape" with None), and the fast path decides from those forms before any
worker is asked. Every helper is conservative: when a form is ambiguous it is left alone, and the
symbolic checker (or a plain "not equal") decides.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

# ------------------------------------------------------------------------------------------ matrices

_MATRIX_ENV = re.compile(
    r"(?:\\left\s*[(\[]\s*)?\\begin\{(pmatrix|bmatrix|Bmatrix|smallmatrix|matrix|array)\}(\{[^{}]*\})?(.*?)"
    r"\\end\{\1\}(?:\s*\\right\s*[)\]])?",
    re.DOTALL)


def canonical_matrices(s: str) -> str:
    """`bmatrix`, `Bmatrix`, `smallmatrix`, `\\left[\\begin{array}{cc}..\\end{array}\\right]`,
    `\\left(\\begin{matrix}..\\right)` all become `\\begin{pmatrix}..\\end{pmatrix}` (the delimiters carry
    no meaning for a matrix answer). `vmatrix` (a determinant) is left alone on purpose."""
    if "\\begin{" not in s:
        return s
    return _MATRIX_ENV.sub(lambda m: "\\begin{pmatrix}" + m.group(3).strip() + "\\end{pmatrix}", s)


_PMATRIX = re.compile(r"\\begin\{pmatrix\}(.*?)\\end\{pmatrix\}", re.DOTALL)


def matrix_cells(s: str) -> list[list[str]] | None:
    """Rows of cells of an answer that is exactly one pmatrix, else None."""
    match = _PMATRIX.fullmatch(s.strip())
    if not match or "\\begin" in match.group(1):
        return None
    rows = [row for row in re.split(r"\\\\", match.group(1)) if row.strip()]
    return [[cell.strip() for cell in row.split("&")] for row in rows] or None


# ----------------------------------------------------------------------------------------- relations

_RELATIONS = [(re.compile(p), r) for p, r in (
    (r"\\geqslant|\\geq|\\ge(?![a-z])|>=|≥", r" \\ge "),
    (r"\\leqslant|\\leq|\\le(?![a-z])|<=|≤", r" \\le "),
    (r"\\neq|\\ne(?![a-z])|!=|≠", r" \\neq "),
    (r"\\gt(?![a-z])", " > "),
    (r"\\lt(?![a-z])", " < "),
)]
_ANY_RELATION = re.compile(r"\\ge |\\le |\\neq |<|>")


def canonical_relations(s: str) -> str:
    """One spelling per relation: `\\geq`, `\\geqslant`, `>=`, `≥` -> `\\ge`; `\\lt` -> `<`; `!=` -> `\\neq`."""
    if not re.search(r"[<>=!≥≤≠]|\\[lgn]", s):
        return s
    for pattern, replacement in _RELATIONS:
        s = pattern.sub(replacement, s)
    return " ".join(s.split())


def has_relation(s: str) -> bool:
    return bool(_ANY_RELATION.search(s))


_OR = re.compile(r"\s*,?\s*(?<![A-Za-z\\])or(?![A-Za-z])\s*")
_BOUND = r"([^<>=,;]+?)"
_VAR_FIRST = re.compile(rf"\s*([A-Za-z])\s*(<|>|\\le|\\ge|\\neq)\s*{_BOUND}\s*")
_VAR_LAST = re.compile(rf"\s*{_BOUND}\s*(<|>|\\le|\\ge)\s*([A-Za-z])\s*")
_VAR_MIDDLE = re.compile(rf"\s*{_BOUND}\s*(<|>|\\le|\\ge)\s*([A-Za-z])\s*(<|>|\\le|\\ge)\s*{_BOUND}\s*")
_OPEN, _CLOSED = {"<": "(", ">": "(", "\\le": "[", "\\ge": "["}, {"<": ")", ">": ")", "\\le": "]", "\\ge": "]"}


def _relation_interval(member: str) -> tuple[str, str] | None:
    """(variable, interval) of one simple inequality in canonical spelling: `x < 2` -> (-\\infty, 2),
    `2 \\le x` -> [2, \\infty), `-1 < x \\le 3` -> (-1, 3], `x \\neq 2` -> (-\\infty, 2) \\cup (2, \\infty)."""
    if match := _VAR_MIDDLE.fullmatch(member):
        low, op1, var, op2, high = match.groups()
        if {op1, op2} <= {"<", "\\le"}:
            return var, f"{_OPEN[op1]}{low}, {high}{_CLOSED[op2]}"
        if {op1, op2} <= {">", "\\ge"}:  # 3 > x > -1
            return var, f"{_OPEN[op2]}{high}, {low}{_CLOSED[op1]}"
        return None
    if match := _VAR_FIRST.fullmatch(member):
        var, op, bound = match.groups()
    elif match := _VAR_LAST.fullmatch(member):  # `2 < x` is `x > 2`
        bound, op, var = match.groups()
        op = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le"}[op]
    else:
        return None
    if _has_letters(bound) and not re.fullmatch(r"[^A-Za-z]*\\pi[^A-Za-z]*", bound):
        return None  # `x < y` relates two unknowns: not an interval of x
    if op == "\\neq":
        return var, f"(-\\infty, {bound}) \\cup ({bound}, \\infty)"
    if op in ("<", "\\le"):
        return var, f"(-\\infty, {bound}{_CLOSED[op]}"
    return var, f"{_OPEN[op]}{bound}, \\infty)"


def or_relations_to_union(s: str) -> str:
    """`x < -1 or x > 2` -> `(-\\infty, -1) \\cup (2, \\infty)`: inequalities of ONE variable joined by
    "or" are the union of their intervals (the gold often writes that union). Anything else (an `=`,
    two variables, "and") is left alone."""
    if not re.search(r"(?<![A-Za-z\\])or(?![A-Za-z])", s) or not has_relation(s):
        return s
    parts = [_relation_interval(member) for member in _OR.split(s)]
    if any(part is None for part in parts) or len({var for var, _ in parts}) != 1:  # type: ignore[misc]
        return s
    return " \\cup ".join(interval for _, interval in parts)  # type: ignore[misc]


# ------------------------------------------------------------------------ chains, lists, assignments

_VARIABLE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?|\\[a-zA-Z]+(?:_\{?\w+\}?)?")


def _depth_split(s: str, sep: str) -> list[str]:
    """Split on `sep` outside (), [], {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def is_variable(s: str) -> bool:
    return bool(_VARIABLE.fullmatch(s.strip()))


_FUNCTION_VALUE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*\([^()=]*\)")


def is_name(s: str) -> bool:
    """What a chain may start with: a variable (`x`) or a function value (`f(2)`, `P(A)`)."""
    return is_variable(s) or bool(_FUNCTION_VALUE.fullmatch(s.strip()))


def chain_members(s: str) -> list[str] | None:
    """Members of `x = 5+5+1 = 11` (None unless: two or more members, no relation or list, the first
    member a name (`x`, `f(2)`) or letter-free, the others letter-free). The last member is the value."""
    if "=" not in s or has_relation(s) or len(_depth_split(s, ",")) > 1 or ";" in s:
        return None
    members = [m.strip() for m in s.split("=")]
    if len(members) < 2 or not all(members):
        return None
    first, rest = members[0], members[1:]
    if not (is_name(first) or not _has_letters(first)) or any(_has_letters(m) for m in rest):
        return None
    return members


def _has_letters(s: str) -> bool:
    """Letters other than LaTeX commands for numbers (`\\frac`, `\\sqrt`, `\\cdot`, `\\pi` keeps letters)."""
    stripped = re.sub(r"\\(?:frac|dfrac|tfrac|sqrt|cdot|times|div|left|right)(?![A-Za-z])", "", s)
    return bool(re.search(r"[A-Za-z]", stripped))


def assignment_list_values(s: str) -> str | None:
    """`p=-1, p=\\frac{15}{8}` -> `-1, \\frac{15}{8}` when every member assigns the SAME variable (the
    solutions of one unknown); None otherwise (`x=1, y=2` is a point, not a list of values)."""
    if s.count("=") < 2 or has_relation(s):
        return None
    members = [m.strip() for m in _depth_split(s, ",")]
    if len(members) < 2:
        return None
    names, values = set(), []
    for member in members:
        lhs, sep, rhs = member.partition("=")
        if not sep or "=" in rhs or not is_variable(lhs) or not rhs.strip():
            return None
        names.add(lhs.strip())
        values.append(rhs.strip())
    return ", ".join(values) if len(names) == 1 else None


_AND = re.compile(r"\s*,?\s*(?<![A-Za-z\\])(?:and|or)(?![A-Za-z])\s*,?\s*")


def assignment_point(s: str) -> str | None:
    """`x=2, y=3` -> `(2, 3)`: distinct single-letter variables, written in alphabetical order (the
    order an ordered-pair gold uses); None otherwise, so `y=2, x=3` is never read as (2, 3)."""
    members = [m.strip() for m in _depth_split(s, ",")]
    if len(members) < 2 or has_relation(s):
        return None
    names, values = [], []
    for member in members:
        lhs, sep, rhs = member.partition("=")
        if not sep or "=" in rhs or not re.fullmatch(r"\s*[A-Za-z]\s*", lhs) or not rhs.strip():
            return None
        names.append(lhs.strip())
        values.append(rhs.strip())
    if len(set(names)) != len(names) or names != sorted(names):
        return None
    return "(" + ", ".join(values) + ")"


def and_to_comma(s: str) -> str:
    """`a and b`, `x = 3 or x = -3` -> a list `a, b` (the `\\text{}` around the word is already gone),
    only in math-looking answers; a list never matches a single gold answer."""
    if not re.search(r"(?<![A-Za-z\\])(?:and|or)(?![A-Za-z])", s) or not re.search(r"[\d=\\]", s):
        return s
    return _AND.sub(", ", s).strip(" ,")  # `4, 9, and 12` -> `4, 9, 12`: never an empty item


def _is_set(s: str) -> bool:
    return s.startswith("\\{") and s.endswith("\\}")


def _is_bracketed_pair(s: str) -> bool:
    return s[:1] in "([" and s[-1:] in ")]" and len(_depth_split(s[1:-1], ",")) > 1


def set_vs_tuple(p: str, g: str) -> bool:
    """One side a set `\\{..\\}`, the other a tuple or interval `(..)` / `[..]`: never equal."""
    return (_is_set(p) and _is_bracketed_pair(g)) or (_is_set(g) and _is_bracketed_pair(p))


def top_level_items(s: str) -> list[str]:
    return [m.strip() for m in _depth_split(s, ",")]


# --------------------------------------------------------------------------------------------- units

_UNIT_ALIASES = {
    "m": "m", "meter": "m", "meters": "m", "metre": "m", "metres": "m",
    "cm": "cm", "centimeter": "cm", "centimeters": "cm", "centimetre": "cm", "centimetres": "cm",
    "mm": "mm", "millimeter": "mm", "millimeters": "mm", "km": "km", "kilometer": "km", "kilometers": "km",
    "kilometre": "km", "kilometres": "km", "ft": "ft", "foot": "ft", "feet": "ft", "in": "in", "inch": "in",
    "inches": "in", "yd": "yd", "yard": "yd", "yards": "yd", "mile": "mi", "miles": "mi", "mi": "mi",
    "s": "s", "sec": "s", "second": "s", "seconds": "s", "min": "min", "minute": "min", "minutes": "min",
    "h": "h", "hr": "h", "hrs": "h", "hour": "h", "hours": "h", "day": "day", "days": "day", "year": "yr",
    "years": "yr", "g": "g", "gm": "g", "gram": "g", "grams": "g", "kg": "kg", "kilogram": "kg",
    "kilograms": "kg", "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb", "oz": "oz", "ounce": "oz",
    "ounces": "oz", "ml": "ml", "liter": "l", "liters": "l", "litre": "l", "litres": "l", "dollar": "$",
    "dollars": "$", "cent": "cent", "cents": "cent", "degree": "deg", "degrees": "deg", "rad": "rad",
    "radian": "rad", "radians": "rad", "mph": "mph",
}
_UNIT_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+(?![A-Za-z])")
_UNIT_WRAPPED = re.compile(r"\\(?:text|textnormal|textrm|textup|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")


@functools.lru_cache(maxsize=65536)
def unit_signature(answer: str) -> frozenset[str]:
    """Units of measure written in an answer (`5\\text{ cm}^2` -> {cm}, `30^\\circ` -> {deg}, `\\$5` -> {$}); counting
    words (`ways`, `units`, `square`) carry no magnitude and are ignored. Used to reject `5 km` for
    `5 m` although both normalise to `5`."""
    if not re.search(r"[A-Za-z°$]|\\circ", answer):
        return frozenset()
    found = set()
    if re.search(r"\\circ|°|\\degree", answer):
        found.add("deg")
    if "\\$" in answer:
        found.add("$")
    texts = _UNIT_WRAPPED.findall(answer)
    bare = _UNIT_WRAPPED.sub(" ", answer)
    # bare trailing words only (`5 cm`); a single letter inside math is a variable, not a unit
    tail = re.search(r"\d[\d.,]*\s*((?:[A-Za-z]+\s*)+)\.?$", bare)
    for chunk in [*texts, tail.group(1) if tail else ""]:
        for word in _UNIT_WORD.findall(chunk):
            unit = _UNIT_ALIASES.get(word.lower()) if len(word) > 1 or chunk in texts else None
            if unit:
                found.add(unit)
    return frozenset(found)


# ---------------------------------------------------------------------------------- rounded decimals

_DECIMAL = re.compile(r"[+-]?(\d*)\.(\d+)")


def decimal_places(s: str) -> int | None:
    """Places after the point of a plain decimal (`2.6667` -> 4), else None (integers, fractions)."""
    match = _DECIMAL.fullmatch(s.strip())
    return len(match.group(2)) if match else None


def significant_digits(s: str) -> int:
    digits = re.sub(r"\D", "", s).lstrip("0")
    return len(digits)


def round_half_up(value: Fraction, places: int) -> Fraction:
    scale = 10 ** places
    scaled = abs(value) * scale
    rounded = Fraction(int(scaled + Fraction(1, 2)), scale)
    return rounded if value >= 0 else -rounded


def rounded_match(decimal: str, value: Fraction, max_places: int) -> bool:
    """Does the exact `value` round to the written `decimal` at the decimal's own number of places
    (capped at `max_places` unless the cap would leave fewer than three significant digits: a tiny
    `0.00000150` is compared at its 8 places, not as `0.000002` with every value near 2e-6)? Needs
    three significant digits, so `0.3` never stands for 1/3."""
    own = decimal_places(decimal)
    if own is None or significant_digits(decimal) < 3:
        return False
    written = Fraction(decimal.strip())
    places = min(own, max_places)
    if significant_digits(str(round_half_up(written, places) * 10 ** places)) < 3:
        places = own
    return round_half_up(written, places) == round_half_up(value, places)


_DECIMAL_COMMA = re.compile(r"([+-]?\d+),(\d{1,2}|\d{4,})")


def decimal_comma_to_point(s: str) -> str:
    """`1,22` -> `1.22` (a comma followed by other than exactly three digits); `1,222` stays thousands."""
    match = _DECIMAL_COMMA.fullmatch(s.strip())
    return f"{match.group(1)}.{match.group(2)}" if match else s


# ----------------------------------------------------------------------------- exact plain numbers
# (here, not in rewards/math.py, so that rewards/symbolic.py reads them without importing math.py)

_INT_OR_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_REPEATING = re.compile(r"([+-]?)(\d*)\.(\d*)\\overline\{(\d+)\}")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac\s*(?:\{\s*([+-]?\d+)\s*\}|(\d))\s*(?:\{\s*([+-]?\d+)\s*\}|(\d))")


def parse_literal(s: str) -> Fraction | None:
    """Exact value of a plain number (`-12`, `007`, `34.0`, `.5`, `3/4`, `\\frac{3}{4}`, `\\frac34`,
    `0.\\overline{3}`)."""
    s = s.strip()
    if not s or len(s) > 60:
        return None
    try:
        if _INT_OR_DECIMAL.fullmatch(s):
            return Fraction(s)
        if match := _SLASH_FRACTION.fullmatch(s):
            return Fraction(int(match.group(1)), int(match.group(2)))
        if match := _REPEATING.fullmatch(s):  # 0.1\overline{6} = 1/6
            sign, whole, fixed, repeat = match.groups()
            value = int(whole or 0) + (Fraction(int(fixed or 0)) + Fraction(int(repeat), 10 ** len(repeat) - 1)) \
                / 10 ** len(fixed)
            return -value if sign == "-" else value
        if match := _LATEX_FRACTION.fullmatch(s):
            sign = -1 if match.group(1) == "-" else 1
            return sign * Fraction(int(match.group(2) or match.group(3)), int(match.group(4) or match.group(5)))
    except (ValueError, ZeroDivisionError):
        return None
    return None
