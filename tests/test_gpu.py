"""On a CUDA GPU (skipped without one; run by tools/device_check.sh): the torch rollout worker's
logprobs equal the model's own full forward in fp32 and bf16, the fused Ouro decode step agrees with
the model's forward, and self-speculative rollouts equal plain depth-T decoding. The CPU versions of
these tests are tests/test_rollout_torch.py and tests/test_rollout_speculative.py; these check the
same contracts with CUDA kernels (SDPA, cuBLAS), where summation orders differ from the CPU's."""

from __future__ import annotations

import pytest
import torch
from test_rollout_speculative import ouro
from test_rollout_torch import PROMPTS, rare_early_tokens, tiny_ouro

from rollout import SamplingParams, SpecConfig, TorchRolloutWorker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = "cuda"


def full_forward_logprobs(model, prompt, completion, depth, temperature):
    """log softmax(logits / T) of each completion token from one no-cache forward, on the model's device."""
    ids = torch.tensor([prompt + completion], device=CUDA)
    with torch.no_grad():
        logits = model(ids, use_cache=False, depth=depth).logits[0].float()[len(prompt) - 1:-1]
    scale = temperature if temperature > 0 else 1.0
    target = torch.tensor(completion, device=CUDA)[:, None]
    return (logits / scale).log_softmax(-1).gather(-1, target).squeeze(-1).cpu()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)], ids=["fp32", "bf16"])
def test_cuda_worker_logprobs_match_the_full_forward(dtype, tolerance):
    """fp32: every token within 1e-4; bf16 (not bit-reproducible across kernels): mean error < 0.05."""
    model = tiny_ouro().to(CUDA, dtype)
    worker = TorchRolloutWorker(model, 4)
    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.8, seed=3, stop_token_ids=[])
    rollout = worker.generate(PROMPTS, params)
    errors = torch.cat([(torch.tensor(lps) - full_forward_logprobs(model, p, c, 4, 0.8)).abs()
                        for p, c, lps in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs)])
    measure = errors.max() if dtype == torch.float32 else errors.mean()
    assert float(measure) < tolerance, (dtype, float(errors.max()), float(errors.mean()))


def test_cuda_fused_decode_step_agrees_with_the_model_forward(recwarn):
    model = tiny_ouro().to(CUDA)
    fast, generic = TorchRolloutWorker(model, 3), TorchRolloutWorker(model, 3, fast_decode=False)
    params = SamplingParams(n=2, max_new_tokens=10, temperature=0, stop_token_ids=[])
    params.stop_token_ids = rare_early_tokens(generic.generate(PROMPTS, params))
    a, b = fast.generate(PROMPTS, params), generic.generate(PROMPTS, params)
    assert fast.uses_fast_decode and not generic.uses_fast_decode
    assert not [w for w in recwarn if "fused" in str(w.message)]  # no fallback on CUDA
    assert a.completion_ids == b.completion_ids and a.finish_reasons == b.finish_reasons
    torch.testing.assert_close(torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])),
                               atol=1e-4, rtol=1e-4)


def test_cuda_self_speculative_greedy_equals_plain_depth_t_greedy():
    """Drafts at a shallower depth, verified at depth T (k+1 tokens in one pass): the same tokens."""
    model = ouro(residual_scale=0.03).to(CUDA)  # drafts mostly accepted: the multi-token verify path runs
    worker = TorchRolloutWorker(model, 4)
    plain = SamplingParams(n=2, max_new_tokens=24, temperature=0, stop_token_ids=[])
    expected = worker.generate(PROMPTS, plain)
    for draft_depth, num_draft in [(1, 4), (2, 3)]:
        params = SamplingParams(n=2, max_new_tokens=24, temperature=0, stop_token_ids=[],
                                speculative=SpecConfig(draft_depth, num_draft))
        got = worker.generate(PROMPTS, params)
        assert got.completion_ids == expected.completion_ids, (draft_depth, num_draft)
        assert got.stats["accept_rate"] > 0.5
        torch.testing.assert_close(torch.tensor(sum(got.logprobs, [])), torch.tensor(sum(expected.logprobs, [])),
                                   atol=1e-4, rtol=1e-4)
