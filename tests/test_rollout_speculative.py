"""Self-speculative decoding (rollout/speculative.py) is exactly depth-T decoding:

* greedy: token-for-token equal to plain depth-T greedy (left-padded batch, early stops, n > 1), for
  several draft depths / draft lengths and on a model where drafts are mostly rejected as well as one
  where they are mostly accepted;
* sampling: a chi-square test of the joint distribution of the first tokens against the exact depth-T
  distribution (enumerated from full forwards), at temperature 1 and at 0.7 with top-p; the same test
  rejects a deliberately wrong acceptance rule, so it has the power to see a mistake;
* logprobs: the depth-T logprobs of the emitted tokens, equal to the model's own full forward.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_rollout_torch import PROMPTS, rare_early_tokens, reference_logprobs, tiny_llama

from rollout import SamplingParams, SpecConfig, TorchRolloutWorker
from rollout import speculative as spec_module
from rollout.sampling import race_draw, sampling_probs, scale_logits

modeling = pytest.importorskip("looped")
EOS, PAD, DEPTH = 5, 0, 4


def ouro(init: float = 0.3, vocab: int = 97, seed: int = 0, residual_scale: float = 1.0):
    """Random tiny Ouro. As initialised, depth 1..3 rarely agree with depth 4 (drafts mostly rejected);
    residual_scale < 1 shrinks every sublayer's contribution (the post-sublayer norm weights), so the loops
    change little and drafts are mostly accepted (exercises full acceptance and the bonus token)."""
    torch.manual_seed(seed)
    config = modeling.OuroConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, total_ut_steps=DEPTH, max_position_embeddings=128, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=1, initializer_range=init,
    )
    model = modeling.OuroForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm_2.weight.mul_(residual_scale)
            layer.post_attention_layernorm_2.weight.mul_(residual_scale)
    return model


@pytest.mark.parametrize("residual_scale", [1.0, 0.03], ids=["rejecting", "accepting"])
def test_greedy_equals_plain_depth_t_greedy(residual_scale):
    model = ouro(residual_scale=residual_scale)
    worker = TorchRolloutWorker(model, DEPTH)
    plain = SamplingParams(n=2, max_new_tokens=24, temperature=0, stop_token_ids=[])
    stops = rare_early_tokens(worker.generate(PROMPTS, plain))
    plain.stop_token_ids = stops
    expected = worker.generate(PROMPTS, plain)
    assert "stop" in expected.finish_reasons and "length" in expected.finish_reasons  # early stops happen
    drafted = accepted = 0
    for draft_depth, num_draft in [(1, 1), (1, 4), (2, 3), (3, 6)]:
        params = SamplingParams(n=2, max_new_tokens=24, temperature=0, stop_token_ids=stops,
                                speculative=SpecConfig(draft_depth, num_draft))
        got = worker.generate(PROMPTS, params)
        assert got.completion_ids == expected.completion_ids, (draft_depth, num_draft)
        assert got.finish_reasons == expected.finish_reasons
        torch.testing.assert_close(
            torch.tensor(sum(got.logprobs, [])), torch.tensor(sum(expected.logprobs, [])), atol=1e-5, rtol=1e-5
        )
        stats = got.stats
        assert stats["tokens_per_verify"] == pytest.approx(1 + stats["accept_rate"] * num_draft)
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    rate = accepted / drafted
    assert (rate < 0.3) if residual_scale == 1.0 else (rate > 0.5)  # both regimes are really exercised


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (1.2, 20, 1.0)])
def test_logprobs_are_the_depth_t_full_forward(temperature, top_k, top_p):
    # init 0.1, not 0.3: the peaked init-0.3 model amplifies fp32 rounding so much that its own fp32 forward
    # is only within ~3e-5 of an fp64 forward (plain decoding alike); here fp32 is good to ~1e-6.
    model = ouro(init=0.1)
    worker = TorchRolloutWorker(model, DEPTH)
    params = SamplingParams(n=3, max_new_tokens=15, temperature=temperature, top_k=top_k, top_p=top_p, seed=1,
                            stop_token_ids=[], speculative=SpecConfig(2, 3))
    params.stop_token_ids = rare_early_tokens(worker.generate(PROMPTS, params))
    rollout = worker.generate(PROMPTS, params)
    assert "stop" in rollout.finish_reasons and "length" in rollout.finish_reasons
    assert 0 < rollout.stats["accepted"] < rollout.stats["drafted"]
    for prompt, completion, logprobs in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs):
        ref = reference_logprobs(model, prompt, completion, DEPTH, temperature)
        torch.testing.assert_close(torch.tensor(logprobs), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- chi-square

VOCAB, NEW, SAMPLES = 4, 3, 4000
PROMPT = [1, 3, 2]


def exact_joint(model, temperature: float, top_p: float) -> torch.Tensor:
    """P(first NEW tokens) under plain depth-T sampling, [VOCAB ** NEW], from full forwards of every prefix."""
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=NEW - 1)))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = model(ids, use_cache=False, depth=DEPTH).logits[:, len(PROMPT) - 1 :].double()
    scaled, log_norm = scale_logits(logits, temperature)
    probs = sampling_probs(scaled.double(), log_norm.double(), 0, top_p)  # [P, NEW, VOCAB]
    joint = torch.zeros([VOCAB] * NEW, dtype=torch.float64)
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        row = sum(t * VOCAB ** (NEW - 2 - i) for i, t in enumerate(seq[:-1]))
        joint[seq] = torch.prod(torch.stack([probs[row, i, seq[i]] for i in range(NEW)]))
    return joint.flatten()


def chi_square_pvalue(tokens: list[list[int]], probs: torch.Tensor) -> float:
    """Pearson chi-square of observed sequences vs `probs`; cells expected < 5 are pooled into one."""
    counts = torch.zeros_like(probs)
    for seq in tokens:
        counts[sum(t * VOCAB ** (NEW - 1 - i) for i, t in enumerate(seq))] += 1
    expected = probs * len(tokens)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


_accept_sampled = spec_module.accept_sampled


def resample_from_target(target, draft, drafts, generator):
    """WRONG: on rejection draw from p instead of norm(max(0, p - q)) (over-weights tokens the draft likes)."""
    accepted, _ = _accept_sampled(target, draft, drafts, generator)
    rows = torch.arange(drafts.shape[0])
    return accepted, race_draw(target[rows, accepted], generator)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_distribution_is_depth_t_sampling(temperature, top_p, monkeypatch):
    model = ouro(0.5, vocab=VOCAB, seed=3)
    worker = TorchRolloutWorker(model, DEPTH)
    probs = exact_joint(model, temperature, top_p)

    def sample(speculative, seed):
        params = SamplingParams(n=SAMPLES, max_new_tokens=NEW, temperature=temperature, top_p=top_p, seed=seed,
                                stop_token_ids=[], speculative=speculative)
        return worker.generate([PROMPT], params)

    plain = sample(None, 0)
    assert chi_square_pvalue(plain.completion_ids, probs) > 1e-3  # the reference itself is right
    for seed, speculative in enumerate([SpecConfig(1, 1), SpecConfig(2, 2)], start=1):
        rollout = sample(speculative, seed)
        assert 0.05 < rollout.stats["accept_rate"] < 0.95  # drafts are both accepted and rejected
        assert chi_square_pvalue(rollout.completion_ids, probs) > 1e-3, speculative

    monkeypatch.setattr(spec_module, "accept_sampled", resample_from_target)
    wrong = sample(SpecConfig(1, 1), 1)
    assert chi_square_pvalue(wrong.completion_ids, probs) < 1e-6


# ---------------------------------------------------------------------------------------------- config errors


def test_speculative_config_errors():
    with pytest.raises(ValueError, match="draft_depth"):
        SpecConfig(0, 2)
    with pytest.raises(ValueError, match="num_draft"):
        SpecConfig(1, 0)
    with pytest.raises(ValueError, match="SpecConfig"):
        SamplingParams(speculative=(1, 2))
    params = SamplingParams(max_new_tokens=3, speculative=SpecConfig(DEPTH, 2))
    with pytest.raises(ValueError, match="below the rollout depth"):
        TorchRolloutWorker(ouro(), DEPTH).generate(PROMPTS, params)
    params = SamplingParams(max_new_tokens=3, speculative=SpecConfig(1, 2))
    with pytest.raises(ValueError, match="Ouro-layout"):
        TorchRolloutWorker(tiny_llama(), 1).generate(PROMPTS, params)
    with pytest.raises(ValueError, match="Ouro-layout"):
        TorchRolloutWorker(ouro(), DEPTH, fast_decode=False).generate(PROMPTS, params)
