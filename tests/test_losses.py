"""Loss values against hand-computed numbers, clip fractions, KL, IS weights, advantages, dynamic sampling."""

import math

import pytest
import torch

from rl.advantages import group_advantages, zero_std_groups
from rl.dynamic_sampling import Group, collect_groups
from rl.losses import loss_normaliser, token_logprobs, truncated_is_weights
from rl.objective import policy_loss

# two sequences: 2 and 3 completion tokens (padded to 3), advantages +2 and -1
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([2.0, -1.0])


def _on_policy(loss_type, normaliser):
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    out = policy_loss(loss_type, logp, logp.detach(), ADV, MASK, normaliser)
    return out, logp


def test_token_logprobs_fp32_with_temperature():
    logits = torch.randn(2, 4, 7, dtype=torch.float64).to(torch.bfloat16)
    tokens = torch.randint(0, 7, (2, 4))
    logp, ent = token_logprobs(logits, tokens, temperature=0.7, with_entropy=True)
    ref = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref)
    p = torch.softmax(logits.float() / 0.7, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))


@pytest.mark.parametrize("loss_type,norm,expected", [
    # grpo: per-sequence token mean (-2, +1), then mean over 2 sequences
    ("grpo", 2.0, (-2.0 + 1.0) / 2),
    # dapo: token sum (-2*2 + 1*3) over 5 tokens
    ("dapo", 5.0, (-4.0 + 3.0) / 5),
    # dr_grpo: token sum over 2 sequences * max_new_tokens 4
    ("dr_grpo", 8.0, (-4.0 + 3.0) / 8),
])
def test_on_policy_loss_values(loss_type, norm, expected):
    assert loss_normaliser(loss_type, 2, 5, 4) == norm
    out, logp = _on_policy(loss_type, norm)
    assert out.loss.item() == pytest.approx(expected)
    out.loss.backward()
    # ratio 1: d loss / d logp = -A / normaliser per token (grpo: / length too)
    if loss_type == "grpo":
        assert logp.grad[0, 0].item() == pytest.approx(-2.0 / 2 / 2)
        assert logp.grad[1, 2].item() == pytest.approx(1.0 / 3 / 2)
    else:
        assert logp.grad[0, 0].item() == pytest.approx(-2.0 / norm)
        assert logp.grad[1, 2].item() == pytest.approx(1.0 / norm)
    assert logp.grad[0, 2].item() == 0.0  # padding


def test_clip_higher_values_and_fractions():
    old = torch.zeros(1, 4)
    # ratios 1.5 (A>0: clipped at 1.28), 1.1 (inside), 0.5 (A>0: not clipped, min picks 0.5)
    ratios = torch.tensor([[1.5, 1.1, 0.5, 1.0]])
    logp = ratios.log().requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = policy_loss("dapo", logp, old, torch.tensor([1.0]), mask, 3.0, eps_low=0.2, eps_high=0.28)
    assert out.loss.item() == pytest.approx(-(1.28 + 1.1 + 0.5) / 3)
    assert out.clip_high.item() == 1 and out.clip_low.item() == 0
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # clipped token: no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 3)
    # negative advantage: ratio 0.5 < 0.8 is clipped (low side), ratio 1.5 is not
    logp2 = ratios.log().requires_grad_(True)
    out2 = policy_loss("dapo", logp2, old, torch.tensor([-1.0]), mask, 3.0, eps_low=0.2, eps_high=0.28)
    assert out2.loss.item() == pytest.approx((1.5 + 1.1 + 0.8) / 3)
    assert out2.clip_low.item() == 1 and out2.clip_high.item() == 0


def test_cispo_keeps_gradient_of_clipped_tokens():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(8.0), math.log(2.0)]], requires_grad=True)
    out = policy_loss("cispo", logp, old, torch.tensor([1.0]), torch.ones(1, 2), 2.0, cispo_cap=5.0)
    expected = -(5.0 * math.log(8.0) + 2.0 * math.log(2.0)) / 2
    assert out.loss.item() == pytest.approx(expected)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-5.0 / 2, -2.0 / 2])
    assert out.clip_high.item() == 1


def test_kl_to_reference_k3():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[0.5, -0.5]])
    out = policy_loss("dapo", logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), 2.0, ref_logp=ref,
                      beta=0.1)
    k3 = [math.exp(d) - d - 1 for d in (0.5, -0.5)]
    assert out.kl_sum.item() == pytest.approx(sum(k3))
    assert out.loss.item() == pytest.approx(0.1 * sum(k3) / 2)


def test_truncated_is_weights():
    old = torch.tensor([[0.0, 0.0, -1.0]])
    rollout = torch.tensor([[0.0, -2.0, 0.0]])
    w = truncated_is_weights(old, rollout, cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-1.0)])
    logp = torch.zeros(1, 3, requires_grad=True)
    out = policy_loss("dapo", logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 3), 3.0, is_weights=w)
    assert out.loss.item() == pytest.approx(-(1.0 + 2.0 + math.exp(-1.0)) / 3)


def test_micro_batch_split_equals_full_batch_gradient():
    torch.manual_seed(0)
    logp_full = torch.randn(4, 5)
    old = logp_full + 0.1 * torch.randn(4, 5)
    adv = torch.randn(4)
    mask = (torch.rand(4, 5) > 0.3).float()
    for loss_type in ("grpo", "dapo", "dr_grpo", "cispo"):
        norm = loss_normaliser(loss_type, 4, int(mask.sum()), 5)
        a = logp_full.clone().requires_grad_(True)
        policy_loss(loss_type, a, old, adv, mask, norm).loss.backward()
        b = logp_full.clone().requires_grad_(True)
        for sl in (slice(0, 1), slice(1, 4)):
            policy_loss(loss_type, b[sl], old[sl], adv[sl], mask[sl], norm).loss.backward()
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_scalings():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    a = group_advantages(r, 4, "group")
    assert a[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4),
                                                                                         0.5 / (std + 1e-4)])
    assert a[4:].tolist() == [0.0] * 4
    b = group_advantages(r, 4, "batch")
    bstd = float(r.std())
    assert b[0].item() == pytest.approx(0.5 / (bstd + 1e-4))
    assert group_advantages(r, 4, "none")[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert zero_std_groups(r, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, 4, "bogus")


def test_zero_std_tolerates_float_noise():
    r = torch.tensor([1.0, 1.0 + 1e-8, 0.5, 0.6])
    assert zero_std_groups(r, 2).tolist() == [True, False]


# ----------------------------------------------------------------------------- dynamic sampling


class FakeSampler:
    """Groups alternate informative / all-equal; records how many prompts each round asked for."""

    def __init__(self, informative_every=2):
        self.asked, self.count, self.every = [], 0, informative_every

    def __call__(self, round_, want):
        self.asked.append(want)
        out = []
        for _ in range(want):
            informative = self.count % self.every == 0
            out.append(Group(rewards=[1.0, 0.0] if informative else [1.0, 1.0], data=self.count))
            self.count += 1
        return out


def test_dynamic_sampling_drops_and_refills():
    fake = FakeSampler(informative_every=2)
    res = collect_groups(fake, target=8, enabled=True, max_rounds=5)
    assert len(res.kept) == 8
    assert all(g.rewards == [1.0, 0.0] for g in res.kept)
    assert res.zero_std_first_round == 0.5
    assert fake.asked[0] == 8 and fake.asked[1] == 8  # deficit 4 / keep rate 0.5
    assert res.rounds == 2 and res.groups_sampled == 16
    assert [g.data for g in res.kept] == [0, 2, 4, 6, 8, 10, 12, 14]  # sampling order kept


def test_dynamic_sampling_off_keeps_everything_and_max_rounds_bounds():
    fake = FakeSampler(informative_every=2)
    res = collect_groups(fake, target=6, enabled=False, max_rounds=5)
    assert len(res.kept) == 6 and res.rounds == 1 and res.zero_std_first_round == 0.5
    hopeless = FakeSampler(informative_every=10**9)  # only group 0 is informative
    res = collect_groups(hopeless, target=4, enabled=True, max_rounds=3)
    assert res.rounds == 3 and len(res.kept) == 1 and res.zero_std_all > 0.9


def test_a_registered_loss_gets_the_shared_terms_and_is_a_config_choice():
    from rl.config import load_config
    from rl.losses import LOSSES, TokenSurrogate, register_loss

    @register_loss("test_reinforce", normaliser="sequences")
    def reinforce(logp, old_logp, advantages, mask, opts):
        zero = torch.zeros(())
        return TokenSurrogate(-advantages * logp, zero, zero)

    try:
        assert load_config(["--loss_type", "test_reinforce"]).loss_type == "test_reinforce"
        assert loss_normaliser("test_reinforce", 2, 5, 4) == 2.0
        logp = torch.full((2, 3), -1.0, requires_grad=True)
        weights = torch.full((2, 3), 0.5)
        out = policy_loss("test_reinforce", logp, logp.detach(), ADV, MASK, 2.0, is_weights=weights)
        # token sum of -A * logp * 0.5 = (2 * 2 * 0.5) + (-1 * 3 * 0.5) over 2 sequences
        assert out.loss.item() == pytest.approx((2.0 - 1.5) / 2)
        assert out.tis_sum.item() == pytest.approx(2.5)
    finally:
        del LOSSES["test_reinforce"]


def test_advantage_registry_names_the_key():
    from rl.advantages import ADVANTAGES, get_advantage

    assert get_advantage("grpo") is group_advantages and "grpo" in ADVANTAGES
    with pytest.raises(ValueError, match="advantage_estimator"):
        get_advantage("nope")
