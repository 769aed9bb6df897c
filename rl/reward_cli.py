"""`looprl reward`: score completions with a reward function and show why — how a user debugs a reward.

    looprl reward --fn dapo_math --completion "... Answer: 42" --answer 42
    looprl reward --fn math_accuracy --jsonl rows.jsonl          # fields: completion, answer (or ground_truth)
    looprl reward --fn overlong_penalty --completion "..." --option max_completion_length=20 --option buffer_len=5
    looprl reward --jsonl labelled.jsonl --report [--option policy=rounded]   # + field expected: true/false

Prints, per completion, the extracted answer, the score and the verifier's reason. `--report` instead
checks the math verifier (the one behind dapo_math / math_accuracy) against an `expected` column:
agreement, then every false positive and false negative with its reason; exit code 1 when any. `completion_ids`
are one id per character here (no tokenizer is loaded), which only matters for length-based rewards.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rl.jsonl import iter_jsonl

# Built-in rewards whose score is the math verifier's verdict (rewards.math.explain tells why).
VERIFIER_FNS = ("dapo_math", "math_accuracy")


class RewardCliError(ValueError):
    """A user mistake in the command line or the JSONL file, reported on one line."""


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RewardCliError(f"--option {text!r}: expected key=value")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


# Fields of a --jsonl row that are not dataset columns; every other field reaches the function by name.
OWN_FIELDS = ("completion", "answer", "ground_truth", "expected")


def _read_jsonl(path: str, labelled: bool = False) -> list[tuple[Any, str, bool | None, int, str | None, dict]]:
    """(completion, gold, expected, line, family, columns) per row; `expected` is required when `labelled`;
    `columns` are the row's other fields (the dataset columns a reward function gets in training)."""
    from rewards.report import parse_expected

    rows = []
    for number, row in iter_jsonl(path, RewardCliError, unit="line"):
        if "completion" not in row:
            raise RewardCliError(f"{path}: line {number}: missing field 'completion'")
        gold = row.get("answer", row.get("ground_truth"))
        if gold is None:
            raise RewardCliError(f"{path}: line {number}: missing field 'answer' (or 'ground_truth')")
        completion = row["completion"]
        if not isinstance(completion, (str, list)):
            raise RewardCliError(f"{path}: line {number}: field 'completion' must be a string or a list of "
                                 f"messages, got {type(completion).__name__}")
        expected = None
        if labelled:
            if "expected" not in row:
                raise RewardCliError(f"{path}: line {number}: missing field 'expected' (needed by --report)")
            try:
                expected = parse_expected(row["expected"], f"{path}: line {number}")
            except ValueError as exc:
                raise RewardCliError(str(exc)) from None
        family = row.get("family")
        columns = {k: v for k, v in row.items() if k not in OWN_FIELDS}
        rows.append((completion, str(gold), expected, number, None if family is None else str(family), columns))
    if not rows:
        raise RewardCliError(f"{path}: no rows")
    return rows


def _columns(path: str, rows: list[dict]) -> dict[str, list]:
    """The rows' other fields as keyword lists (None where a row lacks one), as training passes columns."""
    from rewards.scoring import RESERVED_COLUMNS

    names = list(dict.fromkeys(k for row in rows for k in row))
    reserved = [n for n in names if n in RESERVED_COLUMNS]
    if reserved:
        raise RewardCliError(f"{path}: field {reserved[0]!r} has the name of a keyword passed to reward functions "
                             f"itself ({', '.join(RESERVED_COLUMNS)}); rename it")
    return {name: [row.get(name) for row in rows] for name in names}


def run_report(path: str, options: dict[str, Any], timeout: float | None) -> int:
    """`--report`: the verifier's verdicts against the `expected` column."""
    from rewards.builtin import completion_text
    from rewards.math import verify_batch
    from rewards.policy import OPTIONS, from_options
    from rewards.report import build_report, format_report

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise RewardCliError(f"--report: unknown verifier option(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(OPTIONS)}")
    policy = from_options(options, where="--report")
    rows = _read_jsonl(path, labelled=True)
    texts = []
    for completion, _, _, line, *_ in rows:
        try:
            texts.append(completion_text(completion))
        except ValueError as exc:
            raise RewardCliError(f"{path}: line {line}: field 'completion': {exc}") from None
    golds = [g for _, g, *_ in rows]
    verdicts = verify_batch(texts, golds, timeout=timeout, policy=policy)
    families = [r[4] for r in rows]
    report = build_report([r[3] for r in rows], golds, [r[2] for r in rows], verdicts,
                          families if any(f is not None for f in families) else None)
    print(format_report(report, path, f"numeric_precision={policy.numeric_precision}, "
                                      f"decimal_comma={policy.decimal_comma}, fallback={policy.fallback}"))
    return 0 if report.agree == report.total else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looprl reward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fn", default="dapo_math",
                        help="registered reward name or package.module:function (default: dapo_math)")
    parser.add_argument("--completion", help="one completion text")
    parser.add_argument("--answer", help="its gold answer")
    parser.add_argument("--jsonl", help="file of rows with 'completion' and 'answer' (or 'ground_truth')")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword for the reward function (JSON values), repeatable")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per completion: the verifier's per-item limit, and a user function's whole "
                             "call is stopped after timeout x rows")
    parser.add_argument("--list", action="store_true", help="list the registered reward functions and exit")
    parser.add_argument("--report", action="store_true",
                        help="with --jsonl: agreement of the math verifier with an 'expected' field (true/false), "
                             "false positives and false negatives with reasons; --option sets policy, "
                             "numeric_precision, decimal_comma, fallback")
    return parser


def run(args: argparse.Namespace) -> int:
    import rewards
    from rewards.builtin import completion_text
    from rewards.math import explain
    from rewards.policy import from_options

    if args.list:
        print("\n".join(rewards.available()))
        return 0
    if args.report and not args.jsonl:
        raise RewardCliError("--report needs --jsonl FILE (rows with completion, answer, expected)")
    if args.jsonl:
        if args.completion is not None or args.answer is not None:
            raise RewardCliError("give either --jsonl or --completion/--answer, not both")
        if args.report:
            return run_report(args.jsonl, dict(parse_option(o) for o in args.option), args.timeout)
        read = _read_jsonl(args.jsonl)
        rows = [(c, g) for c, g, *_ in read]
        columns = _columns(args.jsonl, [r[5] for r in read])
    elif args.completion is None or args.answer is None:
        raise RewardCliError("give --completion TEXT and --answer GOLD, or --jsonl FILE")
    else:
        rows, columns = [(args.completion, args.answer)], {}
    options = dict(parse_option(o) for o in args.option)
    rewards.check_column_clash(rewards.reward_name(args.fn), options, list(columns),
                               passed=("prompts", "completions", "completion_ids", "truncated"))  # what it passes
    fn = rewards.get(args.fn, **options)
    completions = [c for c, _ in rows]
    golds = [g for _, g in rows]
    texts = [completion_text(c) for c in completions]
    kwargs: dict[str, Any] = {**columns, "ground_truth": golds,
                              "completion_ids": [[ord(ch) for ch in t] for t in texts], "truncated": [False] * len(rows)}
    if args.timeout is not None:
        rewards.configure(timeout=args.timeout)
    # as TRL calls reward functions (by keyword, completions as assistant messages), so TRL's own
    # functions work here too; ours accept strings and messages alike
    messages = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
    from rewards.guard import RewardGuard

    # the trainer's checks (one line naming the function and the first bad row); --timeout bounds the call
    # built-ins bound themselves per item (the verifier's pool, whose start-up must not count); user code cannot
    user_code = args.fn not in rewards.available()
    guard = RewardGuard("raise", timeout=args.timeout * len(rows) if args.timeout and user_code else None, hint="")
    scores, _ = guard.score(rewards.reward_name(args.fn), fn, [None] * len(rows), messages, **kwargs)
    verifier = args.fn in VERIFIER_FNS  # only these decide by the verifier: its reason explains their score
    policy = from_options(options, where=args.fn) if verifier else None  # the reason of the policy used
    for index, (text, gold, score) in enumerate(zip(texts, golds, scores), start=1):
        prefix = f"[{index}] " if len(rows) > 1 else ""
        if not verifier:
            print(f"{prefix}gold: {gold!r}  score: {score}")
            continue
        verdict = explain(text, gold, policy=policy)
        print(f"{prefix}extracted: {verdict.extracted!r}  gold: {gold!r}  score: {score}  "
              f"reason: {verdict.reason} ({verdict.path})")
    if len(rows) > 1:
        valid = [s for s in scores if s is not None]
        mean = sum(valid) / len(valid) if valid else float("nan")
        print(f"{len(rows)} rows, mean score {mean:.4f}, {rewards.counters()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:  # RewardCliError, UnknownRewardError, bad reward options
        print(f"looprl reward: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
