"""Lists of exit numbers in config keys (`self_distill_exits`, `policy_exits`): one parser, one set of messages.

Torch-free, because rl/config.py validates these keys and `looprl train --help` must not load torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def exit_numbers(parts: Sequence[object], key: str, shown: object) -> list[int]:
    """`parts` as exit numbers (integers >= 1, each once), in the given order. `shown` is the value as the user
    wrote it, for the messages; every error is a ValueError naming the config key."""
    exits = []
    for p in parts:
        try:
            t = int(p)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key}: {p!r} is not an exit number (integers >= 1)") from None
        if isinstance(p, bool) or t < 1 or (isinstance(p, float) and p != t):
            raise ValueError(f"config key {key}: {p!r} is not an exit number (integers >= 1)")
        exits.append(t)
    if len(set(exits)) != len(exits):
        raise ValueError(f"config key {key}: exit listed twice in {shown!r}")
    return exits
