"""`arith`: the embedded arithmetic task, generated from a seed in DAPO-Math-17K's row schema.

Why this task: looprl must run its whole pipeline offline on a CPU, with a tiny character-level
looped model whose reward rises within minutes. Sums of several multi-digit numbers, answer written
most-significant digit first, need a carry chain resolved before the first answer character: more
sequential computation (more loops) helps, which is what a looped LM is for. Prompts and answers are
short (about a dozen characters in all), so rollouts and updates are cheap on a CPU; answers are
integers checked by the same math verifiers as DAPO-Math-17K (which accept a bare final answer as
well as DAPO's `Answer: N` line). The completion is the bare integer: every generated token is work.

Train and test are disjoint by construction: a problem's split is a hash of its text, independent of
the seed, so no seed or size can leak a test problem into train.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, fields

DATA_SOURCE = "arith"
PROMPT_TEMPLATE = "{problem}="  # the user message; short on purpose (a char-level model reads every char)
ANSWER_TEMPLATE = "{answer}"  # the target completion: the bare integer (the verifiers accept bare answers)
TEST_PERCENT = 10  # share of the problem space (by hash) that belongs to the test split
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty knob and sizes. Every operand has exactly `digits` digits (fixed digit positions
    keep the task learnable by a tiny char-level model; the carries are what make it deep)."""

    digits: int = 2  # digits of every operand
    operands: int = 2  # numbers per problem
    ops: str = "+"  # operator alphabet, any of "+-*" (evaluated with the usual precedence)
    seed: int = 0
    n_train: int = 20000
    n_test: int = 500

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ValueError(f"arith: digits must be in 1..9, got {self.digits!r}")
        if not 2 <= self.operands <= 8:
            raise ValueError(f"arith: operands must be in 2..8, got {self.operands!r}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"arith: ops must be a non-empty string of '+', '-', '*', got {self.ops!r}")
        for name in ("n_train", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"arith: {name} must be >= 1, got {getattr(self, name)!r}")

    @classmethod
    def from_spec(cls, spec: str) -> ArithConfig:
        """Parse "digits=3,operands=4,seed=1" (the part after "arith:" in a data source name)."""
        kwargs: dict[str, object] = {}
        types = {f.name: f.type for f in fields(cls)}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in types:
                raise ValueError(
                    f"arith: bad option {item!r}; expected key=value with key in {', '.join(types)}"
                )
            try:
                kwargs[key] = value.strip() if key == "ops" else int(value)
            except ValueError:
                raise ValueError(f"arith: option {key} needs an integer, got {value!r}") from None
        return cls(**kwargs)


def evaluate(problem: str) -> int:
    """Value of a generated expression like "12+3*45-6" (integers, + - *, usual precedence)."""
    total, term, sign, number = 0, 1, 1, ""
    pending_mul = False
    for ch in problem + "+":
        if ch.isdigit():
            number += ch
            continue
        value = int(number)
        number = ""
        term = term * value if pending_mul else value
        if ch == "*":
            pending_mul = True
            continue
        total += sign * term
        sign, pending_mul, term = (1 if ch == "+" else -1), False, 1
    return total


def split_of(problem: str) -> str:
    """The split a problem belongs to, from a hash of its text (stable across seeds and versions)."""
    bucket = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _operands(cfg: ArithConfig) -> range:
    """The numbers with exactly `cfg.digits` digits (0-9 for one digit)."""
    return range(0 if cfg.digits == 1 else 10 ** (cfg.digits - 1), 10**cfg.digits)


def _random_problem(rng: random.Random, cfg: ArithConfig) -> str:
    parts = []
    numbers = _operands(cfg)
    for i in range(cfg.operands):
        if i:
            parts.append(rng.choice(cfg.ops))
        parts.append(str(rng.randint(numbers.start, numbers.stop - 1)))
    return "".join(parts)


def make_row(problem: str, split: str) -> dict:
    """One row in DAPO-Math-17K's schema (verl RL parquet format)."""
    answer = str(evaluate(problem))
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": PROMPT_TEMPLATE.format(problem=problem)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": f"arith-{problem}", "split": split, "problem": problem},
    }


def _all_problems(cfg: ArithConfig) -> list[str]:
    numbers = [str(v) for v in _operands(cfg)]
    ops = sorted(set(cfg.ops))
    problems = numbers
    for _ in range(cfg.operands - 1):
        problems = [p + op + x for p in problems for op in ops for x in numbers]
    return problems


def space_size(cfg: ArithConfig) -> int:
    """Number of distinct problems (both splits) for this difficulty."""
    return len(_operands(cfg)) ** cfg.operands * len(set(cfg.ops)) ** (cfg.operands - 1)


def generate(split: str = "train", cfg: ArithConfig | None = None, n: int | None = None) -> list[dict]:
    """`n` distinct problems of `split`, deterministic in cfg.seed. Without `n`: cfg.n_train / cfg.n_test,
    or every problem of the split when the problem space is smaller than that."""
    cfg = cfg or ArithConfig()
    if split not in SPLITS:
        raise ValueError(f"arith: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    wanted = n if n is not None else (cfg.n_train if split == "train" else cfg.n_test)
    rng = random.Random(f"arith/{cfg.seed}/{split}/{cfg.digits}/{cfg.operands}/{cfg.ops}")
    if space_size(cfg) <= 200_000:  # small space: enumerate it, so a split is never silently short
        problems = [p for p in _all_problems(cfg) if split_of(p) == split]
        rng.shuffle(problems)
        if n is None:
            wanted = min(wanted, len(problems))
    else:
        seen: set[str] = set()
        problems = []
        for _ in range(50 * wanted + 10_000):
            if len(problems) == wanted:
                break
            problem = _random_problem(rng, cfg)
            if problem not in seen and split_of(problem) == split:
                seen.add(problem)
                problems.append(problem)
    if len(problems) < wanted:
        raise ValueError(
            f"arith: found only {len(problems)} distinct {split} problems for {asdict(cfg)}; "
            f"ask for fewer (n={wanted}) or raise digits/operands"
        )
    return [make_row(p, split) for p in problems[:wanted]]


def completion(answer: str) -> str:
    """The supervised target completion for a gold answer (used to warm-start the embedded model)."""
    return ANSWER_TEMPLATE.format(answer=answer)
