"""Tests for looped (Ouro looped LM) on tiny CPU configs; the whole file runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import looped  # noqa: F401  (registers the Ouro classes with the Auto classes)
from looped import OuroConfig, OuroForCausalLM, exit_probs_from_lambdas, threshold_exit_index
from looped.hf_compat import CACHE_NAME, enable_activation_checkpointing

T = 4
VOCAB = 100


def tiny_config(**overrides) -> OuroConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        total_ut_steps=T,
        max_position_embeddings=256,
        initializer_range=0.05,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return OuroConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> OuroForCausalLM:
    torch.manual_seed(seed)
    return OuroForCausalLM(tiny_config(**overrides)).eval()


def real_ouro_config_dict(num_layers: int = 24) -> dict:
    """Shaped like the published Ouro config.json (spec §1), including remote-code keys."""
    return {
        "architectures": ["OuroForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModel": "modeling_ouro.OuroModel",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
        },
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 65536,
        "max_window_layers": 28,
        "model_type": "ouro",
        "num_attention_heads": 16,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "chunk_size": 2048,
        "transformers_version": "4.54.1",
        "use_cache": True,
        "vocab_size": 49152,
    }


# ---------------------------------------------------------------------------------------------
# names, config, loading


def test_parameter_names_match_ouro_checkpoints():
    model = tiny_model()
    per_layer = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "input_layernorm_2.weight",
        "post_attention_layernorm.weight",
        "post_attention_layernorm_2.weight",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    expected |= {f"model.layers.{i}.{name}" for i in range(2) for name in per_layer}
    assert set(model.state_dict().keys()) == expected
    assert model.model.early_exit_gate.weight.shape == (1, 64)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    # GQA shapes: 4 query heads, 2 key/value heads of head_dim 16
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_config_keys_defaults_and_errors():
    cfg = OuroConfig()
    d = cfg.to_dict()
    for key in ("total_ut_steps", "early_exit_threshold", "num_key_value_heads", "head_dim", "rope_theta",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "intermediate_size"):
        assert key in d, key
    assert cfg.model_type == "ouro" and cfg.total_ut_steps == 4 and cfg.head_dim == 128
    assert cfg.num_key_value_heads == 16 and cfg.rope_parameters["rope_theta"] == 1_000_000
    assert OuroConfig(some_unknown_key=3, auto_map={"AutoConfig": "x.Y"}).some_unknown_key == 3
    with pytest.raises(ValueError, match="num_key_value_heads"):
        OuroConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)
    with pytest.raises(ValueError, match="total_ut_steps"):
        OuroConfig(total_ut_steps=0)


@pytest.mark.parametrize("num_layers, expected", [(24, 1_434_652_673), (48, 2_667_974_657)])
def test_real_ouro_config_builds_on_meta_with_exact_parameter_count(tmp_path, num_layers, expected):
    (tmp_path / "config.json").write_text(json.dumps(real_ouro_config_dict(num_layers)))
    cfg = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code: our registered class is used
    assert isinstance(cfg, OuroConfig)
    assert cfg.auto_map["AutoConfig"] == "configuration_ouro.OuroConfig" and cfg.chunk_size == 2048
    assert cfg.sliding_window is None and cfg.rope_parameters["rope_theta"] == 1_000_000
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, OuroForCausalLM)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_save_load_roundtrip_is_exact_without_remote_code(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    # make the saved config look like a hub Ouro checkpoint (auto_map pointing at remote code)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["auto_map"] = real_ouro_config_dict()["auto_map"]
    cfg_path.write_text(json.dumps(raw))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, OuroForCausalLM)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


# ---------------------------------------------------------------------------------------------
# loops and exits


def test_depth_logits_equal_readout_of_each_exit():
    model = tiny_model()
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        out = model(ids, output_exits=True)
        assert len(out.exit_hidden_states) == T
        assert out.exit_probs.shape == (2, 9, T) and out.exit_probs.dtype == torch.float32
        torch.testing.assert_close(out.exit_probs.sum(-1), torch.ones(2, 9), atol=1e-6, rtol=0)
        per_depth = [model(ids, depth=t).logits for t in range(1, T + 1)]
        for t in range(1, T + 1):
            readout = model.lm_head(out.exit_hidden_states[t - 1])
            torch.testing.assert_close(per_depth[t - 1], readout, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.logits, per_depth[-1], atol=0, rtol=0)
        # the loops really do something different
        assert (per_depth[0] - per_depth[-1]).abs().max() > 1e-2
        # exit states are normed (the final norm ran after every loop): rms ~ norm weight (= 1 at init)
        rms = out.exit_hidden_states[0].pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_exit_probs_worked_example_and_threshold():
    lambdas = torch.tensor([0.1, 0.5, 0.8, 0.3])
    p = exit_probs_from_lambdas(lambdas)
    torch.testing.assert_close(p, torch.tensor([0.1, 0.45, 0.36, 0.09]), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.cumsum(-1), torch.tensor([0.1, 0.55, 0.91, 1.0]), atol=1e-6, rtol=0)
    assert threshold_exit_index(p, 0.5).item() == 1  # step 2
    assert threshold_exit_index(p, 0.05).item() == 0
    assert threshold_exit_index(p, 0.95).item() == 3
    # q >= 1 always means the last loop, even when the CDF already reaches 1.0 at the first loop
    certain = exit_probs_from_lambdas(torch.tensor([1.0, 0.2, 0.2, 0.2]))
    assert certain[0].item() == 1.0
    assert threshold_exit_index(certain, 1.0).item() == 3
    assert exit_probs_from_lambdas(torch.tensor([0.7])).tolist() == [1.0]  # depth 1


def test_exit_threshold_selects_the_loop_and_keeps_cache_complete():
    model = tiny_model()
    with torch.no_grad():
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(10.0)  # lambda ~ 1: exit at loop 1 for q <= ~0.99995
        ids = torch.randint(1, VOCAB, (1, 6))
        depth1 = model(ids, depth=1).logits
        last = model(ids).logits
        early = model(ids, exit_threshold=0.5, use_cache=True)
        torch.testing.assert_close(early.logits, depth1, atol=1e-6, rtol=0)
        assert len(early.cache.layers) == 2 * T  # all loops still ran
        torch.testing.assert_close(model(ids, exit_threshold=1.0).logits, last, atol=0, rtol=0)
        with pytest.raises(ValueError, match="exit_threshold"):
            model(ids, exit_threshold=-0.1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_depth_is_a_clear_error(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match="depth must be an integer"):
        model(torch.randint(1, VOCAB, (1, 3)), depth=bad)


# ---------------------------------------------------------------------------------------------
# caching


def _decode_logits(model, ids, mask, cache, prefill, depth, static=False):
    """Prefill `prefill` tokens, then decode one token at a time; return the concatenated logits."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    chunks = [(0, prefill)] + [(i, i + 1) for i in range(prefill, ids.shape[1])]
    logits = []
    for start, end in chunks:
        extra = {"cache_position": torch.arange(start, end)} if static else {"use_cache": True}
        out = model(
            ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            depth=depth,
            **extra,
        )
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("depth", [1, 3, T])
@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_equals_full_forward(depth, static):
    model = tiny_model()
    ids = torch.randint(1, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    with torch.no_grad():
        full = model(ids, attention_mask=mask, depth=depth).logits
        cache = model.make_static_cache(2, 16, depth=depth) if static else None
        inc, cache = _decode_logits(model, ids, mask, cache, prefill=5, depth=depth, static=static)
        # without the cache the decode steps are wrong: the test can tell
        no_cache = model(ids[:, 5:6], position_ids=torch.full((2, 1), 5), depth=depth).logits
    assert len(cache.layers) == 2 * depth  # one slot per (loop, layer)
    assert (full[0] - inc[0]).abs().max() <= 1e-5
    assert (full[1, 4:] - inc[1, 4:]).abs().max() <= 1e-5
    assert (no_cache[0, 0] - full[0, 5]).abs().max() > 1e-2


def test_left_padded_rows_equal_unpadded_rows():
    model = tiny_model()
    a, b = torch.randint(1, VOCAB, (8,)), torch.randint(1, VOCAB, (5,))
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0], ids[1, 3:] = a, b
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], model(a[None]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[1, 3:], model(b[None]).logits[0], atol=1e-5, rtol=0)


def test_packed_sequences_do_not_attend_across_boundaries():
    """Trainer packing: no attention_mask, position_ids restarting at 0 for each packed sequence."""
    model = tiny_model()
    a, b = torch.randint(1, VOCAB, (6,)), torch.randint(1, VOCAB, (4,))
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(6), torch.arange(4)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits[0]
        torch.testing.assert_close(out[:6], model(a[None]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[6:], model(b[None]).logits[0], atol=1e-5, rtol=0)


def test_cache_depth_and_size_errors():
    model = tiny_model()
    ids = torch.randint(1, VOCAB, (1, 4))
    cache = model.make_static_cache(1, 8, depth=2)
    with pytest.raises(ValueError, match="depth"):
        model(ids, cache=cache, depth=3)
    filled = DynamicCache(config=model.config)  # generic L-slot cache: extended while empty
    with torch.no_grad():
        model(ids, cache=filled, use_cache=True)
    assert len(filled.layers) == 2 * T


def test_scoring_and_training_forwards_allocate_no_cache():
    model = tiny_model()
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        assert model(ids).cache is None
        out = model(ids, labels=ids, use_cache=True)
        assert out.cache is None and torch.isfinite(out.loss)
    model.train()
    assert model(ids, labels=ids).cache is None


# ---------------------------------------------------------------------------------------------
# generation


def _greedy_reference(model, prompt: torch.Tensor, steps: int, depth: int) -> list[int]:
    """Greedy decoding with full (uncached) forwards: the ground truth for generate()."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq[None], depth=depth).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
    return seq[len(prompt):].tolist()


@pytest.mark.parametrize("depth", [None, 2])
def test_generate_greedy_left_padded_batch_equals_per_row(depth):
    model = tiny_model(seed=1, initializer_range=0.3)  # large init: varied greedy tokens
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, depth=depth)
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert len(getattr(out, CACHE_NAME).layers) == 2 * (depth or T)  # generate()'s output names it per release
    batched = out.sequences[:, width:].tolist()
    for i, p in enumerate(prompts):
        single = model.generate(p[None], **kwargs)[0, len(p):].tolist()
        assert batched[i] == single
        assert single == _greedy_reference(model, p, 8, depth or T)
    assert len({tuple(row) for row in batched}) > 1 and any(len(set(row)) > 1 for row in batched)


def test_generate_sampling_and_static_cache():
    model = tiny_model(seed=1, initializer_range=0.3)
    prompt = torch.randint(1, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    s1 = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, **kwargs)
    torch.manual_seed(0)
    s2 = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, **kwargs)
    assert s1.shape == (2, 11) and torch.equal(s1, s2)
    greedy = model.generate(prompt, do_sample=False, **kwargs)
    static = model.generate(prompt, do_sample=False, cache_implementation="static", **kwargs)
    assert torch.equal(greedy, static)


# ---------------------------------------------------------------------------------------------
# training


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(ids, labels=ids, output_exits=True)
    weights = torch.arange(T, dtype=torch.float32)
    (out.loss + (out.exit_probs * weights).mean()).backward()  # exit term trains the gate
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_reach_all_weights_with_and_without_checkpointing(reentrant):
    model = tiny_model()
    model.train()
    ids = torch.randint(1, VOCAB, (2, 6))
    plain = _grads(model, ids)
    names = {n for n, _ in model.named_parameters()}
    assert plain.keys() == names
    assert all(g.abs().sum() > 0 for g in plain.values())
    enable_activation_checkpointing(model, use_reentrant=reentrant)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = _grads(model, ids)
    assert checkpointed.keys() == names
    for n in names:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_generate_exit_threshold_reads_the_early_loop():
    model = tiny_model(seed=1, initializer_range=0.3)
    with torch.no_grad():
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(10.0)  # lambda ~ 1: the CDF reaches 0.5 at loop 1
    prompt = torch.randint(1, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    depth1 = model.generate(prompt, depth=1, **kwargs)
    last = model.generate(prompt, **kwargs)
    assert not torch.equal(depth1, last)
    assert torch.equal(model.generate(prompt, exit_threshold=0.5, **kwargs), depth1)
    model.config.early_exit_threshold = 0.5  # the config's q is generate()'s default
    assert torch.equal(model.generate(prompt, **kwargs), depth1)
    model.config.early_exit_threshold = 1.0
    assert torch.equal(model.generate(prompt, **kwargs), last)
