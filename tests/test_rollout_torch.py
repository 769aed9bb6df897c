"""TorchRolloutWorker: exact logprobs at the rollout depth, seeding, greedy == HF generate, stopping,
prompt-major ordering, batch compaction and weight sync, on a tiny Llama (depth 1) and tiny Ouro."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout import Rollout, RolloutWorker, SamplingParams, TorchRolloutWorker
from rollout.sampling import sample_next, truncate_logits

EOS = 5
PAD = 0
PROMPTS = [[3, 4, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21]]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD,
        bos_token_id=1, initializer_range=0.3,  # peaked next-token distributions, so depth/seed matter
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=EOS, bos_token_id=1,
        pad_token_id=PAD, initializer_range=0.3,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_ouro(seed: int = 0):
    modeling = pytest.importorskip("looped")
    torch.manual_seed(seed)
    config = modeling.OuroConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, total_ut_steps=4, max_position_embeddings=128, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=1, initializer_range=0.3,
    )
    return modeling.OuroForCausalLM(config).eval()


# (model factory, depth): a generic HF causal LM at depth 1 and the looped model at several depths.
CASES = [(tiny_llama, 1), (tiny_ouro, 1), (tiny_ouro, 2), (tiny_ouro, 4)]
CASE_IDS = ["llama-d1", "ouro-d1", "ouro-d2", "ouro-d4"]


def forward_logits(model, ids: list[int], depth: int) -> torch.Tensor:
    kwargs = {"depth": depth} if hasattr(model, "make_static_cache") else {}
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False, **kwargs).logits[0].float()


def reference_logprobs(model, prompt: list[int], completion: list[int], depth: int, temperature: float):
    """log softmax(logits / T) of each completion token from one full (no-cache, unpadded) forward."""
    logits = forward_logits(model, prompt + completion, depth)[len(prompt) - 1 : -1]
    scale = temperature if temperature > 0 else 1.0
    return (logits / scale).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def rare_early_tokens(unstopped: Rollout) -> list[int]:
    """Stop set that makes sample 0 stop within 5 tokens while most rows run on: the rarest of its
    tokens 1..4. Sampling is identical up to the first stop, so sample 0 is certain to stop."""
    counts = Counter(t for c in unstopped.completion_ids for t in c)
    return [min(unstopped.completion_ids[0][1:5], key=lambda t: counts[t])]


def hf_greedy(model, prompts, max_new_tokens: int, depth: int, eos) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    kwargs = {"depth": depth} if hasattr(model, "make_static_cache") else {}
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
        pad_token_id=PAD, **kwargs,
    )
    completions = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        completions.append(row)
    return completions


@pytest.mark.parametrize("make,depth", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 20, 0.9)])
def test_logprobs_match_full_forward(make, depth, temperature, top_k, top_p):
    model = make()
    worker = TorchRolloutWorker(model, depth)
    params = SamplingParams(
        n=3, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, seed=3, stop_token_ids=[]
    )
    stops = rare_early_tokens(worker.generate(PROMPTS, params))
    params.stop_token_ids = stops
    rollout = worker.generate(PROMPTS, params)
    assert rollout.depth == depth and len(rollout) == len(PROMPTS) * 3
    assert "stop" in rollout.finish_reasons and "length" in rollout.finish_reasons  # rows stopped early
    for prompt, completion, logprobs, reason in zip(
        rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, rollout.finish_reasons
    ):
        assert len(logprobs) == len(completion) >= 1
        assert all(isinstance(v, float) for v in logprobs)
        if reason == "stop":
            assert completion[-1] in stops and not set(completion[:-1]) & set(stops)
        else:
            assert len(completion) == 12 and not set(completion) & set(stops)
        ref = reference_logprobs(model, prompt, completion, depth, temperature)
        torch.testing.assert_close(torch.tensor(logprobs), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "make,depth", [CASES[0], (tiny_gpt2, 1), CASES[3]], ids=["llama-d1", "gpt2-d1", "ouro-d4"]
)
def test_greedy_matches_hf_generate(make, depth):
    model = make()
    worker = TorchRolloutWorker(model, depth)
    for eos in (None, 44):
        params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[] if eos is None else [eos])
        rollout = worker.generate(PROMPTS, params)
        assert rollout.completion_ids == hf_greedy(model, PROMPTS, 10, depth, eos)
        for completion, logprobs, prompt in zip(rollout.completion_ids, rollout.logprobs, PROMPTS):
            ref = reference_logprobs(model, prompt, completion, depth, temperature=0)
            torch.testing.assert_close(torch.tensor(logprobs), ref, atol=1e-4, rtol=0)


def test_fused_ouro_step_equals_model_forward():
    model = tiny_ouro()
    fast, generic = TorchRolloutWorker(model, 3), TorchRolloutWorker(model, 3, fast_decode=False)
    params = SamplingParams(n=2, max_new_tokens=10, temperature=0.9, seed=5, stop_token_ids=[])
    params.stop_token_ids = rare_early_tokens(generic.generate(PROMPTS, params))
    a, b = fast.generate(PROMPTS, params), generic.generate(PROMPTS, params)
    assert fast.uses_fast_decode and not generic.uses_fast_decode
    assert a.completion_ids == b.completion_ids and a.finish_reasons == b.finish_reasons
    # The fused step and the model's SDPA forward sum in different orders: fp32 rounding, relative to the value
    # (1.3e-5 on a log-prob of -2.6, i.e. 5e-6 relative, on the CI machine with every transformers 5.16-5.24).
    torch.testing.assert_close(
        torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])), atol=1e-5, rtol=1e-5
    )


def test_fused_ouro_step_bf16_is_as_faithful_as_model_forward(recwarn):
    """bf16 is not bit-reproducible across kernels (cached decode vs full forward differ by bf16 rounding,
    and near-ties then flip tokens), so compare each path's error against the full forward."""
    model = tiny_ouro().to(torch.bfloat16)
    params = SamplingParams(n=2, max_new_tokens=12, temperature=1.0, seed=0, stop_token_ids=[])
    mean_errors = {}
    for fast_decode in (True, False):
        worker = TorchRolloutWorker(model, 4, fast_decode=fast_decode)
        rollout = worker.generate(PROMPTS, params)
        assert worker.uses_fast_decode == fast_decode
        errors = torch.cat([
            (torch.tensor(lps) - reference_logprobs(model, p, c, 4, 1.0)).abs()
            for p, c, lps in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs)
        ])
        mean_errors[fast_decode] = errors.mean().item()
    assert not [w for w in recwarn if "fused" in str(w.message)]
    assert mean_errors[True] < 0.05 and mean_errors[False] < 0.05, mean_errors


def test_fused_step_falls_back_when_it_disagrees(monkeypatch):
    from looped.fast_decode import OuroDecodeStep

    model = tiny_ouro()
    refresh = OuroDecodeStep.refresh

    def broken_refresh(self):  # a broken fused step: wrong concatenated q|k|v weights
        refresh(self)
        self.fused = [(wqkv * 0.5, wgu) for wqkv, wgu in self.fused]

    monkeypatch.setattr(OuroDecodeStep, "refresh", broken_refresh)
    worker = TorchRolloutWorker(model, 2)
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    with pytest.warns(UserWarning, match="falling back"):
        rollout = worker.generate(PROMPTS, params)
    assert not worker.uses_fast_decode
    assert rollout.completion_ids == hf_greedy(model, PROMPTS, 6, 2, None)


def test_depth_changes_the_policy():
    model = tiny_ouro()
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    outs = {d: TorchRolloutWorker(model, d).generate(PROMPTS, params).completion_ids for d in (1, 4)}
    assert outs[1] != outs[4]
    assert TorchRolloutWorker(model).depth == 4  # default: config.total_ut_steps


def test_same_seed_same_samples():
    worker = TorchRolloutWorker(tiny_ouro(), 2)
    params = SamplingParams(n=2, max_new_tokens=10, temperature=1.0, seed=7, stop_token_ids=[6, 44])
    first, again = worker.generate(PROMPTS, params), worker.generate(PROMPTS, params)
    assert first.completion_ids == again.completion_ids and first.logprobs == again.logprobs
    other = worker.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, temperature=1.0, seed=8))
    assert other.completion_ids != first.completion_ids


def test_n_samples_prompt_major():
    worker = TorchRolloutWorker(tiny_llama(), 1)
    n = 3
    sampled = worker.generate(PROMPTS, SamplingParams(n=n, max_new_tokens=6, temperature=1.0, seed=0))
    assert sampled.prompt_ids == [p for p in PROMPTS for _ in range(n)]
    # The n samples of one prompt differ (independent draws), and greedy fan-out equals n=1 greedy.
    assert len({tuple(c) for c in sampled.completion_ids[:n]}) > 1
    greedy_n = worker.generate(PROMPTS, SamplingParams(n=n, max_new_tokens=6, temperature=0))
    greedy_1 = worker.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=6, temperature=0))
    assert greedy_n.completion_ids == [c for c in greedy_1.completion_ids for _ in range(n)]


def test_stop_token_ids_semantics():
    model = tiny_llama()
    unstopped = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    greedy = TorchRolloutWorker(model, 1).generate(PROMPTS, unstopped)
    eos = greedy.completion_ids[0][2]  # a token greedy decoding emits early: make it the model's EOS
    worker = TorchRolloutWorker(model, 1, eos_token_id=eos)
    default = worker.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))  # None -> EOS
    assert default.finish_reasons[0] == "stop" and default.completion_ids[0][-1] == eos
    assert len(default.completion_ids[0]) <= 3
    never = worker.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[]))
    assert never.finish_reasons == ["length"] * len(PROMPTS)
    assert never.completion_ids == greedy.completion_ids
    # ignore_eos: full length past the EOS and past explicit stop ids (benchmarks, memory tests)
    for stops in (None, [eos]):
        full = worker.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=stops,
                                                       ignore_eos=True))
        assert full.finish_reasons == ["length"] * len(PROMPTS)
        assert full.completion_ids == greedy.completion_ids
    # A stop token drawn at the last allowed step still counts as "stop".
    first = TorchRolloutWorker(model, 1, eos_token_id=greedy.completion_ids[0][0])
    one = first.generate(PROMPTS[:1], SamplingParams(max_new_tokens=1, temperature=0))
    assert one.finish_reasons == ["stop"] and one.completion_ids == [greedy.completion_ids[0][:1]]
    # EOS defaults to the model config's eos_token_id.
    assert TorchRolloutWorker(model, 1).eos_token_ids == [EOS]


def test_compaction_does_not_change_results():
    model = tiny_ouro()
    params = SamplingParams(n=2, max_new_tokens=12, temperature=0, stop_token_ids=[])
    always, never = TorchRolloutWorker(model, 3), TorchRolloutWorker(model, 3)
    params.stop_token_ids = rare_early_tokens(never.generate(PROMPTS, params))
    always.compact_below, never.compact_below = 1.0, 0.0
    a, b = always.generate(PROMPTS, params), never.generate(PROMPTS, params)
    assert "stop" in a.finish_reasons and "length" in a.finish_reasons
    assert a.completion_ids == b.completion_ids and a.finish_reasons == b.finish_reasons
    # The fused step and the model's SDPA forward sum in different orders: fp32 rounding, relative to the value
    # (1.3e-5 on a log-prob of -2.6, i.e. 5e-6 relative, on the CI machine with every transformers 5.16-5.24).
    torch.testing.assert_close(
        torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("make", [tiny_llama, tiny_ouro], ids=["llama", "ouro"])
def test_sync_weights_in_place(make):
    rollout_model, trained = make(seed=0), make(seed=1)
    worker = TorchRolloutWorker(rollout_model, 1)
    pointers = [p.data_ptr() for p in rollout_model.parameters()]
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    before = worker.generate(PROMPTS, params).completion_ids
    worker.sync_weights(trained)
    assert [p.data_ptr() for p in rollout_model.parameters()] == pointers
    for (name, a), b in zip(rollout_model.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), name
    after = worker.generate(PROMPTS, params).completion_ids
    assert after == TorchRolloutWorker(trained, 1).generate(PROMPTS, params).completion_ids
    assert after != before
    with pytest.raises(ValueError, match="no counterpart|lacks"):
        worker.sync_weights(tiny_llama() if make is tiny_ouro else tiny_ouro())


def test_train_mode_restored_and_protocol():
    model = tiny_llama().train()
    worker = TorchRolloutWorker(model, 1)
    assert isinstance(worker, RolloutWorker)
    rollout = worker.generate([[3, 4]], SamplingParams(max_new_tokens=3, seed=0))
    assert isinstance(rollout, Rollout) and model.training


def test_bad_inputs_raise_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not a looped model"):
        TorchRolloutWorker(model, 2)
    worker = TorchRolloutWorker(model, 1)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        worker.generate([[3], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="outside"):
        worker.generate([[3, 500]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_truncation_and_sampling_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    assert torch.isfinite(truncate_logits(logits, top_k=2, top_p=1.0)).sum() == 2
    probs = logits.softmax(-1)[0]  # [0.61, 0.22, 0.14, 0.03, 0.004]
    assert torch.isfinite(truncate_logits(logits, top_k=0, top_p=0.7)).sum() == 2  # 0.61 < 0.7 <= 0.83
    assert torch.isfinite(truncate_logits(logits, top_k=0, top_p=0.5)).sum() == 1
    # The race sampler draws from softmax(logits / T); logprobs are the untruncated ones.
    generator = torch.Generator().manual_seed(0)
    draws = 40_000
    tokens, logprobs = sample_next(logits.expand(draws, -1), 1.0, generator=generator)
    freq = torch.bincount(tokens, minlength=5).float() / draws
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    tokens, logprobs = sample_next(logits.expand(draws, -1), 1.0, top_k=2, generator=generator)
    assert set(tokens.tolist()) == {0, 1}
    torch.testing.assert_close(logprobs, probs.log()[tokens])  # untruncated, not renormalised
    tokens, _ = sample_next(logits.expand(4, -1), 0.0)
    assert tokens.tolist() == [0, 0, 0, 0]


def test_make_worker_builds_the_torch_engine_used_by_train_and_eval():
    from rollout import RolloutWorker, get_engine, make_worker

    model = tiny_ouro()
    worker = make_worker("torch", depth=2, model=model)
    assert isinstance(worker, RolloutWorker) and isinstance(worker, TorchRolloutWorker) and worker.depth == 2
    assert get_engine("torch").exact_logprobs and not get_engine("vllm").exact_logprobs
    worker.sleep(level=1)  # the lifecycle the trainer drives: no-ops for the torch engine
    worker.wake_up()
    worker.sync_weights(model)
    params = SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[])
    assert worker.generate(PROMPTS, params).completion_ids == hf_greedy(model, PROMPTS, 3, 2, None)
    with pytest.raises(ValueError, match="engine"):
        make_worker("sglang", depth=1, model=model)
