"""The update as several processes and backends drive it: uneven length buckets (a filler micro-batch on
one process), several optimizer updates per step, and one optimizer step per update on every backend.

The reference is brute force in one process: every row scored on its own, the DAPO token terms summed
over the mini-batch by hand, AdamW. Against it: a real 2-process gloo run (tests/update_worker.py), and
accelerate's own `backward` routed as DeepSpeed (a counting stub engine: DeepSpeed cannot run here) and
as FSDP2 (its no_sync switch recorded), each with gradient_accumulation_steps 2 set in accelerate; and
each process's side of a 2-process update simulated in one process, with the exit-weighted term.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
from update_worker import MINI, config, samples

from rl.batch import shard_plan
from rl.data import EMBEDDED_MODEL
from rl.model_io import load_model

REPO = Path(__file__).resolve().parents[1]
UPDATES = 4  # num_iterations 2 x 2 mini-batches


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def brute_force(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients before each optimizer update and the final weights, one row per forward."""
    model = load_model(EMBEDDED_MODEL, "reference").eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    rows = samples()

    def logp(row):
        ids = torch.tensor([row.prompt_ids + row.completion_ids])
        logits = model(input_ids=ids, depth=cfg.depth, use_cache=False).logits[0, len(row.prompt_ids) - 1:-1]
        return torch.log_softmax(logits.float() / cfg.temperature, -1).gather(
            -1, torch.tensor(row.completion_ids)[:, None])[:, 0]

    with torch.no_grad():
        old = [logp(row) for row in rows]
    grads = []
    for _ in range(cfg.num_iterations):
        for start in range(0, len(rows), MINI):
            tokens = sum(len(row.completion_ids) for row in rows[start:start + MINI])
            loss = 0.0
            for i in range(start, start + MINI):
                ratio, adv = torch.exp(logp(rows[i]) - old[i]), rows[i].advantage
                clipped = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
                loss = loss - torch.minimum(ratio * adv, clipped * adv).sum() / tokens
            optimizer.zero_grad()
            loss.backward()
            grads.append(_flat_grads(model))
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
    return torch.stack(grads), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_matches(grads, weights, reference):
    ref_grads, ref_weights = reference
    assert grads.shape == ref_grads.shape
    for k in range(len(grads)):  # fp32 sums over ~1000 tokens: 1e-4 of each update's gradient scale
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=1e-4 * float(ref_grads[k].abs().max()))
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=5e-6)  # 4 AdamW steps moved them ~1e-4


def test_uneven_buckets_give_each_process_a_filler():
    """The premise of the 2-process test: every mini-batch has a filler micro-batch on some process, and
    one on the process that does not own the mini-batch's first row (the old filler's row)."""
    rows = samples()
    fillers = [[[] in shard_plan(rows[m:m + MINI], rank, 2, config().micro_batch_size) for rank in (0, 1)]
               for m in range(0, len(rows), MINI)]
    assert fillers == [[False, True], [True, False]]


@pytest.mark.slow
def test_two_processes_match_the_single_process_brute_force(tmp_path):
    """Uneven completion lengths, num_iterations 2, mini-batches below the step batch, 2 gloo processes:
    it used to die at once with a KeyError (the filler's row had no old log-probs on its process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "update_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(ranks[0]["grads"], ranks[1]["grads"], rtol=0, atol=0)  # DDP: one gradient
    reference = brute_force(config())
    for out in ranks:
        assert out["adam_steps"] == [UPDATES] and out["schedule_steps"] == UPDATES  # one step per update
        assert_matches(out["grads"], out["weights"], reference)
    assert ranks[0]["metrics"]["clip/frac"] > 0  # the later updates are off-policy and clip
    # each group's prompt ran once (its check passed on both), and both processes ran as many such forwards
    assert all(out["shared_prompts"] for out in ranks) and ranks[0]["shared_calls"] == ranks[1]["shared_calls"] > 0
    assert_raw_ratio_metrics([out["metrics"] for out in ranks])


def assert_raw_ratio_metrics(per_rank: list[dict]) -> None:
    """is/* over both processes: the token-weighted mean of the raw ratios pi_old / pi_rollout over all
    rows, the max of the maxima, the min of the minima, the same on every process."""
    model = load_model(EMBEDDED_MODEL, "reference").eval()
    cfg, rows = config(), samples()
    ratios = {}
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            logits = model(input_ids=ids, depth=cfg.depth, use_cache=False).logits[0, len(row.prompt_ids) - 1:-1]
            old = torch.log_softmax(logits.float() / cfg.temperature, -1).gather(
                -1, torch.tensor(row.completion_ids)[:, None])[:, 0]
            ratios[id(row)] = torch.exp(old.double() - torch.tensor(row.rollout_logprobs, dtype=torch.float64))
    every = torch.cat(list(ratios.values()))
    by_rank = [torch.cat([ratios[id(r)] for m in range(0, len(rows), MINI)
                          for chunk in shard_plan(rows[m:m + MINI], rank, 2, cfg.micro_batch_size) for r in chunk])
               for rank in (0, 1)]
    for local in by_rank:  # the premise: a process's own numbers are not the global ones (~7% apart here)
        assert float(local.mean()) != pytest.approx(float(every.mean()), rel=1e-2)
    assert float(by_rank[0].max()) != float(by_rank[1].max()) and float(by_rank[0].min()) != float(by_rank[1].min())
    for metrics in per_rank:  # every process logs the same global numbers
        assert metrics["is/raw_mean"] == pytest.approx(float(every.mean()), rel=1e-4)
        assert metrics["is/raw_max"] == pytest.approx(float(every.max()), rel=1e-4)
        assert metrics["is/raw_min"] == pytest.approx(float(every.min()), rel=1e-4)
        assert metrics["is/masked_frac"] == 0.0


# ----------------------------------------------------------------------------- backends, routed in-process


def _policy(cfg, exit_policy=None):
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    policy = Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=False, self_distill=SelfDistillConfig(),
                    pad_id=0, exit_policy=exit_policy)
    grads, step = [], policy._optimizer_step

    def recording_step(finite, at):
        grads.append(_flat_grads(policy.module))
        return step(finite, at)

    policy._optimizer_step = recording_step
    return policy, grads


def _micro_batches_per_update(cfg) -> list[int]:
    rows = samples()
    per_mini = [len(shard_plan(rows[m:m + MINI], 0, 1, cfg.micro_batch_size)) for m in range(0, len(rows), MINI)]
    assert min(per_mini) > 1  # several micro-batches per update, or there is nothing to test
    return per_mini * cfg.num_iterations


def test_each_rank_of_two_runs_its_filler_with_the_exit_weighted_term():
    """Each process's side of the 2-process update, simulated in one process (rank and world set), with
    the exit-weighted policy term: its filler's per-exit old log-probs are there too (no KeyError)."""
    from rl.exit_policy import ExitPolicyConfig

    policy, grads = _policy(config(), ExitPolicyConfig(exits=(2, 4)))
    for rank in (0, 1):
        policy.rank, policy.world = rank, 2
        metrics = policy.update(samples(), 0)
        assert metrics["updates/skipped"] == 0 and torch.isfinite(torch.tensor(metrics["loss/policy"]))
    assert len(grads) == 2 * UPDATES


class CountingEngine:
    """What accelerate's DeepSpeedEngineWrapper drives. Like DeepSpeed's engine, `backward` divides the
    loss by the gradient-accumulation steps; `step` (clip, optimizer step, zero there) is only counted:
    the trainer's own optimizer step still runs here, so the weights can be compared."""

    def __init__(self, gas: int):
        self.gas, self.boundary, self.backwards, self.steps = gas, None, [], 0

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.boundary = is_boundary

    def backward(self, loss, **kwargs):
        self.backwards.append(self.boundary)
        (loss / self.gas).backward(**kwargs)

    def step(self):
        assert self.boundary  # DeepSpeed steps at a boundary only
        self.steps += 1

    def get_global_grad_norm(self):
        return 0.0


def test_deepspeed_steps_once_per_update(monkeypatch):
    """accelerate calls engine.step() on every backward made while sync_gradients is set: the update
    must clear it for all but each update's last micro-batch (it used to step per micro-batch), and
    DeepSpeed's 1/gradient_accumulation_steps must not shrink the global normaliser."""
    cfg = dataclasses.replace(config(), max_grad_norm=0.0)  # DeepSpeed clips inside its own step
    policy, grads = _policy(cfg)
    engine = CountingEngine(gas=2)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    monkeypatch.setattr(policy.accelerator, "deepspeed_engine_wrapped", DeepSpeedEngineWrapper(engine), raising=False)
    monkeypatch.setitem(policy.accelerator.gradient_state.plugin_kwargs, "num_steps", 2)
    assert policy.accelerator.gradient_accumulation_steps == 2
    policy.update(samples(), 0)
    assert engine.steps == UPDATES
    assert engine.backwards == [k == n - 1 for n in _micro_batches_per_update(cfg) for k in range(n)]
    assert_matches(torch.stack(grads), torch.cat([p.detach().reshape(-1) for p in policy.module.parameters()]),
                   brute_force(cfg))
    assert policy.accelerator.sync_gradients  # left as accelerate expects it outside an update


def test_fsdp2_and_ddp_sync_once_per_update(monkeypatch):
    """FSDP2's no_sync switch (set_requires_gradient_sync) is off for all but each update's last
    micro-batch, the optimizer steps once per update, and accelerate's own 1/gradient_accumulation_steps
    does not shrink the gradient. (DDP's no_sync runs in the 2-process test.) Only accelerate releases whose
    no_sync drives FSDP2's switch have this route (1.10.1 has not; looprl's own FSDP2, rl/sharding.py, syncs
    every micro-batch and is tested against DDP in tests/test_trainer.py)."""
    import inspect

    if "set_requires_gradient_sync" not in inspect.getsource(Accelerator.no_sync):
        pytest.skip(f"accelerate {accelerate.__version__}: no_sync has no FSDP2 route")
    cfg = config()
    policy, grads = _policy(cfg)
    switches = []
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: True))
    monkeypatch.setattr(policy.model, "set_requires_gradient_sync", switches.append, raising=False)
    monkeypatch.setitem(policy.accelerator.gradient_state.plugin_kwargs, "num_steps", 2)
    policy.update(samples(), 0)
    assert switches == [False, True] * sum(n - 1 for n in _micro_batches_per_update(cfg))
    assert {int(s["step"]) for s in policy.optimizer.optimizer.state.values()} == {UPDATES}
    assert policy.scheduler.last_epoch == UPDATES
    assert_matches(torch.stack(grads), torch.cat([p.detach().reshape(-1) for p in policy.module.parameters()]),
                   brute_force(cfg))
