"""Completions verified per second: looprl's verifier (fast path + worker pool) vs inline vs plain math-verify.

    python benchmarks/verify.py [--n 1000] [--batch 128] [--workers 2] [--seed 0] [--repeats 1] [--sets short,mixed]

Two sets of `n` generated, realistic responses (a few lines of working, then a final answer in the
formats models actually use: `Answer: 42`, `**Answer:** $42$`, `\\boxed{}`, `Answer: $42`, ...):
- short: DAPO-Math-17K-like integer golds (the embedded arith task is the same shape);
- mixed: MATH-500-like golds (fractions, roots, pi, intervals, tuples), written in equivalent forms.
Baseline: math-verify parse + verify of every full response in-process (what a naive reward does).
Scored in batches of `--batch`, as the trainer does once per step; caches are cleared before each run.
`--repeats R` keeps the best of R runs of each looprl row (the baseline runs once); `cpu s` is this
process's CPU time, which on a shared machine moves less than wall time (for the pool rows it leaves
out the workers).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="best of R runs for the looprl rows")
    parser.add_argument("--sets", default="short,mixed", help="comma-separated subset of short,mixed")
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1 or args.workers < 1 or args.repeats < 1:
        parser.error("--n, --batch, --workers and --repeats must be >= 1")
    chosen = [name.strip() for name in args.sets.split(",") if name.strip()]
    if not chosen or set(chosen) - {"short", "mixed"}:
        parser.error(f"--sets: choose from short, mixed; got {args.sets!r}")

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
