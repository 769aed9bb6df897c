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
    """Difficulty knob and sizes. Each operand has 1..digits digits (digit count drawn uniformly)."""

    digits: int = 2  # most digits of one operand
    operands: int = 3  # numbers per problem
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
                raise ValueError(f"arith: bad option {item!r}; expected key=value with key in {', '.join(types)}")
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


def _random_problem(rng: random.Random, cfg: ArithConfig) -> str:
    parts = []
    for i in range(cfg.operands):
        n_digits = rng.randint(1, cfg.digits)
        low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
        if i:
            parts.append(rng.choice(cfg.ops))
        parts.append(str(rng.randint(low, 10**n_digits - 1)))
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


def generate(split: str = "train", cfg: ArithConfig | None = None, n: int | None = None) -> list[dict]:
    """`n` distinct problems of `split` (default cfg.n_train / cfg.n_test), deterministic in cfg.seed."""
    cfg = cfg or ArithConfig()
    if split not in SPLITS:
        raise ValueError(f"arith: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    n = n if n is not None else (cfg.n_train if split == "train" else cfg.n_test)
    rng = random.Random(f"arith/{cfg.seed}/{split}/{cfg.digits}/{cfg.operands}/{cfg.ops}")
    seen: set[str] = set()
    rows: list[dict] = []
    max_draws = 50 * n + 10_000
    for _ in range(max_draws):
        if len(rows) == n:
            break
        problem = _random_problem(rng, cfg)
        if problem in seen or split_of(problem) != split:
            continue
        seen.add(problem)
        rows.append(make_row(problem, split))
    if len(rows) < n:
        raise ValueError(
            f"arith: found only {len(rows)} distinct {split} problems for {asdict(cfg)}; "
            f"ask for fewer (n={n}) or raise digits/operands"
        )
    return rows


def completion(answer: str) -> str:
    """The supervised target completion for a gold answer (used to warm-start the embedded model)."""
    return ANSWER_TEMPLATE.format(answer=answer)
