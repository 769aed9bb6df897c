"""Which column of a dataset row holds the gold answer, and what the answer is.

The one rule, shared by the data loader (rl/data.py stores the result as the `ground_truth` column) and
the built-in math rewards (`dapo_math`, `math_accuracy`, also when TRL calls them with its columns).
The column: the first of these that is present (not None) wins:
`reward_model.ground_truth` (DAPO / verl schema), `ground_truth`, `answer`, `solution` (TRL / open-r1 / MATH).

The answer in it, read the same way for every column (a worked solution is never used verbatim: scoring
every completion against a paragraph gives each the lowest reward while the run looks healthy):
- a GSM8K-style `#### 42` marks the answer: the text after the last `####`;
- else a `\\boxed{}`: the last one's content (all boxes on its line);
- else a single line is the answer as it is; in `solution`, only when it is a bare answer (at most
  `BARE_ANSWER_CHARS` characters and `BARE_ANSWER_WORDS` words: `42`, `\\frac{1}{2}`, `x = 3`, `Monday`);
- anything else (several lines, or a sentence in `solution`) is refused: GoldError names the column.

Why `solution` last, though TRL's accuracy_reward reads it: MATH-style files hold both a worked
`solution` and the short `answer`, and the short one is the gold. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.math import boxed_answer

GOLD_COLUMNS = ("ground_truth", "answer", "solution")
BARE_ANSWER_CHARS = 100
BARE_ANSWER_WORDS = 3
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # LaTeX commands (\frac, \text) are not words
_GSM8K = re.compile(r"^####\s*(\S.*)$", re.MULTILINE)


class GoldError(ValueError):
    """No usable gold answer; `field` is the column at fault, the message says what is wrong with it."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"field {field!r} {problem}")


def gold_from_text(value: Any, column: str) -> Any:
    """The gold answer held by one value of `column` (see the module doc); GoldError when there is none."""
    if not isinstance(value, str):
        return value  # a number, or a wrong type that the caller reports
    text = value.strip()
    marked = _GSM8K.findall(text)
    if marked:
        return marked[-1].strip()
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed
    if "\n" in text:
        raise GoldError(column, f"is a worked solution ({text.count(chr(10)) + 1} lines) with no \\boxed{{}} or "
                                "'#### ' answer, so it cannot be the gold answer; give the bare answer in an "
                                "'answer' (or 'ground_truth') column")
    if column == "solution" and (len(text) > BARE_ANSWER_CHARS or len(_WORD.findall(text)) > BARE_ANSWER_WORDS):
        raise GoldError(column, "is a worked solution (a sentence) with no \\boxed{} answer, so it cannot be the "
                                "gold answer; give the bare answer in an 'answer' (or 'ground_truth') column")
    return text


def gold_answer(row: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(gold answer, the field it came from) of one row, None when no column holds one; GoldError when
    the column found holds no answer (a worked solution without a boxed one)."""
    reward_model = row.get("reward_model")
    if isinstance(reward_model, Mapping) and reward_model.get("ground_truth") is not None:
        return gold_from_text(reward_model["ground_truth"], "reward_model.ground_truth"), "reward_model.ground_truth"
    for column in GOLD_COLUMNS:
        if row.get(column) is not None:
            return gold_from_text(row[column], column), column
    return None


def gold_column(fn_name: str, n: int, kwargs: Mapping[str, Any]) -> list[str]:
    """The gold answers of `n` completions from a reward function's keyword lists (TRL's convention),
    by the same rule; ValueError naming the function, column and sample otherwise."""
    for column in GOLD_COLUMNS:
        if kwargs.get(column) is None:
            continue
        golds = kwargs[column]
        if isinstance(golds, (str, bytes)) or not isinstance(golds, Sequence):
            raise ValueError(f"{fn_name}: column {column!r} must be a list (one per completion), "
                             f"got {type(golds).__name__}")
        if len(golds) != n:
            raise ValueError(f"{fn_name}: {n} completions but {len(golds)} values in column {column!r}")
        out = []
        for j, value in enumerate(golds):
            try:
                out.append(str(gold_from_text(value, column)))
            except GoldError as e:
                raise ValueError(f"{fn_name}: sample {j}: {e}") from None
        return out
    raise ValueError(f"{fn_name}: needs the gold answers as a keyword list named one of {', '.join(GOLD_COLUMNS)}; "
                     f"got keywords: {', '.join(sorted(kwargs)) or 'none'}")
