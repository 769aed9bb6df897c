"""Exit-weighted policy term: value and gradients against a brute-force reference for every loss and
weighting on a tiny looped model, the S = {T} path equal to the plain loss, gate gradients as documented
(none from the policy term; only the gate's parameters from the Stage-II gate loss), learned weights,
metrics, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from rl.exit_gate import gate_continuation_targets, gate_stage2_loss
from rl.exit_policy import (
    ExitPolicyConfig,
    ExitWeights,
    exit_policy_metrics,
    exit_token_logprobs,
    parse_policy_exits,
    static_weights,
    validate_exit_policy,
    weights_for,
)
from rl.losses import loss_normaliser
from rl.objective import policy_loss

T, P, C, B = 3, 3, 4, 3
LOSSES = ("grpo", "dapo", "dr_grpo", "cispo")
WEIGHTINGS = ("uniform", "progressive", "gate", "learned")


@pytest.fixture(scope="module")
def model():
    import rl  # noqa: F401  (registers the architecture)
    from looped import OuroConfig, OuroForCausalLM

    torch.manual_seed(0)
    cfg = OuroConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, total_ut_steps=T, max_position_embeddings=32)
    m = OuroForCausalLM(cfg).eval()
    with torch.no_grad():  # a gate that is not sigmoid(0) everywhere, so p(t) varies per token
        m.model.early_exit_gate.weight.normal_(0.0, 1.0)
        m.model.early_exit_gate.bias.fill_(0.3)
    return m


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 23, (B, P + C), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    adv = torch.tensor([1.5, -0.7, 0.4])
    return ids, mask, adv


def _reference(model, ids, mask, adv, exits, weighting, loss_type, old, tis, alpha, learned_logits):
    """Everything by hand: full-sequence logits per exit, the gate pdf from the lambdas, per-exit PPO/CISPO."""
    out = model(input_ids=ids, depth=T, output_exits=True)
    tokens = ids[:, P:]
    lps = []
    for t in exits:
        logits = model.lm_head(out.exit_hidden_states[t - 1]).float()  # [B, P+C, V]
        lp = F.log_softmax(logits, -1)[:, P - 1:P + C - 1].gather(-1, tokens[..., None])[..., 0]
        lps.append(lp)
    if weighting == "uniform":
        w = [torch.full((B, C), 1.0 / len(exits)) for _ in exits]
    elif weighting == "progressive":
        total = sum(s ** alpha for s in exits)
        w = [torch.full((B, C), t ** alpha / total) for t in exits]
    elif weighting == "learned":
        sm = torch.softmax(learned_logits, 0)
        w = [sm[k].expand(B, C) for k in range(len(exits))]
    else:  # gate: p(t) = lambda_t prod_{j<t} (1 - lambda_j), last loop the rest; detached, over S
        g = model.model.early_exit_gate
        lam = [torch.sigmoid(g(h)[..., 0]).detach() for h in out.exit_hidden_states]
        p, surv = [], torch.ones_like(lam[0])
        for t in range(1, T + 1):
            p.append(lam[t - 1] * surv if t < T else surv)
            surv = surv * (1 - lam[t - 1])
        picked = [p[t - 1][:, P - 1:P + C - 1] for t in exits]
        z = sum(picked)
        w = [x / z for x in picked]
    per_token = torch.zeros(B, C)
    a = adv[:, None]
    for k, lp in enumerate(lps):
        r = torch.exp(lp - old[:, k])
        if loss_type == "cispo":
            s = -torch.clamp(r, max=5.0).detach() * a * lp
        else:
            s = -torch.minimum(r * a, torch.clamp(r, 0.8, 1.28) * a)
        per_token = per_token + w[k] * s
    per_token = per_token * tis
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1)).sum() / B
    norm = loss_normaliser(loss_type, B, int(mask.sum()), C)
    return (per_token * mask).sum() / norm


def _pipeline(model, ids, mask, adv, exits, weighting, loss_type, old, tis, alpha, learned):
    """What rl/policy.py does: exit log-probs from the one forward, weights_for, policy_loss."""
    out = model(input_ids=ids, depth=T, output_exits=True, logits_to_keep=C + 1)
    tokens = ids[:, P:]
    deep = F.log_softmax(out.logits[:, -(C + 1):-1].float(), -1).gather(-1, tokens[..., None])[..., 0]
    exit_lp = exit_token_logprobs(out.exit_hidden_states, model.lm_head, tokens, exits, 1.0, deep_logp=deep)
    cfg = ExitPolicyConfig(tuple(exits), weighting, alpha)
    w = weights_for(cfg, exits, out.exit_probs[:, -(C + 1):-1], learned, (B, C))
    norm = loss_normaliser(loss_type, B, int(mask.sum()), C)
    return policy_loss(loss_type, deep, deep.detach(), adv, mask, norm, is_weights=tis,
                       exit_logp=exit_lp, exit_old_logp=old, exit_weights=w).loss


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_value_and_gradients_match_brute_force(model, loss_type, weighting):
    ids, mask, adv = _batch()
    exits = [1, 3]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off-policy: old log-probs perturbed so that some ratios leave the clip range
        out = model(input_ids=ids, depth=T, output_exits=True)
        base = exit_token_logprobs(out.exit_hidden_states, model.lm_head, ids[:, P:], exits, 1.0)
    old = base + 0.4 * torch.randn(base.shape, generator=g)
    tis = torch.rand(B, C, generator=g) + 0.5
    learned = ExitWeights(len(exits))
    with torch.no_grad():
        learned.logits.copy_(torch.tensor([0.3, -0.2]))
    params = [p for p in model.parameters()] + [learned.logits]

    ref = _reference(model, ids, mask, adv, exits, weighting, loss_type, old, tis, 1.5, learned.logits)
    got = _pipeline(model, ids, mask, adv, exits, weighting, loss_type, old, tis, 1.5, learned)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    nonzero = 0
    for a, b in zip(g_ref, g_got):
        a = torch.zeros(1) if a is None else a
        b = torch.zeros(1) if b is None else b
        torch.testing.assert_close(b.expand_as(a) if b.numel() == 1 else b, a, rtol=1e-4, atol=1e-6)
        nonzero += int(a.abs().sum() > 0)
    assert nonzero > 3  # the comparison is not vacuous: the LM receives gradient


def test_gate_weights_send_no_gradient_to_the_gate(model):
    ids, mask, adv = _batch()
    exits = [1, 2, 3]
    with torch.no_grad():
        old = exit_token_logprobs(model(input_ids=ids, depth=T, output_exits=True).exit_hidden_states,
                                  model.lm_head, ids[:, P:], exits, 1.0)
    loss = _pipeline(model, ids, mask, adv, exits, "gate", "dapo", old + 0.1, None, 1.0, None)
    gate = list(model.model.early_exit_gate.parameters())
    grads = torch.autograd.grad(loss, gate + [model.lm_head.weight], allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads[:-1])
    assert grads[-1].abs().sum() > 0


def test_stage2_gate_loss_trains_only_the_gate(model):
    ids, mask, _ = _batch()
    out = model(input_ids=ids, depth=T, output_exits=True)
    with torch.no_grad():
        all_lp = exit_token_logprobs(out.exit_hidden_states, model.lm_head, ids[:, P:], [1, 2, 3], 1.0)
    loss, metrics = gate_stage2_loss(out.exit_hidden_states, model.model.exit_gate_logits, all_lp, mask)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    for (name, _), g in zip(named.items(), grads):
        moved = g is not None and g.abs().sum() > 0
        assert moved == name.startswith("model.early_exit_gate."), name
    assert set(metrics) == {"gate/target_continue_t2", "gate/target_continue_t3"}

    # value by hand: BCE(1 - lambda_{t-1}, sigmoid(50 (max(0, L_{t-1} - L_t) - 0.005))), t = 2..T, / T
    lam = [torch.sigmoid(model.model.early_exit_gate(h)[..., 0])[:, P - 1:P + C - 1] for h in out.exit_hidden_states]
    nll = -all_lp
    total = 0.0
    for t in range(2, T + 1):
        target = torch.sigmoid(50 * ((nll[:, t - 2] - nll[:, t - 1]).clamp(min=0) - 0.005))
        cont = 1 - lam[t - 2]
        bce = -(target * cont.log() + (1 - target) * (1 - cont).log())
        total = total + (bce * mask).sum()
    assert loss.detach().item() == pytest.approx(float(total) / T / float(mask.sum()), rel=1e-5)


def test_continuation_targets():
    lp = torch.tensor([[[-2.0], [-1.0], [-1.0]]])  # exit 2 improves by 1 nat, exit 3 by nothing
    c = gate_continuation_targets(lp)
    assert c[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert c[0, 1, 0].item() == pytest.approx(1 / (1 + math.exp(0.25)))


@pytest.mark.parametrize("loss_type", LOSSES)
def test_single_last_exit_equals_the_plain_loss(model, loss_type):
    """S = {T}, w = 1 through the exit path gives the plain loss's value and gradient bit for bit."""
    ids, mask, adv = _batch()
    out = model(input_ids=ids, depth=T, output_exits=True, logits_to_keep=C + 1)
    tokens = ids[:, P:]
    deep = F.log_softmax(out.logits[:, -(C + 1):-1].float(), -1).gather(-1, tokens[..., None])[..., 0]
    old = deep.detach() - 0.3 * torch.linspace(-1, 1, C)
    norm = loss_normaliser(loss_type, B, int(mask.sum()), C)
    plain = policy_loss(loss_type, deep, old, adv, mask, norm)
    exit_lp = exit_token_logprobs(out.exit_hidden_states, model.lm_head, tokens, [T], 1.0, deep_logp=deep)
    w = weights_for(ExitPolicyConfig((T,), "uniform"), [T], None, None, (B, C))
    multi = policy_loss(loss_type, deep, old, adv, mask, norm, exit_logp=exit_lp, exit_old_logp=old[:, None],
                        exit_weights=w)
    assert multi.loss.item() == plain.loss.item()
    assert (multi.clip_low.item(), multi.clip_high.item()) == (plain.clip_low.item(), plain.clip_high.item())
    (g1,) = torch.autograd.grad(plain.loss, [model.lm_head.weight], retain_graph=True)
    (g2,) = torch.autograd.grad(multi.loss, [model.lm_head.weight])
    assert torch.equal(g1, g2)


def test_learned_weights_gradient_zero_on_policy_for_ratio_losses(model):
    """Documented: at ratio 1 every exit's clipped surrogate is -A, so the weight logits get no gradient;
    CISPO's REINFORCE form (and off-policy ratios) do move them."""
    ids, mask, adv = _batch()
    exits = [1, 2, 3]
    with torch.no_grad():
        cur = exit_token_logprobs(model(input_ids=ids, depth=T, output_exits=True).exit_hidden_states,
                                  model.lm_head, ids[:, P:], exits, 1.0)
    shifted = cur + 0.1 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(2))
    for loss_type, old, moves in (("dapo", cur, False), ("cispo", cur, True), ("dapo", shifted, True)):
        learned = ExitWeights(len(exits))
        loss = _pipeline(model, ids, mask, adv, exits, "learned", loss_type, old, None, 1.0, learned)
        (g,) = torch.autograd.grad(loss, [learned.logits])
        assert (g.abs().max() > 1e-6) == moves, (loss_type, g)


def test_weights_and_metrics():
    torch.testing.assert_close(static_weights([1, 2, 4], "progressive", 2.0), torch.tensor([1.0, 4.0, 16.0]) / 21)
    torch.testing.assert_close(static_weights([1, 3], "uniform"), torch.tensor([0.5, 0.5]))
    probs = torch.tensor([[[0.5, 0.2, 0.3]]])
    w = weights_for(ExitPolicyConfig((2, 3), "gate"), [2, 3], probs, None, (1, 1))
    torch.testing.assert_close(w, torch.tensor([[[0.4, 0.6]]]))
    sums = exit_policy_metrics([2, 3], torch.tensor([[[-1.0, -3.0]], [[-2.0, -4.0]]]).view(1, 2, 2), w,
                               torch.tensor([[1.0, 0.0]]))
    assert sums == pytest.approx({"policy/logp_t2": -1.0, "policy/w_t2": 0.4, "policy/logp_t3": -2.0,
                                  "policy/w_t3": 0.6})


def test_config_parsing_and_errors():
    assert parse_policy_exits("last") is None and parse_policy_exits(None) is None
    assert parse_policy_exits("all") == "all"
    assert parse_policy_exits("[4, 1,2]") == (1, 2, 4) and parse_policy_exits([2]) == (2,)
    assert validate_exit_policy("all", "gate", 1.0, depth=4).resolve(4) == [1, 2, 3, 4]
    for bad, key in ((["0"], "policy_exits"), ([1, 1], "policy_exits"), ("x", "policy_exits")):
        with pytest.raises(ValueError, match=key):
            parse_policy_exits(bad)
    with pytest.raises(ValueError, match="policy_exits"):
        validate_exit_policy([5], "uniform", 1.0, depth=4)
    with pytest.raises(ValueError, match="policy_exit_weights"):
        validate_exit_policy("all", "softmax", 1.0)


def test_exit_logprobs_are_chunked_and_equal_unchunked(model):
    """Per-exit log-probs come in checkpointed token chunks: same values and gradients as one pass, and
    autograd never keeps a tokens x vocabulary tensor (the logits are recomputed per chunk in backward)."""
    ids, _, _ = _batch(seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []

    def run(chunk_size):
        out = model(input_ids=ids, depth=T, output_exits=True)
        calls = []
        head = model.lm_head
        hook = head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            lp = exit_token_logprobs(out.exit_hidden_states, head, ids[:, P:], [1, 2, 3], 1.0, chunk_size=chunk_size)
        grads = torch.autograd.grad(lp.sum(), params, allow_unused=True)
        hook.remove()
        rows.append(max(calls))
        return lp.detach(), grads, saved

    full, g_full, _ = run(10_000)
    chunked, g_chunk, saved = run(2)
    assert rows == [B * C, 2]  # one pass over all B x C tokens vs never more than 2 (forward and recompute)
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunk, g_full):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    vocab = model.config.vocab_size
    assert max(saved) < 2 * vocab  # nothing saved is as large as the chunk logits of two exits
