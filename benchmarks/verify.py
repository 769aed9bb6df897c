"""Completions verified per second: looprl's verifier (fast path + worker pool) vs inline vs plain math-verify.

    python benchmarks/verify.py [--n 1000] [--batch 128] [--workers 2] [--seed 0] [--repeats 1] [--sets short,mixed]
    python benchmarks/verify.py --against DIR [--repeats 3] [--changed-verdicts]    # old code vs this code

Two sets of `n` generated, realistic responses (a few lines of working, then a final answer in the
formats models actually use: `Answer: 42`, `**Answer:** $42$`, `\\boxed{}`, `Answer: $42`, ...):
- short: DAPO-Math-17K-like integer golds (the embedded arith task is the same shape);
- mixed: MATH-500-like golds (fractions, roots, pi, intervals, tuples), written in equivalent forms.
Baseline: math-verify parse + verify of every full response in-process (what a naive reward does).
Scored in batches of `--batch`, as the trainer does once per step; caches are cleared before each run.
`--repeats R` keeps the best of R runs of each looprl row (the baseline runs once); `cpu s` is this
process's CPU time, which on a shared machine moves less than wall time (for the pool rows it leaves
out the workers).

`--against DIR` compares the verifier of another checkout (DIR holds its `rewards/`, e.g. an export of
an older commit: `git archive <commit> | tar -x -C DIR`) with this one in ONE run: each side runs the
looprl rows in its own child process (PYTHONPATH = that root, this script), alternating old/new for
`--repeats` rounds; the table gives CPU seconds per 1,000 answers (best of the rounds; pool rows add the
workers' CPU from /proc where available) and how many verdicts differ on the generated sets.
`--changed-verdicts` also judges every labelled pair of the repo (tests/data/verifier_cases*.jsonl and
EQUIVALENT / NOT_EQUIVALENT of tests/test_rewards.py) with both and lists each changed verdict.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FILLER = ["First, let us restate the problem in our own words.", "We compute the relevant quantities step by step.",
          "Substituting the values gives the expression below.", "Simplifying, we collect like terms.",
          "Checking the boundary cases confirms the count.", "By symmetry the two cases contribute equally."]
INT_FORMATS = ["Answer: {a}", "**Answer:** {a}", "Answer: ${a}$", "Answer: \\boxed{{{a}}}", "Answer: {a}.",
               "Answer: ${a}", "The final answer is \\boxed{{{a}}}.", "**Answer**: $\\boxed{{{a}}}$"]


def _working(rng: random.Random) -> str:
    lines = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    lines += [f"${rng.randint(2, 99)} \\times {rng.randint(2, 99)} = {rng.randint(100, 9999)}$"
              for _ in range(rng.randint(1, 3))]
    return "\n".join(lines)


def short_set(n: int, rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(n):
        gold = rng.randint(-50, 2000)
        roll = rng.random()
        pred = gold if roll < 0.6 else gold + rng.choice([-10, -1, 1, 2, 100])
        text = f"{pred:,}" if abs(pred) >= 1000 and rng.random() < 0.3 else str(pred)
        final = "" if roll > 0.95 else rng.choice(INT_FORMATS).format(a=text)
        pairs.append((f"{_working(rng)}\n{final}", str(gold)))
    return pairs


def _mixed_item(rng: random.Random) -> tuple[str, str, str]:
    """(gold, an equivalent written form, a wrong form)."""
    a, b, k = rng.randint(1, 20), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.randrange(7)
    if kind == 0:
        return f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a * k}}}{{{b * k}}}", f"\\frac{{{a + 1}}}{{{b}}}"
    if kind == 1:
        return f"{k}\\sqrt{{{b}}}", f"\\sqrt{{{k * k * b}}}", f"{k + 1}\\sqrt{{{b}}}"
    if kind == 2:
        return f"\\frac{{{a}\\pi}}{{{b}}}", f"\\frac{{{a}}}{{{b}}}\\pi", f"\\frac{{{a}\\pi}}{{{b + 1}}}"
    if kind == 3:
        return f"[{a}, {a + b})", f"[{a},{a + b})", f"({a}, {a + b})"
    if kind == 4:
        return f"({a}, {b})", f"\\left( {a}, {b} \\right)", f"({b}, {a})"
    if kind == 5:
        return f"{a}/{b}", f"{a / b:.10g}" if (b in (2, 4, 5, 8, 10, 16, 20)) else f"\\frac{{{a}}}{{{b}}}", f"{a}/{b + 1}"
    return f"x^2 + {2 * a}x + {a * a}", f"(x + {a})^2", f"(x + {a + 1})^2"


def mixed_set(n: int, rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(n):
        gold, right, wrong = _mixed_item(rng)
        pred = right if rng.random() < 0.6 else wrong
        final = rng.choice(["Answer: ${p}$", "**Answer:** $\\boxed{{{p}}}$", "Therefore the answer is $\\boxed{{{p}}}$."])
        pairs.append((f"{_working(rng)}\n{final.format(p=pred)}", gold))
    return pairs


def run_looprl(pairs: list[tuple[str, str]], batch: int, inline: bool) -> list[bool]:
    from rewards.math import verify_batch

    out: list[bool] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        out += [v.correct for v in verify_batch([r for r, _ in chunk], [g for _, g in chunk], timeout=10,
                                                inline=inline)]
    return out


def run_math_verify_only(pairs: list[tuple[str, str]]) -> list[bool]:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return [bool(verify(parse(f"${g}$", parsing_timeout=None), parse(r, parsing_timeout=None), timeout_seconds=None))
            for r, g in pairs]


def clear_caches() -> None:
    import rewards.math

    rewards.math._CACHE.clear()
    rewards.math.normalize_answer.cache_clear()


def timed(fn: Callable[[], list[bool]], repeats: int = 1) -> tuple[float, float, list[bool]]:
    """(wall s, CPU s, verdicts) of the fastest of `repeats` runs, caches cleared before each."""
    best: tuple[float, float, list[bool]] | None = None
    for _ in range(repeats):
        clear_caches()
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        run = (time.perf_counter() - start, time.process_time() - cpu, result)
        best = run if best is None or run[0] < best[0] else best
    assert best is not None
    return best


def _workers_cpu() -> float | None:
    """CPU seconds used so far by the verifier's worker processes (Linux /proc), else None."""
    import rewards.math

    total = 0.0
    for worker in getattr(rewards.math.get_pool(), "_workers", None) or []:
        try:
            fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _child_speed(args: argparse.Namespace) -> None:
    """One side of `--against`: the looprl rows only, as JSON on stdout."""
    import rewards
    import rewards.math

    rewards.configure(workers=args.workers)
    rewards.math.get_pool().map("rewards.symbolic:symbolic_equal", [("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}")]
                                * args.workers, timeout=60)
    rng = random.Random(args.seed)
    sets = {"short": short_set(args.n, rng), "mixed": mixed_set(args.n, rng)}
    out = {}
    for name in args.sets.split(","):
        pairs = sets[name]
        _, inline_cpu, inline = timed(lambda p=pairs: run_looprl(p, args.batch, inline=True))
        before = _workers_cpu()
        _, pool_cpu, pooled = timed(lambda p=pairs: run_looprl(p, args.batch, inline=False))
        after = _workers_cpu()
        workers = None if before is None or after is None else after - before
        out[name] = {"inline": [inline_cpu, inline], "pool": [pool_cpu, workers, pooled]}
    rewards.shutdown()
    print(json.dumps(out))


def labelled_pairs() -> list[dict]:
    """Every labelled (response, gold, expected) pair of the repo, with the policy it is judged under."""
    rows = []
    for name, policy in (("verifier_cases.jsonl", "exact"), ("verifier_cases_rounded.jsonl", "rounded"),
                         ("verifier_cases_rounded.jsonl", "exact")):
        path = REPO / "tests" / "data" / name
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                label = row["expected"] if policy == "rounded" or name == "verifier_cases.jsonl" else False
                rows.append({"where": f"{name}:{number} ({policy})", "response": row["completion"],
                             "gold": row["answer"], "expected": label, "policy": policy})
    tree = ast.parse((REPO / "tests" / "test_rewards.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("EQUIVALENT", "NOT_EQUIVALENT"):
            name = node.targets[0].id
            for number, (response, gold) in enumerate(ast.literal_eval(node.value), 1):
                rows.append({"where": f"test_rewards.py {name}[{number}]", "response": response, "gold": gold,
                             "expected": name == "EQUIVALENT", "policy": "exact"})
    return rows


def _child_verdicts(path: str) -> None:
    from rewards.math import verify_batch

    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    out: list = [None] * len(rows)
    for policy in ("exact", "rounded"):
        chosen = [i for i, row in enumerate(rows) if row["policy"] == policy]
        verdicts = verify_batch([rows[i]["response"] for i in chosen], [rows[i]["gold"] for i in chosen],
                                timeout=30, policy=policy)
        for i, v in zip(chosen, verdicts):
            out[i] = [v.correct, v.extracted, v.reason, v.path]
    print(json.dumps(out))


def _run_child(root: Path, argv: list[str]) -> object:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, cwd=str(root),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"verify.py: the child run under {root} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> None:
    """`--against DIR`: old (DIR) vs new (this checkout) in one run."""
    old_root, new_root = Path(args.against).resolve(), REPO
    if not (old_root / "rewards" / "math.py").is_file():
        sys.exit(f"verify.py: --against {args.against}: no rewards/math.py there (want the root of a checkout)")
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} workers={args.workers} n={args.n} batch={args.batch} "
          f"repeats={args.repeats} (alternating old/new)\nold: {old_root}\nnew: {new_root}")
    child = ["--child-speed", "--n", str(args.n), "--batch", str(args.batch), "--workers", str(args.workers),
             "--seed", str(args.seed), "--sets", args.sets]
    runs: dict[str, list] = {"old": [], "new": []}
    for round_ in range(args.repeats):
        for side in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
            runs[side].append(_run_child(old_root if side == "old" else new_root, child))
    print(f"{'set':<6} {'method':<24} {'old cpu s/1k':>12} {'new cpu s/1k':>12} {'change':>8} {'old acc':>8} "
          f"{'new acc':>8} {'changed':>8}")
    for name in args.sets.split(","):
        for method in ("inline", "pool"):
            best = {}
            for side in runs:
                costs = [(r[name][method][0] + (r[name][method][1] or 0 if method == "pool" else 0), r)
                         for r in runs[side]]
                best[side] = min(costs, key=lambda c: c[0])
            (old_cpu, old_run), (new_cpu, new_run) = best["old"], best["new"]
            old_v, new_v = old_run[name][method][-1], new_run[name][method][-1]
            label = f"{method} sympy" if method == "inline" else f"pool x{args.workers} (+workers)"
            per_k = 1000 / args.n
            print(f"{name:<6} {label:<24} {old_cpu * per_k:12.3f} {new_cpu * per_k:12.3f} "
                  f"{100 * (new_cpu / old_cpu - 1) if old_cpu else 0:+7.1f}% {sum(old_v) / len(old_v):8.3f} "
                  f"{sum(new_v) / len(new_v):8.3f} {sum(a != b for a, b in zip(old_v, new_v)):8d}")
    if args.changed_verdicts:
        rows = labelled_pairs()
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
            json.dump(rows, f)
        old, new = (_run_child(root, ["--child-verdicts", f.name]) for root in (old_root, new_root))
        os.unlink(f.name)
        changed = [(row, o, n) for row, o, n in zip(rows, old, new) if o[0] != n[0]]
        wrong = {side: sum(v[0] != row["expected"] for row, v in zip(rows, verdicts))
                 for side, verdicts in (("old", old), ("new", new))}
        print(f"\nlabelled pairs: {len(rows)}; disagree with the label: old {wrong['old']}, new {wrong['new']}; "
              f"verdicts changed: {len(changed)}")
        for row, o, n in changed:
            kind = "fixed" if n[0] == row["expected"] else "REGRESSED"
            print(f"- {kind} {row['where']} expected={row['expected']}: {row['response'][-70:]!r} vs gold "
                  f"{row['gold']!r}\n    old {o[0]} ({o[1]!r}: {o[2]}) -> new {n[0]} ({n[1]!r}: {n[2]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="best of R runs for the looprl rows")
    parser.add_argument("--sets", default="short,mixed", help="comma-separated subset of short,mixed")
    parser.add_argument("--against", metavar="DIR", help="root of another checkout: compare its verifier with this one")
    parser.add_argument("--changed-verdicts", action="store_true",
                        help="with --against: list every labelled pair whose verdict changed")
    parser.add_argument("--child-speed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-verdicts", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_verdicts:
        return _child_verdicts(args.child_verdicts)
    if args.n < 1 or args.batch < 1 or args.workers < 1 or args.repeats < 1:
        parser.error("--n, --batch, --workers and --repeats must be >= 1")
    chosen = [name.strip() for name in args.sets.split(",") if name.strip()]
    if not chosen or set(chosen) - {"short", "mixed"}:
        parser.error(f"--sets: choose from short, mixed; got {args.sets!r}")
    args.sets = ",".join(chosen)
    if args.changed_verdicts and not args.against:
        parser.error("--changed-verdicts needs --against DIR")
    if args.child_speed:
        return _child_speed(args)
    if args.against:
        return compare(args)

    import rewards
    import rewards.math

    rewards.configure(workers=args.workers)
    start = time.perf_counter()
    from rewards.symbolic import symbolic_equal

    warm = [("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"), ("(1, 2)", "(2, 1)"), ("[0, 1)", "[0,1)")]
    rewards.math.get_pool().map(symbolic_equal, warm * args.workers, timeout=60)  # start + warm the workers
    startup = time.perf_counter() - start
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} workers={args.workers} n={args.n} "
          f"batch={args.batch} pool start-up + warm-up (once per run, reused): {startup:.2f} s")

    rng = random.Random(args.seed)
    sets = {"short (integer)": short_set(args.n, rng), "mixed (MATH-like)": mixed_set(args.n, rng)}
    sets = {name: pairs for name, pairs in sets.items() if name.split()[0] in chosen}  # same items either way
    print(f"{'set':<18} {'method':<34} {'seconds':>8} {'cpu s':>7} {'items/s':>9} {'vs base':>8} {'accept':>7} "
          f"{'!=base':>7}")
    for name, pairs in sets.items():
        base_s, base_cpu, base = timed(lambda p=pairs: run_math_verify_only(p))
        rows = [("math-verify only, inline (base)", base_s, base_cpu, base)]
        rewards.pop_counters()
        inline_s, inline_cpu, inline = timed(lambda p=pairs: run_looprl(p, args.batch, inline=True), args.repeats)
        rows.append(("looprl, inline sympy (no limit)", inline_s, inline_cpu, inline))
        pool_s, pool_cpu, pooled = timed(lambda p=pairs: run_looprl(p, args.batch, inline=False), args.repeats)
        counts = rewards.pop_counters()
        rows.append((f"looprl, pool x{args.workers} (hard limit)", pool_s, pool_cpu, pooled))
        for method, seconds, cpu, result in rows:
            print(f"{name:<18} {method:<34} {seconds:8.2f} {cpu:7.2f} {len(pairs) / seconds:9.0f} "
                  f"{base_s / seconds:7.1f}x {sum(result) / len(result):7.3f} "
                  f"{sum(a != b for a, b in zip(result, base)):7d}")
        disagree = sum(a != b for a, b in zip(inline, pooled))
        runs = 2 * args.repeats
        print(f"{'':<18} pool run: {counts['rewards/fast'] / runs:.0f} fast-path, "
              f"{counts['rewards/symbolic'] / runs:.0f} symbolic per run, timeouts {counts['rewards/timeouts']:.0f}; "
              f"inline vs pool disagree on {disagree}")
    rewards.shutdown()


if __name__ == "__main__":
    main()
