"""The update's forward with each distinct prompt run once (rl/shared_prompt.py) is the plain forward:
same logprobs, exit states, exit probabilities and gradients, on a looped and a standard model, with
prompts of different lengths (left padding), completions of different lengths and split groups."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import looped  # noqa: F401
from looped import OuroConfig, OuroForCausalLM
from rl.batch import Sample, collate
from rl.losses import token_logprobs
from rl.shared_prompt import distinct_prompts, shared_prompt_forward

VOCAB = 50


def ouro(seed: int = 0) -> OuroForCausalLM:
    torch.manual_seed(seed)
    return OuroForCausalLM(OuroConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3,
                                      max_position_embeddings=128, pad_token_id=0)).eval()


def qwen(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0)).eval()


def samples(seed: int = 1) -> list[Sample]:
    """Three prompts of lengths 5, 3, 4 with 3, 2 and 1 completions of lengths 1..9 (the last prompt alone)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 4)]
    rows = []
    for p, count in zip(prompts, (3, 2, 1)):
        for _ in range(count):
            n = int(torch.randint(1, 10, (1,), generator=g))
            c = torch.randint(1, VOCAB, (n,), generator=g).tolist()
            rows.append(Sample(0, p, c, [0.0] * n, False, 0.0, {}, None, ""))
    order = torch.randperm(len(rows), generator=g).tolist()  # groups interleaved, as after length bucketing
    return [rows[i] for i in order]


def plain_and_shared(model, batch: dict, **kwargs):
    ids, attn, p_len = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    c_len = ids.shape[1] - p_len
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    plain = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=c_len + 1,
                  **kwargs)
    rows = distinct_prompts(ids, attn, p_len)
    assert len(rows[0]) < len(rows[1])
    shared = shared_prompt_forward(model, ids, attn, pos, p_len, rows, **kwargs)
    return plain, shared, c_len


def test_distinct_prompts_finds_each_rows_prompt():
    batch = collate(samples(), pad_id=0, mask_truncated=False)
    first, inverse = distinct_prompts(batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
    assert len(first) == 3 and len(inverse) == 6
    p_len = batch["prompt_len"]
    prompt = batch["input_ids"][:, :p_len]
    for row, u in enumerate(inverse.tolist()):
        assert torch.equal(prompt[row], prompt[first[u]])  # the row's prompt is its representative's
        assert first[u] <= row  # the representative is the first row with that prompt
    assert len(set(first.tolist())) == 3
    one_each = [s for i, s in enumerate(samples()) if i in first.tolist()]
    lone = collate(one_each, pad_id=0, mask_truncated=False)
    first, inverse = distinct_prompts(lone["input_ids"], lone["attention_mask"], lone["prompt_len"])
    assert first[inverse].tolist() == [0, 1, 2]  # each row is its own prompt's first row


def test_a_pad_column_tells_prompts_apart():
    """[x, y] and [pad, x, y] differ only by padding: the mask column keeps them apart, even with pad id x."""
    a = Sample(0, [7, 8], [3], [0.0], False, 0.0, {}, None, "")
    b = Sample(0, [7, 7, 8], [3], [0.0], False, 0.0, {}, None, "")
    batch = collate([a, b, a], pad_id=7, mask_truncated=False)
    first, inverse = distinct_prompts(batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
    assert inverse.tolist() == [inverse[0].item(), inverse[1].item(), inverse[0].item()]
    assert inverse[0] != inverse[1]


@pytest.mark.parametrize("kind", ["ouro", "qwen2"])
def test_shared_forward_is_the_plain_forward(kind):
    model = ouro() if kind == "ouro" else qwen()
    batch = collate(samples(), pad_id=0, mask_truncated=False)
    kwargs = {"depth": 3, "output_exits": True} if kind == "ouro" else {}
    plain, shared, c_len = plain_and_shared(model, batch, **kwargs)
    tokens = batch["input_ids"][:, batch["prompt_len"]:]
    cmask = batch["completion_mask"].bool()
    lp_plain, _ = token_logprobs(plain.logits[:, :-1], tokens, 1.0)
    lp_shared, _ = token_logprobs(shared.logits[:, :-1], tokens, 1.0)
    assert shared.logits.shape == plain.logits.shape
    assert torch.allclose(lp_plain[cmask], lp_shared[cmask], atol=1e-5)
    if kind == "ouro":
        real = batch["attention_mask"].bool()  # padding positions hold no trained value
        assert len(shared.exit_hidden_states) == len(plain.exit_hidden_states) == 3
        for a, b in zip(plain.exit_hidden_states, shared.exit_hidden_states):
            assert a.shape == b.shape and torch.allclose(a[real], b[real], atol=1e-5)
        assert torch.allclose(plain.exit_probs[real], shared.exit_probs[real], atol=1e-5)


@pytest.mark.parametrize("kind", ["ouro", "qwen2"])
def test_shared_forward_has_the_plain_gradients(kind):
    """Each prompt's gradient is the sum over its rows: the cache gather carries it back."""
    batch = collate(samples(), pad_id=0, mask_truncated=False)
    tokens = batch["input_ids"][:, batch["prompt_len"]:]
    cmask = batch["completion_mask"]
    grads = []
    for shared in (False, True):
        model = ouro() if kind == "ouro" else qwen()
        kwargs = {"depth": 3} if kind == "ouro" else {}
        plain, out, _ = plain_and_shared(model, batch, **kwargs)
        logits = (out if shared else plain).logits[:, :-1]
        lp, _ = token_logprobs(logits, tokens, 1.0)
        (lp * cmask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        scale = grads[0][name].abs().max().clamp(min=1e-3)
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-4 * float(scale)), name


# ----------------------------------------------------------------------------- in the update


def _policy(**keys):
    from accelerate import Accelerator

    from rl.config import TrainConfig
    from rl.data import EMBEDDED_MODEL
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    cfg = TrainConfig(max_new_tokens=12, torch_threads=1, prompts_per_step=3, num_generations=2, loss_type="dapo",
                      **keys)
    return Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=False, self_distill=SelfDistillConfig(),
                  pad_id=0)


def _update(policy, rows, monkeypatch) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
    """The gradients of the update's first optimizer step, its metrics, and how many of the update's
    forwards (not its check's) went the shared-prompt way."""
    import rl.policy

    got, step, calls = {}, policy._optimizer_step, []
    forward = rl.policy.update_forward

    def capture(finite, at):  # the first optimizer update's (Adam turns float-order noise in near-zero
        if not got:  # gradients into lr-sized steps, so later updates are compared by their metrics)
            got.update({n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
        return step(finite, at)

    def counted(model, ids, attn, p_len, rows=None, **kw):
        if rows is not None:
            calls.append(1)
        return forward(model, ids, attn, p_len, rows, **kw)

    policy._optimizer_step = capture
    monkeypatch.setattr(rl.policy, "update_forward", counted)
    return got, policy.update(rows, 0), len(calls)


def _group_rows() -> list[Sample]:
    rows = samples()
    for i, s in enumerate(rows):
        s.advantage = [1.0, -0.5, 0.8, -1.2, 0.3, -0.7][i]
        s.rollout_logprobs = [-1.0] * len(s.completion_ids)
    return rows


@pytest.mark.parametrize("keys", [{}, {"lora_rank": 4}, {"beta": 0.04, "num_iterations": 2}],
                         ids=["default", "lora", "kl_reference_two_updates"])
def test_the_update_with_shared_prompts_is_the_plain_update(monkeypatch, keys):
    """The whole update (policy term, KL to the reference model, the scoring pass of several updates, LoRA)."""
    import copy

    shared_policy = _policy(**keys)
    plain_policy = copy.deepcopy(shared_policy)
    plain_policy.share_prompts = False
    got, metrics, calls = _update(shared_policy, _group_rows(), monkeypatch)
    want, want_metrics, plain_calls = _update(plain_policy, _group_rows(), monkeypatch)
    assert calls >= 1 and plain_calls == 0  # the shared path ran, and only in the first policy
    assert shared_policy.share_prompts  # passed its check
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    for key in ("loss/policy", "mismatch/logp_abs_max", "entropy") + (("kl_ref",) if "beta" in keys else ()):
        assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("broken", ["wrong_rows", "raises"])
def test_a_cache_that_fails_the_check_falls_back_to_the_plain_forward(monkeypatch, capsys, broken):
    """A model whose cache does not hand each row its own prompt (or cannot be indexed) is caught by the
    check before the first update: one warning, and the update is the plain one."""
    from transformers import DynamicCache

    def wrong_rows(self, indices):  # every row reads the prompt of another
        for layer in self.layers:
            layer.batch_select_indices(indices.flip(0))

    def raises(self, indices):
        raise NotImplementedError("this cache cannot select rows")

    monkeypatch.setattr(DynamicCache, "batch_select_indices", wrong_rows if broken == "wrong_rows" else raises)
    policy = _policy()
    got, _, calls = _update(policy, _group_rows(), monkeypatch)
    lines = [line for line in capsys.readouterr().err.splitlines() if "whole prompt" in line]
    assert len(lines) == 1 and lines[0].startswith("looprl train: WARNING: OuroForCausalLM is updated with every "
                                                   "row's whole prompt (the same training, slower)")
    assert ("differ from the plain forward's" in lines[0]) if broken == "wrong_rows" else \
        ("NotImplementedError: this cache cannot select rows" in lines[0])
    assert not policy.share_prompts and calls == 0 and got
