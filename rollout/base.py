"""Engine-independent rollout types: what to sample (SamplingParams), what came back (Rollout),
and the protocol every engine implements (RolloutWorker). Engines are built by name with
`rollout.engines.make_worker` (the trainer and `looprl eval` both do).

The trainer only talks to these types, so the torch and vLLM engines are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SpecConfig:
    """Self-speculative decoding for looped models (torch engine; see rollout/speculative.py).

    Draft `num_draft` tokens with the model's own exit after `draft_depth` loops, then verify them with
    the rollout depth T in one pass that reuses the draft's loop 1..draft_depth K/V. The output
    distribution (and the returned logprobs) are exactly those of plain depth-T decoding; only the
    speed changes. Needs 1 <= draft_depth < T and num_draft >= 1.
    """

    draft_depth: int
    num_draft: int

    def __post_init__(self) -> None:
        for name in ("draft_depth", "num_draft"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SpecConfig.{name} must be an integer >= 1, got {value!r}")


EXIT_RULES = ("fixed", "confidence", "gate")


@dataclass(frozen=True)
class ExitRule:
    """Adaptive per-token depth (torch engine; rollout/exit_rules.py applies it, docs/ADAPTIVE_DEPTH.md).

    After every loop t >= min_depth the position being decoded may stop: `confidence` when the max
    probability of exit t (softmax(logits / temperature); temperature 0: plain softmax) reaches `threshold`,
    `gate` when the CDF of Ouro's exit distribution (the exit gate, fp32) reaches `threshold` (q >= 1: never
    before T). Otherwise it runs to T. The next token is drawn from the exit it stopped at. `fixed` (or no
    rule) is plain depth-T decoding.
    """

    kind: str = "fixed"
    threshold: float | None = None
    min_depth: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXIT_RULES:
            raise ValueError(f"ExitRule.kind must be one of {EXIT_RULES}, got {self.kind!r}")
        if isinstance(self.min_depth, bool) or not isinstance(self.min_depth, int) or self.min_depth < 1:
            raise ValueError(f"ExitRule.min_depth must be an integer >= 1, got {self.min_depth!r}")
        if self.adaptive and self.threshold is None:
            raise ValueError(f"ExitRule {self.kind!r} needs a threshold")

    @property
    def adaptive(self) -> bool:
        return self.kind != "fixed"


def exit_rule_from_keys(kind: str, threshold: float | None, min_depth: int, *, depth: int | None = None,
                        engine: str = "torch", speculative: bool = False) -> ExitRule | None:
    """The config keys `rollout_exit_rule`, `rollout_exit_threshold`, `rollout_min_depth` as an ExitRule
    (None for `fixed`), checked; every error is a ValueError naming the key (looprl train and looprl eval).
    `depth`: the rollout depth T when known (min_depth must be <= T)."""
    if kind not in EXIT_RULES:
        raise ValueError(f"config key 'rollout_exit_rule': {kind!r} is not one of {', '.join(EXIT_RULES)}")
    if isinstance(min_depth, bool) or not isinstance(min_depth, int) or min_depth < 1:
        raise ValueError(f"config key 'rollout_min_depth': must be an integer >= 1, got {min_depth!r}")
    if kind == "fixed":
        if threshold is not None:
            raise ValueError("config key 'rollout_exit_threshold': only used by rollout_exit_rule confidence | gate "
                             "(the rule is fixed)")
        if min_depth != 1:
            raise ValueError("config key 'rollout_min_depth': only used by rollout_exit_rule confidence | gate "
                             "(the rule is fixed)")
        return None
    if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"config key 'rollout_exit_threshold': rollout_exit_rule {kind} needs a number, "
                         f"got {threshold!r}")
    low_ok = threshold > 0 if kind == "confidence" else threshold >= 0
    if not (low_ok and threshold <= 1):
        bounds = "(0, 1] (a max probability)" if kind == "confidence" else "[0, 1] (a CDF level q; 1 = always T)"
        raise ValueError(f"config key 'rollout_exit_threshold': {threshold} is outside {bounds} for "
                         f"rollout_exit_rule {kind}")
    if depth is not None and depth < 2:
        raise ValueError(f"config key 'rollout_exit_rule': {kind} needs a looped model at depth >= 2, got depth {depth}")
    if depth is not None and min_depth > depth:
        raise ValueError(f"config key 'rollout_min_depth': {min_depth} exceeds the rollout depth {depth}")
    if engine != "torch":
        raise ValueError(f"config key 'rollout_exit_rule': {kind} needs engine torch; the {engine} engine samples "
                         "every token at one fixed depth (docs/ADAPTIVE_DEPTH.md)")
    if speculative:
        raise ValueError(f"config key 'rollout_exit_rule': {kind} cannot be combined with self-speculative "
                         "rollouts (rollout_draft_depth), which verify at the fixed depth")
    return ExitRule(kind, float(threshold), min_depth)


@dataclass
class SamplingParams:
    """How to sample completions.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 disable truncation.
    stop_token_ids None means "stop at the model/tokenizer EOS"; [] means never stop early
    (every sample runs to max_new_tokens). ignore_eos True means the same as [] whatever
    stop_token_ids says: full-length completions, for benchmarks and memory tests.
    speculative: None = plain decoding; a SpecConfig = self-speculative decoding (same distribution).
    exit_rule: None (or kind "fixed") = every token at the worker's depth; an adaptive ExitRule = each token
    at the depth the rule picks (recorded in Rollout.token_depths).
    """

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    speculative: SpecConfig | None = None
    ignore_eos: bool = False
    exit_rule: ExitRule | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.speculative is not None and not isinstance(self.speculative, SpecConfig):
            raise ValueError(f"SamplingParams.speculative must be a SpecConfig or None, got {self.speculative!r}")
        if self.exit_rule is not None and not isinstance(self.exit_rule, ExitRule):
            raise ValueError(f"SamplingParams.exit_rule must be an ExitRule or None, got {self.exit_rule!r}")

    @property
    def adaptive(self) -> bool:
        """Each token's depth is chosen by an exit rule (not the fixed worker depth)."""
        return self.exit_rule is not None and self.exit_rule.adaptive

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stop_ids(self, eos_token_ids: Sequence[int]) -> list[int]:
        """The token ids that end a completion, given the engine's EOS ids (the one rule every engine uses)."""
        if self.ignore_eos:
            return []
        return list(eos_token_ids) if self.stop_token_ids is None else list(self.stop_token_ids)


@dataclass
class Rollout:
    """Sampled completions, one entry per sample, prompt-major (n samples of prompt 0 first).

    completion_ids include the stop token when finish_reason == "stop", and logprobs has one fp32
    value per completion token (the stop token's included).

    Torch engine logprobs: log softmax(logits / temperature) over the full vocabulary at the
    rollout depth (temperature 0: log softmax(logits)). top-k / top-p only restrict which tokens can
    be drawn; the reported value is NOT renormalised over the kept set, so it is exactly what the
    update recomputes. With top_p=1, top_k=0 it is also the sampling distribution's logprob.

    `stats`: engine counters of this call (speculative decoding: `accept_rate`, `tokens_per_verify`, ...).

    `token_depths` (adaptive exit rules only; None = every token at `depth`): one loop count per completion
    token. Completion token k's depth d is the exit its logits were read from, at the position that produced
    it (the previous position: the last prompt token for k = 0). That position ran loops 1..d only: its state
    is frozen after loop d, and its K/V in the cache slots of loops d+1..T are each layer's K/V projection of
    that frozen exit state. Prompt positions before it run all T loops. The update reproduces exactly this
    (`OuroForCausalLM.forward(exit_depth=...)`).
    """

    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    depth: int = 1
    stats: dict[str, float] = field(default_factory=dict)
    token_depths: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


@runtime_checkable
class RolloutWorker(Protocol):
    """A generation engine pinned to one depth (number of loops per token), with the trainer's lifecycle:

    generate -> sleep (free memory while the update runs) -> sync_weights (the updated policy; wakes the
    weights) -> generate (wakes whatever is still asleep), and close() once at the end (an engine's
    processes and process groups go before the trainer's own). Engines that hold the trainer's own module
    make sync_weights free and sleep/wake_up/close no-ops. Logprob convention: see `Rollout`; whether an engine's
    logprobs equal the trainer's recomputation is declared at registration (rollout.engines).
    """

    depth: int

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout: ...

    def sync_weights(self, model) -> None: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...


# Path parts that training wrappers (DDP, torch.compile, activation checkpointing, FSDP) insert into
# parameter names; the checkpoint / rollout model knows the bare names.
WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def checkpoint_name(name: str) -> str:
    """A training model's parameter name without wrapper parts: `module.model.norm.weight` -> `model.norm.weight`."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def as_id_list(ids: int | Sequence[int] | None) -> list[int]:
    """One token id, several, or None -> a list of ints."""
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]
