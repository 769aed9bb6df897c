"""Verifier options: how strict a math answer check is, as one small frozen value.

Why an option at all: whether `0.0833` may stand for `\\frac{1}{12}` is not a property of the verifier
but of the data set. Competition sets state exact answers (a rounded decimal is a different answer),
while numeric or applied sets give rounded golds. So the choice is made by the user, per reward
function (`reward_kwargs: {dapo_math: {policy: rounded}}`), and the default stays exact.

Presets:
- "exact" (default; use for DAPO-Math-17K, MATH-500, AIME, AMC): numbers compare as exact fractions,
  `0.0833333333 != \\frac{1}{12}`, a decimal never equals an irrational value, `1,22` is the list 1, 22.
- "rounded" (math-verify-like, for sets whose golds are rounded decimals): a decimal with at least
  three significant digits matches a value that rounds to it at the decimal's own number of places (at
  most `numeric_precision`, 6 like math-verify's float_rounding): `0.0833 == \\frac{1}{12}`,
  `(0.6, 2.6667] == (\\frac35, \\frac83]`, `3.1416 == \\pi`; and a decimal comma is read as a point
  (`1,22 == 1.22`; `1,222` stays the thousands-separated 1222).

`fallback` is separate from both: "last_math" (default, like math-verify) takes the last `$...$` /
`\\[...\\]` of a response that has neither an `Answer:` line nor a `\\boxed{}`; "none" scores such a
response as having no answer (stricter format discipline); an explicit "the answer is 23" counts under both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Policy", "PRESETS", "OPTIONS", "resolve", "from_options"]

FALLBACKS = ("last_math", "none")
OPTIONS = ("policy", "numeric_precision", "decimal_comma", "fallback")  # the keywords of dapo_math / math_accuracy


@dataclass(frozen=True)
class Policy:
    """numeric_precision None: exact numbers; an int N: rounded decimals compared at up to N places."""

    numeric_precision: int | None = None
    decimal_comma: bool = False
    fallback: str = "last_math"


PRESETS = {"exact": Policy(), "rounded": Policy(numeric_precision=6, decimal_comma=True)}


def resolve(policy: str | Policy | None = None, *, numeric_precision: int | None | str = "preset",
            decimal_comma: bool | None = None, fallback: str | None = None, where: str = "verifier") -> Policy:
    """A Policy from a preset name (or a Policy) plus individual overrides; bad values raise one line
    naming `where` (the reward function) and the option."""
    if policy is None:
        base = PRESETS["exact"]
    elif isinstance(policy, Policy):
        base = policy
    elif isinstance(policy, str) and policy in PRESETS:
        base = PRESETS[policy]
    else:
        raise ValueError(f"{where}: policy must be one of {', '.join(map(repr, PRESETS))}, got {policy!r}")
    changes: dict = {}
    if numeric_precision != "preset":
        if numeric_precision is not None and (isinstance(numeric_precision, bool)
                                              or not isinstance(numeric_precision, int)
                                              or not 1 <= numeric_precision <= 15):
            raise ValueError(f"{where}: numeric_precision must be null (exact) or an int in 1..15, "
                             f"got {numeric_precision!r}")
        changes["numeric_precision"] = numeric_precision
    if decimal_comma is not None:
        if not isinstance(decimal_comma, bool):
            raise ValueError(f"{where}: decimal_comma must be true or false, got {decimal_comma!r}")
        changes["decimal_comma"] = decimal_comma
    if fallback is not None:
        if fallback not in FALLBACKS:
            raise ValueError(f"{where}: fallback must be one of {', '.join(map(repr, FALLBACKS))}, got {fallback!r}")
        changes["fallback"] = fallback
    return replace(base, **changes) if changes else base


def from_options(options: dict, where: str = "verifier") -> Policy:
    """The Policy that a verifier reward function called with these keyword options checks with (keys
    other than OPTIONS are ignored): how `looprl eval` groups maj@k votes like its accuracy function."""
    return resolve(options.get("policy"), numeric_precision=options.get("numeric_precision", "preset"),
                   decimal_comma=options.get("decimal_comma"), fallback=options.get("fallback"), where=where)
