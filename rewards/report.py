"""Verifier report: how often the math verifier agrees with labelled (completion, gold, expected) rows.

Why: a false negative in RL is lost signal and a false positive is a reward the model learns to farm.
Before a long run a user can label a few hundred of their own outputs and see both kinds, each with the
extracted answer and the verifier's reason (`looprl reward --jsonl FILE --report`). Pure Python here;
the command line lives in `rl/reward_cli.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.math import Verdict

_TRUE = {"true", "1", "yes", "correct"}
_FALSE = {"false", "0", "no", "wrong", "incorrect"}


def parse_expected(value: Any, where: str) -> bool:
    """The `expected` label as a bool: true/false, 1/0 or those words as strings; else a one-line error
    that starts with `where` (file and line)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: field 'expected' must be true/false (or 1/0), got {value!r}")


@dataclass
class Disagreement:
    line: int
    gold: str
    verdict: Verdict
    group: str | None


@dataclass
class Report:
    """Counts and the rows the verifier got wrong, in file order."""

    total: int = 0
    agree: int = 0
    false_positives: list[Disagreement] = field(default_factory=list)
    false_negatives: list[Disagreement] = field(default_factory=list)
    paths: Counter = field(default_factory=Counter)
    groups: dict[str, list[int]] = field(default_factory=dict)  # group -> [agree, total]


def build_report(lines: Sequence[int], golds: Sequence[str], expected: Sequence[bool], verdicts: Sequence[Verdict],
                 groups: Sequence[str | None] | None = None) -> Report:
    """Compare verdicts with the labels; `groups` (a `family` column, say) adds a per-group breakdown."""
    groups = groups if groups is not None else [None] * len(verdicts)
    report = Report(total=len(verdicts))
    for line, gold, label, verdict, group in zip(lines, golds, expected, verdicts, groups):
        report.paths[verdict.path] += 1
        if group is not None:
            report.groups.setdefault(group, [0, 0])[1] += 1
        if verdict.correct == label:
            report.agree += 1
            if group is not None:
                report.groups[group][0] += 1
        elif verdict.correct:
            report.false_positives.append(Disagreement(line, gold, verdict, group))
        else:
            report.false_negatives.append(Disagreement(line, gold, verdict, group))
    return report


def _describe(d: Disagreement) -> str:
    group = f" [{d.group}]" if d.group else ""
    return (f"  line {d.line}{group}: extracted {d.verdict.extracted!r}, gold {d.gold!r}: "
            f"{d.verdict.reason} ({d.verdict.path})")


def format_report(report: Report, source: str, policy_text: str) -> str:
    pct = 100.0 * report.agree / report.total if report.total else 0.0
    out = [f"verifier report for {source} ({policy_text})",
           f"agreement with 'expected': {report.agree}/{report.total} ({pct:.1f} %)",
           f"false positives (scored correct, labelled wrong): {len(report.false_positives)}"]
    out += [_describe(d) for d in report.false_positives]
    out.append(f"false negatives (scored wrong, labelled correct): {len(report.false_negatives)}")
    out += [_describe(d) for d in report.false_negatives]
    if report.groups:
        out.append("by " + ", ".join(f"{g}: {a}/{t}" for g, (a, t) in sorted(report.groups.items())))
    out.append("decided by: " + ", ".join(f"{k} {v}" for k, v in sorted(report.paths.items())))
    return "\n".join(out)
