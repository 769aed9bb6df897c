"""VLLMRolloutWorker: everything that needs no GPU is tested with fake vLLM objects; the real-engine
tests are marked `vllm`/`gpu` and skip unless vllm and CUDA are both present."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rollout.base import Rollout, RolloutWorker, SamplingParams
from rollout.vllm_worker import (
    INSTALL_HINT,
    VLLMRolloutWorker,
    build_engine_kwargs,
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
HAS_CUDA = torch.cuda.is_available()


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
    monkeypatch.setitem(sys.modules, "vllm", module)
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


# ------------------------------------------------------------------------------------------------
# real engine (GPU + vllm only)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_ouro_checkpoint(tmp_path):
    modeling = pytest.importorskip("looped")
    torch.manual_seed(0)
    config = modeling.OuroConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, total_ut_steps=4,
                                 eos_token_id=2, max_position_embeddings=256)
    model = modeling.OuroForCausalLM(config).float().eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and HAS_CUDA), reason="needs vllm installed and a CUDA GPU")
def test_real_engine_logprobs_match_full_forward(tiny_ouro_checkpoint, depth):
    model, path = tiny_ouro_checkpoint
    worker = VLLMRolloutWorker(str(path), depth, dtype="float32", gpu_memory_utilization=0.2,
                               max_model_len=256, enforce_eager=True, eos_token_id=2)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    rollout = worker.generate(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=0.9, seed=3))
    model = model.cuda()
    for prompt, ids, values in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs):
        full = torch.tensor([prompt + ids], device="cuda")
        with torch.no_grad():
            logits = model(full, depth=depth).logits[0, len(prompt) - 1 : -1].float() / 0.9
        ref = logits.log_softmax(-1).gather(-1, full[0, len(prompt):, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(values, device="cuda"), ref, atol=2e-3), (values, ref.tolist())


@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and HAS_CUDA), reason="needs vllm installed and a CUDA GPU")
def test_real_engine_sync_weights_changes_the_policy(tiny_ouro_checkpoint):
    model, path = tiny_ouro_checkpoint
    worker = VLLMRolloutWorker(str(path), 4, dtype="float32", gpu_memory_utilization=0.2,
                               max_model_len=256, enforce_eager=True, eos_token_id=2)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    before = worker.generate([[5, 6, 7]], greedy)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # flips every argmax
    worker.sync_weights(model)
    after = worker.generate([[5, 6, 7]], greedy)
    assert after.completion_ids[0][0] != before.completion_ids[0][0]
    full = torch.tensor([[5, 6, 7] + after.completion_ids[0]])
    with torch.no_grad():
        expected = model(full, depth=4).logits[0, 2:-1].argmax(-1).tolist()
    assert after.completion_ids[0] == expected


def test_weight_names_drop_wrapper_parts_anywhere():
    """Activation-checkpointing / FSDP wrappers insert parts mid-name; only whole wrapper parts go."""
    assert vllm_weight_name("model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight") == (
        "model.layers.0.self_attn.q_proj.weight")
    assert vllm_weight_name("_fsdp_wrapped_module.model.norm.weight") == "model.norm.weight"
    assert vllm_weight_name("model.layers.0.mlp.gate_proj.weight") == "model.layers.0.mlp.gate_proj.weight"
