"""Self-distillation loss and exit metrics: exact values against a brute-force reference, stop-gradient,
chunking (same value and gradients, bounded lm_head batch), top-k, weighting, MSE variant, config."""

import math

import pytest
import torch
import torch.nn.functional as F

from rl.self_distill import (
    SELF_DISTILL_DEFAULTS,
    exit_metrics,
    exit_weights,
    resolve_exits,
    self_distill_loss,
    validate_self_distill,
)

B, S, H, V, T = 2, 9, 16, 40, 4


class RecordingHead(torch.nn.Module):
    """A linear lm_head that remembers the largest number of token rows it was ever called with."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, vocab, bias=False)
        self.max_rows = 0

    def forward(self, h):
        self.max_rows = max(self.max_rows, h.reshape(-1, h.shape[-1]).shape[0])
        return self.proj(h)


def make(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(B, S, H, generator=g).requires_grad_(requires_grad) for _ in range(T)]
    mask = torch.rand(B, S, generator=g) > 0.3
    mask[0, 0] = True
    head = RecordingHead(H, V)
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
    return states, head, mask


def reference(states, head, mask, exits, weights, tau=1.0):
    """Brute force: full [B,S,V] distributions, teacher detached, token mean over the mask."""
    teacher = F.log_softmax(head.proj(states[-1].detach()).detach() / tau, -1)
    total = 0.0
    for t, w in zip(exits, weights):
        student = F.log_softmax(head.proj(states[t - 1]) / tau, -1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # [B,S]
        total = total + w * kl[mask].mean()
    return total


def test_default_exits_and_weights():
    assert resolve_exits(None, 4) == [2, 3]  # exit 1 excluded by default
    assert resolve_exits(None, 2) == [1]  # T == 2: the only shallow exit
    assert resolve_exits("all", 4) == [1, 2, 3]
    assert resolve_exits("1,3", 4) == [1, 3]
    assert exit_weights([2, 3], "uniform") == [0.5, 0.5]
    assert exit_weights([2, 3], "linear") == pytest.approx([0.4, 0.6])
    with pytest.raises(ValueError, match="self_distill_exits.*outside 1..3"):
        resolve_exits([4], 4)


def test_loss_matches_bruteforce_reference_value_and_gradient():
    states, head, mask = make()
    loss, metrics = self_distill_loss(states, head, mask, weighting="linear", chunk_size=4)
    ref = reference(states, head, mask, [2, 3], [0.4, 0.6])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["loss/self_distill"] == pytest.approx(ref.item(), rel=1e-5)
    assert set(metrics) == {"loss/self_distill", "self_distill/kl_t2", "self_distill/kl_t3"}
    params = [states[1], states[2], head.proj.weight]
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_zero_when_exits_equal_deep_exit():
    states, head, mask = make()
    same = [states[-1].detach().clone().requires_grad_(True) for _ in range(T)]
    loss, metrics = self_distill_loss(same, head, mask, exits="all")
    assert abs(loss.item()) < 1e-6
    grads = torch.autograd.grad(loss, same[:-1])
    assert all(g.abs().max() < 1e-6 for g in grads)
    m = exit_metrics(same, head, mask)
    for t in range(1, T):
        assert abs(m[f"exit/kl_t{t}"]) < 1e-6
        assert m[f"exit/top1_agree_t{t}"] == 1.0
        assert m[f"exit/accept_t{t}"] == pytest.approx(1.0, abs=1e-5)


def test_no_gradient_reaches_the_teacher():
    states, head, mask = make()
    loss, _ = self_distill_loss(states, head, mask, exits="all")
    loss.backward()
    assert states[-1].grad is None  # deep state: stop-gradient
    assert states[0].grad is not None and states[0].grad.abs().sum() > 0
    # The lm_head gradient comes from the students only: it equals the reference with a frozen teacher.
    head.proj.weight.grad = None
    ref = reference(states, head, mask, [1, 2, 3], exit_weights([1, 2, 3], "linear"))
    (ref_grad,) = torch.autograd.grad(ref, [head.proj.weight])
    head.proj.weight.grad = None
    loss, _ = self_distill_loss(states, head, mask, exits="all")
    (grad,) = torch.autograd.grad(loss, [head.proj.weight])
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_chunked_equals_unchunked_and_bounds_the_vocab_sized_work():
    states, head, mask = make(seed=1)
    n = int(mask.sum())
    loss_full, _ = self_distill_loss(states, head, mask, chunk_size=10_000)
    g_full = torch.autograd.grad(loss_full, [states[1], states[2], head.proj.weight])
    assert head.max_rows == n  # unchunked: all masked tokens at once
    head.max_rows = 0
    loss_chunk, _ = self_distill_loss(states, head, mask, chunk_size=3)
    g_chunk = torch.autograd.grad(loss_chunk, [states[1], states[2], head.proj.weight])
    # Forward AND the checkpointed backward recompute never project more than 3 tokens at a time,
    # so at most 3 x V logits per exit exist at any moment (vs n x V unchunked).
    assert n > 3 and head.max_rows == 3
    assert loss_chunk.item() == pytest.approx(loss_full.item(), rel=1e-6)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_backward_does_not_keep_vocab_sized_tensors():
    """Everything autograd saves for backward is token x hidden sized; logits are recomputed per chunk."""
    states, _, mask = make(seed=1)
    vocab = 1000
    head = RecordingHead(H, vocab)
    n = int(mask.sum())
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = self_distill_loss(states, head, mask, chunk_size=3)
    # Without per-chunk recomputation the saved log-probs alone would be 2 exits x n x vocab numbers.
    assert sum(saved) < n * vocab
    loss.backward()
    assert head.max_rows == 3 and states[1].grad.abs().sum() > 0


def test_weighting_and_temperature():
    states, head, mask = make(seed=2)
    _, m = self_distill_loss(states, head, mask, weighting="uniform")
    lu, _ = self_distill_loss(states, head, mask, weighting="uniform")
    ll, _ = self_distill_loss(states, head, mask, weighting="linear")
    k2, k3 = m["self_distill/kl_t2"], m["self_distill/kl_t3"]
    assert lu.item() == pytest.approx(0.5 * k2 + 0.5 * k3, rel=1e-5)
    assert ll.item() == pytest.approx(0.4 * k2 + 0.6 * k3, rel=1e-5)
    lt, _ = self_distill_loss(states, head, mask, exits=[1], temperature=2.0)
    ref = reference(states, head, mask, [1], [1.0], tau=2.0)
    assert lt.item() == pytest.approx(ref.item(), rel=1e-5)
    l1, _ = self_distill_loss(states, head, mask, exits=[1], temperature=1.0)
    assert lt.item() != pytest.approx(l1.item(), rel=1e-3)


def test_top_k_teacher():
    states, head, mask = make(seed=3)
    full, _ = self_distill_loss(states, head, mask)
    same, _ = self_distill_loss(states, head, mask, top_k=V)  # k >= V is the full distribution
    assert same.item() == pytest.approx(full.item(), rel=1e-6)
    losses = [self_distill_loss(states, head, mask, top_k=k)[0].item() for k in (1, 5, 20)]
    # Coarsening to k+1 bins can only lower a KL (data processing), and more bins get closer to it.
    assert losses[0] <= losses[1] <= losses[2] <= full.item() + 1e-6
    assert losses[2] > 0
    # k = 1 by hand on one token: bins {teacher argmax, rest}.
    one = torch.zeros(B, S, dtype=torch.bool)
    one[0, 0] = True
    got, _ = self_distill_loss(states, head, one, exits=[2], top_k=1)
    with torch.no_grad():
        p = F.softmax(head.proj(states[3][0, 0]), -1)
        q = F.softmax(head.proj(states[1][0, 0]), -1)
        a = p.argmax()
        want = p[a] * math.log(p[a] / q[a]) + (1 - p[a]) * math.log((1 - p[a]) / (1 - q[a]))
    assert got.item() == pytest.approx(float(want), rel=1e-4)
    # Gradients flow to the student, not the teacher.
    loss, _ = self_distill_loss(states, head, mask, top_k=5)
    loss.backward()
    assert states[-1].grad is None and states[1].grad.abs().sum() > 0


def test_hidden_state_mse_variant():
    states, head, mask = make(seed=4)
    loss, m = self_distill_loss(states, head, mask, variant="mse", weighting="uniform")
    want = sum(0.5 * ((states[t - 1] - states[3].detach()) ** 2).mean(-1)[mask].mean() for t in (2, 3))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert "self_distill/mse_t2" in m
    loss.backward()
    assert states[-1].grad is None and states[2].grad.abs().sum() > 0
    assert head.max_rows == 0  # the MSE variant never touches the vocabulary


def test_normalizer_and_empty_mask():
    states, head, mask = make(seed=5)
    loss, _ = self_distill_loss(states, head, mask)
    n = int(mask.sum())
    scaled, _ = self_distill_loss(states, head, mask, normalizer=4 * n)
    assert scaled.item() == pytest.approx(loss.item() / 4, rel=1e-6)
    empty, m = self_distill_loss(states, head, torch.zeros(B, S, dtype=torch.bool))
    assert empty.item() == 0.0 and m["loss/self_distill"] == 0.0
    empty.backward()  # still connected to the graph
    with pytest.raises(ValueError, match="mask has shape"):
        self_distill_loss(states, head, mask[:, :-1])


def test_exit_metrics_match_reference():
    states, head, mask = make(seed=6, requires_grad=False)
    probs = torch.softmax(torch.randn(B, S, T), -1)
    m = exit_metrics(states, head, mask, probs, chunk_size=4)
    logp = [F.log_softmax(head.proj(h), -1)[mask] for h in states]
    for t in range(1, T):
        kl = (logp[-1].exp() * (logp[-1] - logp[t - 1])).sum(-1).mean()
        agree = (logp[t - 1].argmax(-1) == logp[-1].argmax(-1)).float().mean()
        accept = torch.minimum(logp[t - 1].exp(), logp[-1].exp()).sum(-1).mean()
        assert m[f"exit/kl_t{t}"] == pytest.approx(kl.item(), rel=1e-4)
        assert m[f"exit/top1_agree_t{t}"] == pytest.approx(agree.item())
        assert m[f"exit/accept_t{t}"] == pytest.approx(accept.item(), rel=1e-5)
        assert 0.0 <= m[f"exit/accept_t{t}"] <= 1.0
    for t in range(1, T + 1):
        assert m[f"exit/p_mean_t{t}"] == pytest.approx(probs[..., t - 1][mask].mean().item(), rel=1e-5)
    assert f"exit/kl_t{T}" not in m


def test_validate_config_keys():
    cfg = validate_self_distill({}, depth=4)
    assert not cfg.enabled and cfg.exits is None and cfg.weighting == "linear" and cfg.temperature == 1.0
    assert set(SELF_DISTILL_DEFAULTS) >= {"self_distill_coef", "self_distill_exits", "self_distill_weighting",
                                         "self_distill_temperature"}
    cfg = validate_self_distill({"self_distill_coef": 0.5, "self_distill_exits": "1, 3",
                                 "self_distill_weighting": "UNIFORM"}, depth=4)
    assert cfg.enabled and cfg.exits == [1, 3] and cfg.weighting == "uniform"

    class Obj:  # attribute access, as on a TrainConfig dataclass
        self_distill_coef = 0.1
        self_distill_exits = [2, 3]

    assert validate_self_distill(Obj()).exits == [2, 3]
    bad = [
        ({"self_distill_coef": -1}, "self_distill_coef"),
        ({"self_distill_coef": "lots"}, "self_distill_coef"),
        ({"self_distill_temperature": 0}, "self_distill_temperature"),
        ({"self_distill_weighting": "cubic"}, "self_distill_weighting"),
        ({"self_distill_variant": "l1"}, "self_distill_variant"),
        ({"self_distill_exits": "2,x"}, "self_distill_exits"),
        ({"self_distill_exits": [0]}, "self_distill_exits"),
        ({"self_distill_exits": [2, 2]}, "self_distill_exits"),
        ({"self_distill_exits": [4]}, "self_distill_exits.*outside"),
        ({"self_distill_top_k": -3}, "self_distill_top_k"),
        ({"self_distill_warmup_steps": -1}, "self_distill_warmup_steps"),
        ({"self_distill_warmup_steps": "soon"}, "self_distill_warmup_steps"),
    ]
    for values, msg in bad:
        with pytest.raises(ValueError, match=msg):
            validate_self_distill(values, depth=4)


def test_warmup_ramps_the_coefficient_linearly():
    cfg = validate_self_distill({"self_distill_coef": 2.0, "self_distill_warmup_steps": 4})
    assert [cfg.coef_at(s) for s in (1, 2, 3, 4, 5, 100)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    flat = validate_self_distill({"self_distill_coef": 2.0})
    assert flat.warmup_steps == 0 and flat.coef_at(1) == 2.0


def test_config_loss_uses_its_settings():
    states, head, mask = make(seed=7)
    cfg = validate_self_distill({"self_distill_coef": 1.0, "self_distill_exits": [1],
                                 "self_distill_temperature": 2.0, "self_distill_chunk_size": 2})
    from rl.self_distill import configured_loss

    loss, _ = configured_loss(cfg, states, head, mask)
    assert head.max_rows == 2
    ref = reference(states, head, mask, [1], [1.0], tau=2.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------------------- with a tiny Ouro model


def tiny_ouro():
    modeling = pytest.importorskip("looped")
    if not hasattr(modeling, "OuroForCausalLM"):
        pytest.skip("looped.OuroForCausalLM not available")
    torch.manual_seed(0)
    cfg = modeling.OuroConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, total_ut_steps=4, max_position_embeddings=128,
                              eos_token_id=1, pad_token_id=0)
    return modeling.OuroForCausalLM(cfg)


def test_on_tiny_ouro_model_gradients_come_from_students_only():
    model = tiny_ouro()
    ids = torch.randint(2, 37, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :4] = False  # "prompt" positions are not distilled
    out = model(ids, output_exits=True)
    assert len(out.exit_hidden_states) == 4 and out.exit_probs.shape == (2, 10, 4)
    loss, metrics = self_distill_loss(out.exit_hidden_states, model.lm_head, mask, chunk_size=5)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    # Reference: the teacher distribution as a constant (computed once, detached), full tensors.
    out = model(ids, output_exits=True)
    teacher = F.log_softmax(model.lm_head(out.exit_hidden_states[-1]), -1).detach()
    ref = 0.0
    for t, w in zip([2, 3], [0.4, 0.6]):
        student = F.log_softmax(model.lm_head(out.exit_hidden_states[t - 1]), -1)
        ref = ref + w * (teacher.exp() * (teacher - student)).sum(-1)[mask].mean()
    want = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and loss.item() > 0
    for a, b in zip(got, want):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    m = exit_metrics(out.exit_hidden_states, model.lm_head, mask, out.exit_probs)
    assert m["exit/kl_t2"] == pytest.approx(metrics["self_distill/kl_t2"], rel=1e-4)
    deep_only = (out.exit_hidden_states[-1],) * 4  # every exit IS the deep exit
    zero, _ = self_distill_loss(deep_only, model.lm_head, mask, exits="all")
    assert abs(zero.item()) < 1e-6
