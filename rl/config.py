"""Training configuration: one flat dataclass, loaded from YAML plus `--key value` overrides.

Flat keys keep the command line and the YAML file the same language (`--lr 1e-5` == `lr: 1e-5`).
Everything is validated before any compute, and every error names the offending key, so a typo in
a config file fails in a second instead of after the first rollout.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl.self_distill_config import SELF_DISTILL_DEFAULTS, validate_self_distill

SCALE_REWARDS = ("group", "batch", "none")
SCHEDULERS = ("constant", "linear", "cosine")
# rollout correction (rl/rollout_correction.py, docs/OBJECTIVE.md): auto/off, truncations, and the masks
TIS_MASK_MODES = ("token_mask", "sequence_mask", "geometric_mask")
TIS_MODES = ("auto", "token", "sequence", *TIS_MASK_MODES, "off")
OFF_POLICY_RATIOS = ("behaviour", "proximal")  # max_staleness >= 1: the PPO ratio's reference (docs/OBJECTIVE.md)
DTYPES = ("float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
REWARD_ON_ERROR = ("raise", "zero", "skip_group")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key."""


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by `looprl train --help`, TRL's `metadata={"help": ...}`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of `looprl train`. The defaults are the embedded job (tiny looped model on `arith`)."""

    # --- model and depth: ONE depth drives rollout and update ---
    model: str = option("embedded", "HF model dir / hub id, or 'embedded' (the shipped tiny looped model)")
    depth: int | None = option(None, "loops per token for rollout AND update; None = the loaded model's own T "
                                     "(4 for the embedded model, 1 for a standard LM)")
    update_depth: int | None = option(None, "experiment only: update at another depth (needs allow_depth_mismatch)")
    allow_depth_mismatch: bool = option(False, "experiment only: allow update_depth != depth, and with an adaptive "
                                               "rollout_exit_rule score every token at the fixed update depth instead "
                                               "of the depth it was sampled at (the update then scores another "
                                               "policy)")
    engine: str = option("torch", "rollout engine: torch | vllm (rollout/engines.py registry)")
    dtype: str = option("float32", "trainer weights: float32 | bfloat16 (float16 is refused: AdamW's second moment "
                                   "and eps underflow in fp16 weights, so one update makes them inf/NaN)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward, one checkpoint per layer "
                                                 "application (keeps T x L layer inputs per token, not every "
                                                 "activation; ~1.1-1.3x the update's compute). Turn on when long "
                                                 "completions (thousands of tokens) run the update out of "
                                                 "memory, with micro_batch_tokens (docs/BENCHMARKS.md)")
    vllm_dtype: str = option("bfloat16", "rollout engine weights (vllm only)")
    vllm_gpu_memory_utilization: float = option(0.5, "fraction of GPU memory vLLM may take (vllm only)")
    vllm_tensor_parallel_size: int = option(1, "GPUs per vLLM engine (vllm only)")
    vllm_max_model_len: int | None = option(None, "vLLM context length; None = max_prompt_length + max_new_tokens "
                                                  "(never above the model's max_position_embeddings)")

    # --- data ---
    data: str = option("arith", "training prompts: a name known to rl.data.load_prompts or a local file")
    data_split: str = option("train", "split of `data` (arith, hub ids); a local file is read whole, so "
                                           "another split is refused for it")
    data_limit: int | None = option(None, "use only the first N prompts; None = all")
    max_prompt_length: int = option(2048, "longer prompts are left-truncated (with a warning); lowered to the "
                                          "model's max_position_embeddings - max_new_tokens when above it")
    prompt_suffix: str = option("", "text after the chat template's generation prompt (Ouro-Thinking: '<think>\\n', "
                                    "which its template does not add)")
    special_tokens: dict[str, str] = option({}, "bos_token/eos_token/pad_token overrides for files that name the wrong "
                                               "ones (Ouro-Thinking: {eos_token: '<|im_end|>'}; rl/special_tokens.py)")

    # --- rewards: weighted list of registry names ("pkg.mod:fn" also works) ---
    rewards: list[str] = option(["dapo_math"], "reward functions: registry names, 'pkg.module:function' (the "
                                               "working directory is importable) or, from Python, callables")
    reward_weights: list[float] | None = option(None, "one weight per reward function; None = all 1.0")
    reward_kwargs: dict[str, Any] = option({}, "options per reward function: {name: {option: value}}; name = as in "
                                                  "rewards, its function name when unique, or its metric name; "
                                                  "also the accuracy_reward's own options")
    accuracy_reward: str = option("math_accuracy", "1/0 function deciding correct for `accuracy` and the eval "
                                                   "(a score of None = unscored, counted in "
                                                   "accuracy/unscored_frac; '' = no accuracy); options: "
                                                   "reward_kwargs[its name], else the verifier options of rewards")
    reward_on_error: str = option("raise", "a reward function that raises, times out or returns NaN/inf/non-numbers/"
                                           "the wrong count: raise = stop with one line naming it; zero = score "
                                           "those samples 0 and warn; skip_group = drop their groups and warn")
    reward_timeout: float | None = option(None, "seconds one reward-function call may take (then reward_on_error "
                                                "applies); it runs in a worker thread so a hung function cannot "
                                                "hang the run. None = no limit, called on the main thread")

    # --- sampling ---
    num_generations: int = option(8, "samples per prompt (the GRPO group)")
    max_new_tokens: int = option(16, "completion length limit (longer ones are truncated)")
    temperature: float = option(1.0, "sampling temperature (the update scores at the same temperature)")
    top_p: float = option(1.0, "nucleus sampling; 1.0 = off")
    top_k: int = option(0, "top-k sampling; 0 = off")
    ignore_eos: bool = option(False, "benchmarks and memory tests: never stop at EOS, every completion runs to "
                                     "max_new_tokens (all truncated: mask_truncated would train on none)")
    rollout_draft_depth: int = option(0, "self-speculative rollouts (torch engine): draft with the exit after this "
                                         "many loops, verify at depth; same distribution, other speed; 0 = off")
    rollout_num_draft: int = option(0, "tokens drafted per verification pass (rollout/speculative.py); 0 = off")
    rollout_exit_rule: str = option("fixed", "per-token depth of rollouts (torch engine): fixed (every token at "
                                             "depth) | confidence (stop at the first loop >= rollout_min_depth "
                                             "whose exit's max probability >= rollout_exit_threshold) | gate (Ouro's "
                                             "exit-gate CDF >= rollout_exit_threshold); the update scores each token "
                                             "at its own depth (docs/ADAPTIVE_DEPTH.md)")
    rollout_exit_threshold: float | None = option(None, "threshold of rollout_exit_rule: confidence (0, 1], gate "
                                                         "[0, 1]; null with fixed")
    rollout_min_depth: int = option(1, "adaptive rules: no exit before this loop (1..depth)")

    # --- algorithm ---
    loss_type: str = option("dapo", "policy loss, a rl/losses.py registry name: grpo | dapo | dr_grpo | cispo")
    advantage_estimator: str = option("grpo", "advantages, a rl/advantages.py registry name: grpo (group-relative)")
    eps_low: float = option(0.2, "lower clip range of the importance ratio (1 - eps_low)")
    eps_high: float = option(0.28, "upper clip range of the importance ratio (1 + eps_high; DAPO's clip-higher)")
    cispo_cap: float = option(5.0, "upper truncation of the CISPO importance weight (TRL: "
                                      "epsilon_high under loss_type cispo)")
    beta: float = option(0.0, "KL to a frozen reference (k3 estimator); 0 = no reference model loaded")
    num_iterations: int = option(1, "passes over each step's batch")
    scale_rewards: str = option("group", "advantage scaling: group (std per group) | batch | none (Dr. GRPO)")
    dynamic_sampling: bool = option(True, "DAPO: drop groups whose rewards are all equal and sample more")
    max_rounds: int = option(4, "rollout rounds per step when refilling dropped groups")
    mask_truncated: bool = option(False, "overlong filtering: no loss on completions cut at max_new_tokens")
    overlong_buffer_len: int = option(0, ">0 adds DAPO's soft overlong penalty over the last N tokens")
    overlong_penalty: float = option(1.0, "size of the soft overlong penalty at max_new_tokens")
    tis_mode: str = option("auto", "rollout correction on rollout-vs-update logprobs (docs/OBJECTIVE.md): auto "
                                "(token on engines without exact logprobs, i.e. vllm, and for stale samples under "
                                "off_policy_ratio proximal; else off) | token | sequence "
                                "(truncated at tis_cap) | token_mask | sequence_mask | geometric_mask (no loss "
                                "outside [tis_floor, tis_cap]) | off")
    tis_cap: float = option(2.0, "upper truncation of the TIS weight; upper edge of the band of the mask modes")
    tis_floor: float = option(0.0, "lower edge of the band [tis_floor, tis_cap] of the mask modes (token_mask, "
                                   "sequence_mask, geometric_mask); 0 = no lower bound")
    max_staleness: int = option(0, "asynchronous rollouts: 0 = rollout, then update (synchronous); k >= 1 = a "
                                   "producer process samples and scores the next steps' groups while the update "
                                   "runs, with weights at most k updates old (older groups are dropped, counted "
                                   "in async/dropped_stale); the objective for those samples: off_policy_ratio "
                                   "(torch engine, one process or DDP; docs/OBJECTIVE.md)")
    off_policy_ratio: str = option("behaviour", "max_staleness >= 1: the PPO ratio of stale samples. behaviour = "
                                   "pi_theta / pi_behaviour (the policy that sampled), clipped to [1 - eps_low, "
                                   "1 + eps_high]: PPO's trust region around the data's policy, no TIS weight "
                                   "(it is the ratio); proximal = decoupled PPO: the ratio to the current weights "
                                   "times the truncated TIS weight pi_proximal / pi_behaviour (tis_mode; tis_mode "
                                   "auto turns it on). behaviour learned as fast per step as synchronous training "
                                   "on the default job, proximal slower (docs/EXPERIMENTS.md)")

    # --- self-distillation of shallow exits (rl/self_distill.py owns the defaults and the rules) ---
    self_distill_coef: float = option(SELF_DISTILL_DEFAULTS["self_distill_coef"],
                                   "weight of the self-distillation loss; 0 = off. Trades deep-exit for early-exit "
                                   "accuracy when too strong: ramp it in (self_distill_warmup_steps) and watch depth T "
                                   "(docs/EXPERIMENTS.md)")
    self_distill_exits: list[int] | str | None = option(SELF_DISTILL_DEFAULTS["self_distill_exits"],
                                                     "exits distilled toward exit T: None = 2..T-1, 'all' = 1..T-1, "
                                                     "or a list")
    self_distill_weighting: str = option(SELF_DISTILL_DEFAULTS["self_distill_weighting"],
                                      "weights over the exits: uniform | linear (w_t proportional to t)")
    self_distill_temperature: float = option(SELF_DISTILL_DEFAULTS["self_distill_temperature"],
                                          "softmax temperature of teacher and students")
    self_distill_top_k: int = option(SELF_DISTILL_DEFAULTS["self_distill_top_k"],
                                  "teacher's top-k tokens plus a tail bucket; 0 = full vocabulary")
    self_distill_variant: str = option(SELF_DISTILL_DEFAULTS["self_distill_variant"],
                                    "kl (on logits) | mse (on hidden states)")
    self_distill_chunk_size: int = option(SELF_DISTILL_DEFAULTS["self_distill_chunk_size"],
                                       "tokens per checkpointed chunk of the vocabulary-sized logits")
    self_distill_warmup_steps: int = option(SELF_DISTILL_DEFAULTS["self_distill_warmup_steps"],
                                         "steps over which the coefficient ramps linearly from 0 to "
                                         "self_distill_coef; 0 = full coefficient from step 1")

    # --- exit-weighted policy term and gate fitting (rl/exit_policy.py, rl/exit_gate.py own the rules) ---
    policy_exits: list[int] | str = option("last", "exits trained as policies: last (exit T only, the plain loss) "
                                                   "| all (1..T) | a list like [1,2,4]; each exit has its own "
                                                   "ratio and clip, the token's TIS weight is shared")
    policy_exit_weights: str = option("uniform", "weights over policy_exits: uniform | progressive (t^alpha) | "
                                                 "gate (the model's exit distribution p(t), detached) | learned "
                                                 "(softmax of free logits, checkpointed)")
    policy_exit_alpha: float = option(1.0, "exponent of the progressive weights t^alpha")
    gate_loss_coef: float = option(0.0, "weight of Ouro's Stage-II exit-gate loss on the rollout tokens (trains "
                                        "only the gate; LM untouched); 0 = off")
    gate_lr: float | None = option(None, "learning rate of the exit gate's parameters when gate_loss_coef > 0 "
                                         "(Adam makes the gate's step ~lr whatever the coefficient); None = lr")

    # --- LoRA (peft): train low-rank adapters on the shared block instead of every weight ---
    lora_rank: int = option(0, "LoRA rank r; 0 = off (full fine-tuning). One adapter on the shared weights acts in "
                               "every loop; the KL reference (beta > 0) is the base with the adapter disabled")
    lora_alpha: float = option(32.0, "LoRA scale numerator: the adapter's delta is (alpha / r) * B @ A")
    lora_dropout: float = option(0.0, "dropout on the adapter's input in the update's gradient forward "
                                      "(rollouts and logprob scoring never drop); in [0, 1)")
    lora_target_modules: list[str] | None = option(None, "module names (peft suffix match) that get adapters; "
                                                         "None = every linear layer of the shared block (the "
                                                         "exit gate and lm_head stay full/frozen unless listed)")

    # --- optimisation ---
    lr: float = option(5e-4, "learning rate; tuned for the embedded 120k-parameter model (~1e-6 for Ouro-1.4B)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.99, "AdamW beta2")
    warmup_steps: int = option(0, "steps of linear learning-rate warmup (at most max_steps: "
                                          "a longer warmup would never reach lr, refused)")
    lr_scheduler: str = option("constant", "constant | linear | cosine (after warmup)")
    max_grad_norm: float = option(1.0, "gradient clipping; 0 = off")

    # --- batch sizes (in samples = completions) ---
    max_steps: int = option(300, "training steps")
    prompts_per_step: int = option(32, "prompts (groups) per step, after dynamic sampling")
    mini_batch_size: int = option(0, "samples per optimizer update; 0 = the whole step's batch (one update)")
    micro_batch_size: int = option(256, "samples per forward/backward on one process")
    micro_batch_tokens: int = option(0, "token budget per forward/backward on one process: rows x padded "
                                        "prompt+completion length; memory then stays bounded whatever "
                                        "max_new_tokens is (a longer sample runs alone). 0 = off "
                                        "(micro_batch_size alone)")

    # --- run ---
    seed: int = option(0, "seed of everything random (rollouts, data order, init)")
    torch_threads: int = option(0, "CPU threads for torch; 0 = auto (1 for a tiny model on CPU, else torch's default)")
    output_dir: str = option("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    save_every: int = option(0, "checkpoint every N steps; 0 = only at the end / on interrupt")
    resume: bool = option(False, "continue the run in output_dir from its newest readable checkpoint; only the keys "
                                 "listed at the end of --help may differ from its config")
    overwrite: bool = option(False, "replace the run already in output_dir (its metrics, checkpoints and final/); "
                                    "without it or --resume a used output_dir is refused")
    report_to: str = option("none", "tracker: none | tensorboard | wandb (refused when its package "
                                         "is not installed)")
    log_samples: int = option(4, "rows per step in samples.jsonl")
    max_nan_steps: int = option(3, "consecutive non-finite losses before aborting")
    max_no_update_steps: int = option(20, "stop (exit 1, checkpoint kept, no final/) after this many consecutive "
                                          "steps in which every sampled group had equal rewards: no learning "
                                          "signal (a collapsed policy or a reward that cannot tell completions "
                                          "apart); 0 = never stop")
    mismatch_warn: float = option(1e-2, "warn loudly when mismatch/logp_abs_max exceeds this")
    progress: bool = option(True, "show the progress bar")

    # --- eval during training (rl/evaluate.py) ---
    eval_every: int = option(50, "greedy accuracy on eval_data at each depth every N steps (eval/accuracy_d{t}); 0 = off")
    eval_data: str | None = option("arith", "eval prompts (its 'test' split)")
    eval_depths: list[int] | None = option(None, "depths to evaluate; None = every depth 1..depth")
    eval_limit: int | None = option(200, "evaluate only the first N prompts")
    eval_max_new_tokens: int | None = option(None, "completion length limit in eval; None = max_new_tokens")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    def exit_rule(self):
        """The rollouts' rollout.base.ExitRule, or None for `fixed` (every token at depth)."""
        from rollout.base import exit_rule_from_keys

        return exit_rule_from_keys(self.rollout_exit_rule, self.rollout_exit_threshold, self.rollout_min_depth)

    @property
    def matched_depths(self) -> bool:
        """The update scores every token at the depth it was sampled at (adaptive rollouts, no mismatch arm)."""
        return self.rollout_exit_rule != "fixed" and not self.allow_depth_mismatch

    @property
    def effective_update_depth(self) -> int | None:
        return self.depth if self.update_depth is None else self.update_depth

    def reward_specs(self) -> list:
        """The reward functions that run, by position: `rewards`, plus overlong_penalty when
        overlong_buffer_len adds it."""
        extra = ["overlong_penalty"] if self.overlong_buffer_len and "overlong_penalty" not in self.rewards else []
        return [*self.rewards, *extra]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def engine_options(self) -> dict[str, Any]:
        """Keyword options of `rollout.make_worker` for this config's engine (beyond model, depth, tokens)."""
        if self.engine == "vllm":
            return {"dtype": self.vllm_dtype, "seed": self.seed,
                    "gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                    "tensor_parallel_size": self.vllm_tensor_parallel_size,
                    "max_model_len": self.vllm_max_model_len or self.max_prompt_length + self.max_new_tokens,
                    "enable_sleep_mode": True}
        return {}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


class _DuplicateKey(ValueError):
    """A mapping that names one key twice (YAML's last-wins would drop the first silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may be overridden, as YAML means
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} given twice (line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load that refuses a mapping naming a key twice (_DuplicateKey)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def _flag_yaml(key: str, text: str) -> Any:
    """A value given as YAML text (`--reward_kwargs '{a: {b: 1}}'`): ConfigError naming the key if malformed."""
    try:
        return load_yaml(text)
    except (yaml.YAMLError, _DuplicateKey) as e:
        why = str(e).splitlines()[0] if isinstance(e, _DuplicateKey) else getattr(e, "problem", None) or e
        raise ConfigError(f"config key {key!r}: {text!r} is not valid YAML ({why})") from None


# ----------------------------------------------------------------------------- type coercion


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation `hint`; accept the lossless conversions a YAML/CLI user means."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(hint):
                return None
        errors = []
        for arg in args:
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):  # `--eval_depths [1,2]`, the YAML spelling
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip()]
            value = [_flag_yaml(key, v) if item_hint is not str else v for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(key, v, item_hint) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = _flag_yaml(key, value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {hint}")


def coerce(key: str, value: Any) -> Any:
    """`value` as config key `key`'s type (ConfigError naming the key when it is not one)."""
    return _coerce(key, value, _HINTS[key])


# TRL GRPOConfig names accepted for ours: same meaning, so a TRL config's keys carry over. Note that
# TRL's `epsilon` sets only our lower clip (eps_low); the upper one is `epsilon_high` / eps_high.
TRL_ALIASES = {
    "learning_rate": "lr",
    "max_completion_length": "max_new_tokens",
    "epsilon": "eps_low",
    "epsilon_high": "eps_high",
    "mask_truncated_completions": "mask_truncated",
    "lr_scheduler_type": "lr_scheduler",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "vllm_importance_sampling_clip_max": "tis_cap",  # the upper bound of every mode, truncation or mask
}
# TRL names whose meaning follows TRL's loss_type: {TRL name: {loss_type: our key}}; under any other loss
# type TRL_ALIASES holds. TRL's CISPO truncates the importance weight at epsilon_high itself (not 1 + it):
# our cispo_cap, while eps_high is a clip that CISPO does not use.
TRL_LOSS_ALIASES = {"epsilon_high": {"cispo": "cispo_cap"}}
# What `--resume` may change, and how each change takes effect (rl/resume.py applies and records them;
# any other key differing from the checkpoint's config is refused, naming the keys, old -> new).
# Everything here is a schedule length, a learning rate, a memory knob or what is logged/evaluated:
# none changes the data, the model, the samples' scores or the loss of what was already trained.
RESUMABLE_KEYS = {
    "max_steps": "the run's length; the lr schedule is stretched to it from the resume step on",
    "lr": "the base learning rate from the resume step on (the schedule's multiplier still applies; a "
          "separate gate_lr stays)",
    "save_every": "checkpoint interval",
    "eval_every": "eval interval", "eval_data": "eval prompts", "eval_depths": "eval depths",
    "eval_limit": "eval size", "eval_max_new_tokens": "eval completion length",
    "log_samples": "rows per step in samples.jsonl", "progress": "progress bar", "report_to": "tracker",
    "mismatch_warn": "warning threshold", "max_nan_steps": "abort threshold",
    "max_no_update_steps": "abort threshold",
    "reward_timeout": "time limit of a reward call", "reward_on_error": "what a failing reward call does",
    "torch_threads": "CPU threads", "max_staleness": "asynchronous rollouts on (k >= 1) or off (0) from the resume "
    "step on (nothing in flight is checkpointed: the producer regenerates from the checkpoint's weights; the "
    "stale samples then train under off_policy_ratio)",
    "off_policy_ratio": "the objective of stale samples from the resume step on (max_staleness >= 1; it follows "
    "max_staleness back to its default when that goes to 0)",
    "micro_batch_size": "memory only: the same gradient per mini-batch",
    "micro_batch_tokens": "memory only: the same gradient per mini-batch",
    "gradient_checkpointing": "memory only: the same math", "vllm_gpu_memory_utilization": "memory only",
}
# Run control, never compared: where the run is and how this process starts it.
RUN_CONTROL_KEYS = ("output_dir", "resume", "overwrite")

# TRL names without an equivalent here: say what to use instead of guessing a close key name.
TRL_NO_EQUIVALENT = {
    "num_train_epochs": "looprl counts optimizer steps: set max_steps (each step samples prompts_per_step prompts)",
    "per_device_train_batch_size": "set prompts_per_step (prompts per step); num_generations samples each",
    "gradient_accumulation_steps": "mini_batch_size (samples per optimizer update) and micro_batch_size "
                                   "(samples per forward/backward) split a step",
    "use_vllm": "set engine: vllm",
    # TRL's modes are ours under other names, but its truncations also clip from below: no 1:1 mapping
    "vllm_importance_sampling_mode": "set tis_mode: token | sequence (TRL's token_truncate / sequence_truncate, "
                                     "truncated from above only) | token_mask | sequence_mask | geometric_mask",
    "vllm_importance_sampling_clip_min": "set tis_floor (the lower edge of the mask modes' band; looprl's "
                                         "truncations have no lower bound)",
    "vllm_importance_sampling_correction": "set tis_mode (off = no correction; auto = token where the engine's "
                                           "log-probs are not exact, i.e. vllm)",
}


def _our_name(key: str, loss_type: str | None) -> str:
    return TRL_LOSS_ALIASES.get(key, {}).get(loss_type) or TRL_ALIASES.get(key, key)


def canonical_key(key: str, where: str, seen: dict[str, Any] | None = None, loss_type: str | None = None) -> str:
    """Our name for `key` (a TRL alias is mapped, by the run's `loss_type` where TRL's meaning depends on
    it); unknown keys raise ConfigError naming the key.
    `seen`: keys already given in the same place, to refuse a key given under both names."""
    if key in TRL_NO_EQUIVALENT:
        raise ConfigError(f"config key {key!r} (TRL) in {where} has no equivalent here: {TRL_NO_EQUIVALENT[key]}")
    name = _our_name(key, loss_type)
    _check_known(name, where)
    if seen is not None and name in seen:
        trl = key if key != name else next((a for a in TRL_ALIASES if _our_name(a, loss_type) == name), key)
        raise ConfigError(f"config key {name!r} given twice in {where} (once as {trl!r}, TRL's name for it)")
    return name


def _check_known(key: str, where: str) -> None:
    if key not in FIELDS:
        import difflib

        close = difflib.get_close_matches(key, [*FIELDS, *TRL_ALIASES], n=1)  # TRL's names too
        ours = TRL_ALIASES.get(close[0]) if close else None
        hint = (f" (did you mean {close[0]!r}{f', TRL name of {ours!r}' if ours else ''}?)" if close else "")
        raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


# ----------------------------------------------------------------------------- validation


def _choice(cfg: TrainConfig, key: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in choices:
        raise ConfigError(f"config key {key!r}: {getattr(cfg, key)!r} is not one of {', '.join(choices)}")


def _positive(cfg: TrainConfig, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key {key!r}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# keys naming functions, which the Python API may also give as callables (accuracy_reward: or None, unscored)
CALLABLE_KEYS = ("rewards", "accuracy_reward")


def _matches(value: Any, hint: Any, key: str) -> bool:
    """Whether `value` already has the annotation's type (no conversion: that is the CLI's/YAML's job)."""
    if key in CALLABLE_KEYS and (callable(value) or (value is None and key == "accuracy_reward")):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg, key) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(
            _matches(v, item, key) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


# float keys where an infinite value means "no limit" (a cap or threshold never reached); NaN never makes sense
INFINITE_OK = ("tis_cap", "cispo_cap", "max_grad_norm", "mismatch_warn")


def _check_types(cfg: TrainConfig) -> None:
    """Every key has its annotated type (a TrainConfig built in Python is not coerced) and its floats are
    finite (`reward_weights: [nan]` would make every reward NaN); ConfigError naming the key."""
    for key, hint in _HINTS.items():
        value = getattr(cfg, key)
        if not _matches(value, hint, key):
            shown = str(hint).replace("typing.", "") if typing.get_origin(hint) else hint.__name__
            raise ConfigError(f"config key {key!r}: expected {shown}, got {type(value).__name__} {value!r}")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and key not in INFINITE_OK)):
                raise ConfigError(f"config key {key!r}: must be a finite number, got {value!r}")


# report_to -> the module its tracker needs (accelerate's tensorboard tracker imports torch.utils.tensorboard,
# which needs the tensorboard package)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_depths(where: str, depths: list[int], max_depth: int | None) -> None:
    """Loop counts must lie in 1..the model's total_ut_steps (1 for a standard LM): train and eval alike."""
    bad = [d for d in depths if d < 1 or (max_depth is not None and d > max_depth)]
    if bad:
        bound = f"1..{max_depth}" if max_depth is not None else ">= 1"
        shown = bad[0] if len(depths) == 1 else bad
        raise ConfigError(f"{where}: {shown} is out of range ({bound} for this model)")


def prompt_room(max_positions: int | None, max_new_tokens: int, key: str = "--max_new_tokens") -> int | None:
    """The tokens a model's position table (`max_position_embeddings`) leaves a prompt after max_new_tokens
    (None: the model states no limit); a max_new_tokens that leaves none is refused in one line naming `key`.
    One rule for the trainer (`fit_to_positions`), `looprl eval` and the trainer's eval (rl/prompts.py)."""
    if not max_positions:
        return None
    if max_new_tokens >= max_positions:
        raise ConfigError(f"{key} {max_new_tokens} leaves no room for a prompt within the model's "
                          f"max_position_embeddings ({max_positions}); use at most {max_positions - 1}")
    return max_positions - max_new_tokens


def fit_to_positions(cfg: TrainConfig, max_positions: int | None) -> str | None:
    """Prompt + completion must fit the model's position table (`max_position_embeddings`): beyond it a
    learned table is indexed out of range and RoPE runs at positions never trained (and the rollout cache,
    sized prompt + max_new_tokens, can take tens of GB). What cannot fit is refused in one line naming the
    key; a max_prompt_length above what the model leaves after max_new_tokens is lowered to it (so the
    default 2048 fits a small model). Returns why it was lowered (None: unchanged) for the truncation warning.
    """
    if not max_positions:
        return None
    for key in ("max_new_tokens", "eval_max_new_tokens"):
        if getattr(cfg, key) is not None:
            prompt_room(max_positions, getattr(cfg, key), f"config key {key!r}:")
    if cfg.vllm_max_model_len is not None and cfg.vllm_max_model_len > max_positions:
        raise ConfigError(f"config key 'vllm_max_model_len': {cfg.vllm_max_model_len} exceeds the model's "
                          f"max_position_embeddings ({max_positions}); lower it or leave it null")
    room = prompt_room(max_positions, cfg.max_new_tokens)
    if cfg.max_prompt_length <= room:
        return None
    why = (f"max_prompt_length {cfg.max_prompt_length} lowered to {room}: the model's max_position_embeddings "
           f"{max_positions} - max_new_tokens {cfg.max_new_tokens}")
    cfg.max_prompt_length = room
    return why


def tis_on(cfg: TrainConfig, exact_logprobs: bool) -> bool:
    """Whether the update reweights by pi_old / pi_rollout: a mode given, or `auto` where the rollout's
    logprobs are not the update's (an engine without exact logprobs, or stale samples under
    off_policy_ratio proximal; under behaviour the PPO ratio itself is that weight)."""
    if cfg.tis_mode == "auto":
        return not exact_logprobs or (cfg.max_staleness > 0 and cfg.off_policy_ratio == "proximal")
    return cfg.tis_mode != "off"


def behaviour_ratio(cfg: TrainConfig) -> bool:
    """The PPO ratio is taken to the rollout's (behaviour) log-probs: stale samples under off_policy_ratio
    behaviour. Otherwise it is taken to the weights before the step's first update (the proximal policy)."""
    return cfg.max_staleness > 0 and cfg.off_policy_ratio == "behaviour"


def _check_off_policy_ratio(cfg: TrainConfig) -> None:
    """off_policy_ratio is read only with max_staleness >= 1; behaviour carries its own importance weight
    (a TIS mode on top would apply it twice) and has no per-exit behaviour log-probs."""
    if cfg.off_policy_ratio != FIELDS["off_policy_ratio"].default and not cfg.max_staleness:
        raise ConfigError(f"config key 'off_policy_ratio': {cfg.off_policy_ratio!r} is read only with max_staleness "
                          ">= 1 (asynchronous rollouts); drop it or set max_staleness")
    if not behaviour_ratio(cfg):
        return
    if cfg.tis_mode not in ("auto", "off"):
        raise ConfigError(f"config key 'tis_mode': {cfg.tis_mode!r} reweights stale samples by pi_proximal / "
                          "pi_behaviour, which off_policy_ratio behaviour (the default with max_staleness >= 1) "
                          "already is: its PPO ratio is taken to the behaviour policy; use off_policy_ratio "
                          "proximal for a TIS mode, or drop tis_mode")
    if cfg.policy_exits != "last":
        raise ConfigError("config key 'off_policy_ratio': behaviour needs the behaviour log-probs of every exit "
                          "that policy_exits trains, and the rollout has only the sampled depth's; use "
                          "off_policy_ratio proximal with policy_exits")


def _check_tis_band(cfg: TrainConfig, exact_logprobs: bool) -> None:
    """tis_floor: 0 <= tis_floor < tis_cap, and only where a mask mode reads it (else it would be ignored);
    tis_cap only where TIS is on (else it too would be ignored)."""
    if cfg.tis_cap != FIELDS["tis_cap"].default and not tis_on(cfg, exact_logprobs):
        why = "tis_mode is off" if cfg.tis_mode == "off" else (
            "tis_mode auto turns TIS on only for an engine without exact logprobs or max_staleness >= 1 with "
            f"off_policy_ratio proximal (engine {cfg.engine!r}, max_staleness {cfg.max_staleness}, off_policy_ratio "
            f"{cfg.off_policy_ratio})")
        raise ConfigError(f"config key 'tis_cap': {cfg.tis_cap:g} would be ignored: {why}; drop it or set tis_mode "
                          f"(token | {' | '.join(m for m in TIS_MODES if m not in ('auto', 'off', 'token'))})")
    if not 0.0 <= cfg.tis_floor < cfg.tis_cap:
        raise ConfigError(f"config key 'tis_floor': must satisfy 0 <= tis_floor < tis_cap ({cfg.tis_cap:g}), "
                          f"got {cfg.tis_floor:g}")
    if cfg.tis_floor > 0 and cfg.tis_mode not in TIS_MASK_MODES:
        raise ConfigError(f"config key 'tis_floor': {cfg.tis_floor:g} is read only by tis_mode "
                          f"{' | '.join(TIS_MASK_MODES)} (it is {cfg.tis_mode!r}, which has no lower bound); "
                          "drop it or pick a mask mode")


def validate(cfg: TrainConfig, max_depth: int | None = None, num_processes: int = 1, *,
             registries: bool = True) -> TrainConfig:
    """Raise ConfigError naming the key for anything that cannot run. `max_depth` = the model's loops.
    `registries=False` skips the checks whose modules import torch (loss/advantage names, exit-policy and
    speculative keys): the CLI runs that part first, so a typo is answered before torch loads."""
    from rollout.engines import ENGINES

    choices = {"vllm_dtype": DTYPES, "engine": tuple(ENGINES), "dtype": DTYPES, "scale_rewards": SCALE_REWARDS,
               "lr_scheduler": SCHEDULERS, "tis_mode": TIS_MODES, "report_to": REPORT_TO,
               "reward_on_error": REWARD_ON_ERROR, "off_policy_ratio": OFF_POLICY_RATIOS}
    if registries:  # these modules need torch: imported here, so `looprl train --help` (this module) starts fast
        from rl.advantages import ADVANTAGES
        from rl.exit_policy import validate_exit_policy
        from rl.losses import LOSSES

        choices |= {"loss_type": tuple(LOSSES), "advantage_estimator": tuple(ADVANTAGES)}
    _check_types(cfg)
    for name, allowed in choices.items():
        _choice(cfg, name, allowed)
    module = TRACKER_MODULES.get(cfg.report_to)
    if module and importlib.util.find_spec(module) is None:  # else the run would log to no tracker, silently
        raise ConfigError(f"config key 'report_to': {cfg.report_to} is not installed: pip install {module} "
                          "(or report_to: none)")
    if not cfg.output_dir.strip():  # '' would write the run (and --overwrite clear) the working directory
        raise ConfigError("config key 'output_dir': empty; name a run directory (e.g. runs/my-run)")
    if cfg.data_split != FIELDS["data_split"].default and Path(cfg.data).exists():
        raise ConfigError(f"config key 'data_split': {cfg.data_split!r} given, but data {cfg.data!r} is a local "
                          "path, read whole (it has no splits); put that split in its own file")
    try:  # the self-distillation module owns its keys' rules
        validate_self_distill(cfg, depth=cfg.depth if cfg.self_distill_coef > 0 else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        if registries:
            validate_exit_policy(cfg.policy_exits, cfg.policy_exit_weights, cfg.policy_exit_alpha,
                                 depth=cfg.effective_update_depth)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_lora(cfg)
    _positive(cfg, "gate_loss_coef", allow_zero=True)
    _positive(cfg, "gate_lr")
    _positive(cfg, "num_generations", "max_new_tokens", "max_prompt_length", "vllm_tensor_parallel_size", "temperature", "num_iterations", "max_rounds",
              "lr", "max_steps", "prompts_per_step", "micro_batch_size", "max_nan_steps", "cispo_cap",
              "tis_cap", "reward_timeout")
    if cfg.num_generations < 2:  # every loss here is group-relative: a group of one has zero advantage
        raise ConfigError(f"config key 'num_generations': {cfg.num_generations} trains nothing with "
                          f"advantage_estimator {cfg.advantage_estimator!r} (advantages are relative to the group); use >= 2")
    _positive(cfg, "beta", "warmup_steps", "save_every", "eval_every", "overlong_buffer_len", "weight_decay",
              "max_grad_norm", "log_samples", "torch_threads", "mini_batch_size", "micro_batch_tokens", "top_k",
              "eps_low", "eps_high", "overlong_penalty", allow_zero=True)
    _positive(cfg, "max_no_update_steps", "max_staleness", allow_zero=True)
    _positive(cfg, "vllm_max_model_len", "eval_max_new_tokens", "data_limit")
    if cfg.warmup_steps > cfg.max_steps:  # the schedule would never reach lr
        raise ConfigError(f"config key 'warmup_steps': {cfg.warmup_steps} > max_steps {cfg.max_steps}: the "
                          "learning rate would never reach lr; lower warmup_steps")
    if cfg.dtype == "float16":
        raise ConfigError("config key 'dtype': float16 cannot train: AdamW keeps its second moment in the weights' "
                          "dtype and its eps (1e-8) rounds to 0 in fp16, so the first update makes most weights "
                          "inf/NaN; use bfloat16 (same memory) or float32")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"config key 'top_p': must be in (0, 1], got {cfg.top_p}")
    from rl.special_tokens import SPECIAL_TOKEN_KEYS

    for key, token in cfg.special_tokens.items():
        if key not in SPECIAL_TOKEN_KEYS or not isinstance(token, str) or not token:
            raise ConfigError(f"config key 'special_tokens': {key}: {token!r} is not a bos_token/eos_token/"
                              "pad_token set to a token string")
    _check_off_policy_ratio(cfg)
    _check_tis_band(cfg, ENGINES[cfg.engine].exact_logprobs)
    if cfg.eps_low >= 1.0:
        raise ConfigError(f"config key 'eps_low': must be < 1, got {cfg.eps_low}")
    if cfg.overlong_buffer_len >= cfg.max_new_tokens:
        raise ConfigError(
            f"config key 'overlong_buffer_len': {cfg.overlong_buffer_len} must be < max_new_tokens "
            f"({cfg.max_new_tokens})")

    # depth: one number for rollout and update
    for key in ("depth", "update_depth"):
        value = getattr(cfg, key)
        if value is not None:
            check_depths(f"config key {key!r}", [value], max_depth)
    if cfg.update_depth is not None and cfg.depth is not None and cfg.update_depth != cfg.depth \
            and not cfg.allow_depth_mismatch:  # depth None (the model's T): checked once the model is read
        raise ConfigError(
            f"config key 'update_depth': {cfg.update_depth} differs from depth {cfg.depth}; the update must "
            "score at the rollout depth (set allow_depth_mismatch: true only for experiments)")
    if cfg.allow_depth_mismatch and cfg.update_depth is None and cfg.rollout_exit_rule == "fixed":
        raise ConfigError("config key 'allow_depth_mismatch': true does nothing here: it only allows an update_depth "
                          "other than depth, or an update at T of adaptive rollouts (rollout_exit_rule confidence | "
                          "gate); set one of those or leave it false")
    try:  # adaptive-depth rollouts: the rollout module owns the keys' rules
        from rollout.base import exit_rule_from_keys

        exit_rule_from_keys(cfg.rollout_exit_rule, cfg.rollout_exit_threshold, cfg.rollout_min_depth,
                            depth=cfg.depth or max_depth, engine=cfg.engine,
                            speculative=bool(cfg.rollout_draft_depth or cfg.rollout_num_draft))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:  # speculative rollouts: the rollout module owns the keys' rules
        if registries:
            from rollout.speculative import check_spec_keys

            check_spec_keys(cfg.rollout_draft_depth, cfg.rollout_num_draft, cfg.depth or max_depth, cfg.engine)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # rewards
    if not cfg.rewards:
        raise ConfigError("config key 'rewards': at least one reward function is needed")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.rewards):
        raise ConfigError(
            f"config key 'reward_weights': {len(cfg.reward_weights)} weights for {len(cfg.rewards)} rewards")
    from rewards.registry import options_by_position  # torch-free
    from rl.accuracy import accuracy_kwargs, check_accuracy_name, split_reward_kwargs

    where = "config key 'reward_kwargs'"
    try:  # each key names exactly one function (by position: rewards.reward_ids), or the accuracy function
        rest, _ = split_reward_kwargs(cfg.reward_specs(), cfg.reward_kwargs, cfg.accuracy_reward, where)
        options_by_position(cfg.reward_specs(), rest, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.accuracy_reward:  # one definition of correct for accuracy and eval (rl/accuracy.py)
        try:
            check_accuracy_name(cfg.accuracy_reward)
            accuracy_kwargs(cfg.reward_specs(), cfg.reward_kwargs, cfg.accuracy_reward, where)
        except ValueError as e:  # AccuracyError, or an unknown / unimportable function
            raise ConfigError(f"config key 'accuracy_reward': {e}") from None

    # batch sizes must divide
    total = cfg.samples_per_step
    mini = cfg.mini_batch_size or total
    if total % mini:
        raise ConfigError(
            f"config key 'mini_batch_size': {mini} does not divide prompts_per_step * num_generations = {total}")
    if mini % cfg.num_generations:
        raise ConfigError(
            f"config key 'mini_batch_size': {mini} is not a multiple of num_generations ({cfg.num_generations})")
    if mini % num_processes:
        raise ConfigError(f"config key 'mini_batch_size': {mini} does not split over {num_processes} processes")
    if cfg.prompts_per_step % num_processes:
        raise ConfigError(
            f"config key 'prompts_per_step': {cfg.prompts_per_step} does not split over {num_processes} processes")
    check_depths("config key 'eval_depths'", cfg.eval_depths or [], max_depth)
    if cfg.max_staleness and cfg.engine != "torch":  # rl/async_rollout.py's producer runs the torch engine
        raise ConfigError(f"config key 'max_staleness': asynchronous rollouts run with the torch engine, not "
                          f"engine {cfg.engine!r} (not supported yet); use max_staleness 0")
    if cfg.eval_every and not cfg.eval_data:
        raise ConfigError("config key 'eval_data': required when eval_every > 0")
    if not 0.0 < cfg.vllm_gpu_memory_utilization <= 1.0:
        raise ConfigError(f"config key 'vllm_gpu_memory_utilization': must be in (0, 1], got "
                          f"{cfg.vllm_gpu_memory_utilization}")
    return cfg


def _validate_lora(cfg: TrainConfig) -> None:
    """The LoRA keys: a rank switches it on; the others must not be set while it is off."""
    _positive(cfg, "lora_rank", allow_zero=True)
    _positive(cfg, "lora_alpha")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"config key 'lora_dropout': must be in [0, 1), got {cfg.lora_dropout}")
    targets = cfg.lora_target_modules
    if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"config key 'lora_target_modules': expected a non-empty list of module names, "
                          f"got {targets!r}")
    if cfg.lora_rank == 0:
        for key, unset in (("lora_target_modules", None), ("lora_dropout", 0.0)):
            if getattr(cfg, key) != unset:
                raise ConfigError(f"config key {key!r}: set while lora_rank is 0 (LoRA off); set lora_rank > 0")


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    except _DuplicateKey as e:
        raise ConfigError(f"--config {path}: config {e}; give each key once") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping of config keys")
    return data


def parse_overrides(argv: list[str], loss_type: str | None = None,
                    warn: typing.Callable[[str], None] | None = None) -> tuple[str | None, dict[str, Any]]:
    """`[--config FILE] --key value --flag ...` -> (config file, {key: raw value}). A bare boolean flag = true.
    `loss_type`: the run's, for the TRL names whose meaning depends on it (TRL_LOSS_ALIASES). `warn`: told
    of a key given twice (the last value wins, as in any shell command; scripts append overrides)."""
    config_file, raw, i = None, {}, 0
    aliased: set[str] = set()  # our names given under their TRL alias
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value")
        key, _, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        has_value = bool(inline) or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        if inline:
            value, i = inline, i + 1
        elif has_value:
            value, i = argv[i + 1], i + 2
        else:
            value, i = None, i + 1
        if key == "config":
            if value is None:
                raise ConfigError("--config needs a file path")
            config_file = value
            continue
        name = canonical_key(key, "command line", loss_type=loss_type)
        if (key in TRL_ALIASES and name in raw) or (key not in TRL_ALIASES and name in aliased):
            raise ConfigError(f"config key {name!r} given twice on the command line (also as TRL's name)")
        if name in raw and warn is not None:  # the shell's convention (a later flag overrides) holds, said aloud
            warn(f"config key {name!r} given twice on the command line: the last value {value!r} is used, "
                 f"{raw[name]!r} ignored")
        if key in TRL_ALIASES:
            aliased.add(name)
        key = name
        if value is None:
            if _HINTS[key] is not bool:
                raise ConfigError(f"config key {key!r}: --{key} needs a value")
            value = "true"
        raw[key] = value
    return config_file, raw


def build_config(values: dict[str, Any], where: str = "config") -> TrainConfig:
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key = canonical_key(key, where, kwargs)
        kwargs[key] = _coerce(key, value, _HINTS[key])
    return TrainConfig(**kwargs)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One stderr line per message and process (the CLI reads its arguments twice: precheck, then the run)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"looprl train: WARNING: {message}", file=sys.stderr)


def load_config(argv: list[str] | None = None, *, registries: bool = True, check: bool = True) -> TrainConfig:
    """YAML file (if `--config`) then command-line overrides, then validation (without model facts;
    `registries=False`: nor the torch-side names, see `validate`; `check=False`: none, the caller validates).
    `looprl train` reads its config with rl/resume.py load_run_config (a --resume's unset keys)."""
    argv = list(argv or [])
    config_file, overrides = parse_overrides(argv)
    file_values = _read_yaml(config_file) if config_file else {}
    # the run's loss type (command line, else file, else default) decides what TRL's epsilon_high means
    loss_type = overrides.get("loss_type", file_values.get("loss_type", FIELDS["loss_type"].default))
    loss_type = loss_type if isinstance(loss_type, str) else None  # a wrong type is refused by _coerce
    config_file, overrides = parse_overrides(argv, loss_type, warn=_warn_once)
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        key = canonical_key(key, config_file, values, loss_type)
        values[key] = _coerce(key, value, _HINTS[key])
    values.update({k: _coerce(k, v, _HINTS[k]) for k, v in overrides.items()})
    cfg = build_config(values)
    # what the user set (file or command line): on --resume every other key keeps the checkpoint's value
    # (rl/resume.py adopt_trained_config); a TrainConfig built in Python has no record: all keys count as set
    cfg.given_keys = frozenset(values)
    return validate(cfg, registries=registries) if check else cfg


def _portable(value: Any) -> Any:
    """A Python-API callable (a reward function) as the "module:name" string a YAML config would use."""
    if callable(value):  # a function or class by its name; a callable object by its class (stable across runs)
        named = value if hasattr(value, "__qualname__") else type(value)
        return f"{getattr(named, '__module__', '?')}:{named.__qualname__}"
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def portable_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (callables as "module:name"): what config.yaml and checkpoints hold."""
    return {k: _portable(v) for k, v in cfg.to_dict().items()}


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(portable_dict(cfg), sort_keys=False))


def help_text() -> str:
    """`looprl train --help`: every key with its default and help text, in declaration order."""
    lines = ["usage: looprl train [--config FILE] [--key value ...]", "", "keys (default): help"]
    for name, f in FIELDS.items():
        lines.append(f"  --{name} ({_fmt_default(f)})")
        lines.append(f"      {f.metadata.get('help', '')}")
    lines += ["", "--print_config prints the resolved config as YAML and exits (no run; registry names and the "
              "model's facts are checked when a run starts).",
              "", "--resume may change only: " + ", ".join(RESUMABLE_KEYS) + " (each change is logged, written "
              "to config.yaml and recorded in config_changes.jsonl with its step); any other changed key is "
              "refused."]
    lines += ["", "TRL GRPOConfig names are accepted for ours: "
              + ", ".join(f"--{alias} = --{ours}" for alias, ours in TRL_ALIASES.items())
              + " (TRL's epsilon sets eps_low only; "
              + "; ".join(f"under loss_type {loss}, --{alias} = --{ours}, TRL's meaning"
                          for alias, by_loss in TRL_LOSS_ALIASES.items() for loss, ours in by_loss.items())
              + ")."]
    return "\n".join(lines)


def _fmt_default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return repr(f.default)
