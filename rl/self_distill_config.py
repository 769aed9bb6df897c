"""The self_distill_* config keys: defaults (`SelfDistillConfig`, `SELF_DISTILL_DEFAULTS`) and rules
(`validate_self_distill`, `resolve_exits`, `exit_weights`). The loss itself is in rl/self_distill.py,
which re-exports these names.

Kept free of torch so that rl/config.py, and with it `looprl train --help`, starts without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from rl.exits import exit_numbers

WEIGHTINGS = ("uniform", "linear")
VARIANTS = ("kl", "mse")
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class SelfDistillConfig:
    """Validated self-distillation settings (built from the trainer's flat keys by validate_self_distill)."""

    coef: float = 0.0
    exits: list[int] | str | None = None
    weighting: str = "linear"
    temperature: float = 1.0
    top_k: int = 0
    variant: str = "kl"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    warmup_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    def coef_at(self, step: int) -> float:
        """The coefficient in force at training step `step` (1-based, as metrics.jsonl counts): linear ramp
        from coef / warmup_steps at step 1 to coef at step warmup_steps, then coef. Why a ramp: the distillation
        gradient runs through the weights every loop shares, and early in RL, before the shallow exits have
        drifted, it only competes with the policy gradient (docs/EXPERIMENTS.md, issue 15)."""
        if self.warmup_steps <= 0:
            return self.coef
        return self.coef * min(1.0, max(step, 0) / self.warmup_steps)


# Flat trainer config keys -> defaults, derived from SelfDistillConfig (the one declaration; rl/config.py's
# self_distill_* keys take their defaults from here). `self_distill_coef` 0 turns the loss off.
SELF_DISTILL_DEFAULTS: dict[str, object] = {
    f"self_distill_{f.name}": f.default for f in fields(SelfDistillConfig)}


def _parse_exits(value, key: str = "self_distill_exits") -> list[int] | str | None:
    """None / "default" -> None (2..T-1 at call time), "all" -> "all" (1..T-1), else a sorted list of ints."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise ValueError(f"config key {key}: expected a list of exit numbers like [2, 3], got {value!r}")
    if not parts:
        raise ValueError(f"config key {key}: empty list of exits (leave it unset for the default 2..T-1)")
    return sorted(exit_numbers(parts, key, shown=value))


def validate_self_distill(values: Mapping[str, object] | object, depth: int | None = None) -> SelfDistillConfig:
    """Check the self_distill_* keys of a config (a mapping or an object with those attributes).

    Missing keys take SELF_DISTILL_DEFAULTS. With `depth` (the training depth T) the exits are also
    checked against 1..T-1. Raises ValueError naming the config key on bad input.
    """
    def get(key):
        if isinstance(values, Mapping):
            return values.get(key, SELF_DISTILL_DEFAULTS[key])
        return getattr(values, key, SELF_DISTILL_DEFAULTS[key])

    def number(key, kind):
        v = get(key)
        if isinstance(v, bool):
            raise ValueError(f"config key {key}: expected a number, got {v!r}")
        try:
            return kind(v)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key}: expected a number, got {v!r}") from None

    coef = number("self_distill_coef", float)
    if coef < 0:
        raise ValueError(f"config key self_distill_coef: must be >= 0 (0 = off), got {coef}")
    temperature = number("self_distill_temperature", float)
    if not temperature > 0:
        raise ValueError(f"config key self_distill_temperature: must be > 0, got {temperature}")
    top_k = number("self_distill_top_k", int)
    if top_k < 0:
        raise ValueError(f"config key self_distill_top_k: must be >= 0 (0 = full vocabulary), got {top_k}")
    chunk_size = number("self_distill_chunk_size", int)
    if chunk_size < 1:
        raise ValueError(f"config key self_distill_chunk_size: must be >= 1, got {chunk_size}")
    warmup_steps = number("self_distill_warmup_steps", int)
    if warmup_steps < 0:
        raise ValueError(f"config key self_distill_warmup_steps: must be >= 0 (0 = no ramp), got {warmup_steps}")
    weighting = str(get("self_distill_weighting")).lower()
    if weighting not in WEIGHTINGS:
        raise ValueError(f"config key self_distill_weighting: {weighting!r} is not one of {WEIGHTINGS}")
    variant = str(get("self_distill_variant")).lower()
    if variant not in VARIANTS:
        raise ValueError(f"config key self_distill_variant: {variant!r} is not one of {VARIANTS}")
    exits = _parse_exits(get("self_distill_exits"))
    if depth is not None:
        resolve_exits(exits, depth)
    return SelfDistillConfig(coef=coef, exits=exits, weighting=weighting, temperature=temperature,
                             top_k=top_k, variant=variant, chunk_size=chunk_size,
                             warmup_steps=warmup_steps)


def resolve_exits(exits, depth: int) -> list[int]:
    """The shallow exits to distil for a forward of `depth` loops (see module docstring for the default)."""
    if depth < 2:
        raise ValueError(f"self-distillation needs depth >= 2 (a shallow and a deep exit), got depth {depth}")
    exits = _parse_exits(exits) if not isinstance(exits, list) else exits
    if exits is None:
        return list(range(2, depth)) if depth > 2 else [1]
    if exits == "all":
        return list(range(1, depth))
    bad = [t for t in exits if not 1 <= t < depth]
    if bad:
        raise ValueError(f"config key self_distill_exits: exits {bad} are outside 1..{depth - 1} "
                         f"(the deep exit {depth} is the teacher)")
    return list(exits)


def exit_weights(exits: Sequence[int], weighting: str) -> list[float]:
    """Normalised weights over the exits: uniform, or proportional to the exit number ("linear")."""
    if weighting == "uniform":
        raw = [1.0] * len(exits)
    elif weighting == "linear":
        raw = [float(t) for t in exits]
    else:
        raise ValueError(f"config key self_distill_weighting: {weighting!r} is not one of {WEIGHTINGS}")
    total = sum(raw)
    return [r / total for r in raw]
