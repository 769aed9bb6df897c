"""Asynchronous rollouts (issue 23, `max_staleness`): the producer process, the staleness bound, the
off-policy weight of a stale sample, checkpoints with samples in flight, interrupts, refusals."""

import copy
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_run_lifecycle import _assert_steps_once, _cli, _one_line, _start, _wait_for_step
from test_trainer import _args, _rows, _train, tiny  # noqa: F401  (tiny is a fixture)

from rl.batch import Sample, collate
from rl.config import ConfigError, TrainConfig, validate
from rl.data import EMBEDDED_MODEL


def _async_args(tiny, out, *extra):  # noqa: F811
    return _args(tiny, out, "--max_staleness", "1", "--max_no_update_steps", "0", *extra)


# ----------------------------------------------------------------------------- config


def test_max_staleness_is_refused_where_it_cannot_run():
    for cfg, needle in ((TrainConfig(max_staleness=-1), "must be >= 0"),
                        (TrainConfig(max_staleness=1, engine="vllm"), "not engine 'vllm'")):
        with pytest.raises(ConfigError, match="config key 'max_staleness'") as e:
            validate(cfg, max_depth=4)
        assert needle in str(e.value) and "\n" not in str(e.value)
    validate(TrainConfig(max_staleness=1), max_depth=4, num_processes=2)  # the torch engine, DDP included


def test_off_policy_ratio_is_refused_where_it_would_do_nothing_or_double_count():
    """off_policy_ratio is read only with max_staleness >= 1; behaviour (its default) is refused beside a TIS
    mode (the same weight twice) and beside policy_exits (no per-exit behaviour log-probs); proximal takes both."""
    cases = ((TrainConfig(off_policy_ratio="proximal"), "config key 'off_policy_ratio': 'proximal' is read only"),
             (TrainConfig(off_policy_ratio="behavior"), "config key 'off_policy_ratio'"),
             (TrainConfig(max_staleness=1, tis_mode="token"), "config key 'tis_mode': 'token' reweights"),
             (TrainConfig(max_staleness=1, policy_exits="all"), "use off_policy_ratio proximal with policy_exits"))
    for cfg, needle in cases:
        with pytest.raises(ConfigError) as e:
            validate(cfg, max_depth=4)
        assert needle in str(e.value) and "\n" not in str(e.value)
    for cfg in (TrainConfig(max_staleness=1, off_policy_ratio="proximal", tis_mode="sequence"),
                TrainConfig(max_staleness=1, tis_mode="off"), TrainConfig(max_staleness=2)):
        validate(cfg, max_depth=4)


def test_an_async_run_recorded_before_off_policy_ratio_resumes_with_the_ratio_it_trained_with(tmp_path):
    """Checkpoints of asynchronous runs written before the key existed trained with the decoupled (proximal)
    ratio: --resume keeps it rather than switching to the new default; a synchronous one adopts nothing."""
    from rl.checkpoint import STATE_FILE
    from rl.config import portable_dict
    from rl.resume import config_changes, load_run_config

    # an async proximal run resumed synchronously: off_policy_ratio follows max_staleness back to its default
    out = tmp_path / "proximal"
    recorded = portable_dict(TrainConfig(max_staleness=1, off_policy_ratio="proximal", output_dir=str(out)))
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / STATE_FILE).write_text(json.dumps({"config": recorded}))
    cfg = load_run_config(["--output_dir", str(out), "--resume", "--max_staleness", "0"])
    assert (cfg.max_staleness, cfg.off_policy_ratio) == (0, "behaviour")
    assert set(config_changes(recorded, cfg, out)) == {"max_staleness", "off_policy_ratio"}  # applied, recorded
    for staleness, want in ((1, "proximal"), (0, "behaviour")):
        out = tmp_path / f"k{staleness}"
        recorded = portable_dict(TrainConfig(max_staleness=staleness, output_dir=str(out)))
        del recorded["off_policy_ratio"]
        (out / "checkpoints" / "step-3").mkdir(parents=True)
        (out / "checkpoints" / "step-3" / STATE_FILE).write_text(json.dumps({"config": recorded}))
        assert load_run_config(["--output_dir", str(out), "--resume"]).off_policy_ratio == want


def test_a_reward_that_cannot_reach_the_rollout_process_is_refused_in_one_line(tiny, tmp_path):  # noqa: F811
    from rl.train import Trainer

    def local_reward(prompts, completions, **kw):
        return [0.0] * len(completions)

    cfg = TrainConfig(model=str(tiny / "model"), depth=3, data="arith", data_limit=8, rewards=[local_reward],
                      accuracy_reward="", max_staleness=1, output_dir=str(tmp_path / "run"), eval_every=0,
                      progress=False)
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert str(e.value).startswith("config key 'max_staleness': reward function 'local_reward'")
    assert "cannot be sent to the rollout process" in str(e.value) and "\n" not in str(e.value)
    cfg.rewards = ["tinyreward:digit_sum", lambda prompts, completions, **kw: [0.0] * len(completions)]
    with pytest.raises(ConfigError) as e:  # a lambda by the name the run's metrics give it
        Trainer(cfg)
    assert str(e.value).startswith("config key 'max_staleness': reward function 'lambda_2'")


# ----------------------------------------------------------------------------- the objective


def _stale_rows(policy, gen, scale: float):
    """Four samples whose rollout log-probs come from OLDER weights (the update's weights perturbed)."""
    rows = [Sample(prompt_index=i, prompt_ids=torch.randint(5, 60, (4 + i,), generator=gen).tolist(),
                   completion_ids=torch.randint(5, 60, (3 + 2 * i,), generator=gen).tolist(),
                   rollout_logprobs=[0.0] * (3 + 2 * i),
                   truncated=False, reward=0.0, fn_rewards={}, correct=None, text="",
                   advantage=[1.0, -0.5, 0.8, -1.2][i]) for i in range(4)]
    older = copy.deepcopy(policy.module)
    with torch.no_grad():
        for p in older.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
        behaviour, _, _ = policy.logprobs(collate(rows, 0, mask_truncated=False), model=older)
    for i, s in enumerate(rows):
        s.rollout_logprobs = behaviour[i, :len(s.completion_ids)].tolist()
    return rows


def _update_gradients(policy, rows) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The gradients the update applies (captured at its optimizer step) and its metrics."""
    got, step = {}, policy._optimizer_step

    def capture(finite, at):
        got.update({n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
        return step(finite, at)

    policy._optimizer_step = capture
    return got, policy.update(rows, 0)


def test_a_stale_samples_ratio_is_to_the_behaviour_policy_clipped_by_default():
    """Brute force, off_policy_ratio behaviour (the default with max_staleness >= 1): the update's gradient on
    samples drawn by OLDER weights is that of DAPO's -sum min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) / tokens
    with r = pi_theta / pi_behaviour: tokens outside the band on the advantage's side give no gradient, and no
    TIS weight is applied on top (tis_mode auto leaves it off)."""
    from rl.config import tis_on
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    cfg = TrainConfig(max_new_tokens=8, torch_threads=1, max_staleness=1, prompts_per_step=2, num_generations=2,
                      loss_type="dapo")
    assert cfg.off_policy_ratio == "behaviour" and not tis_on(cfg, exact_logprobs=True)
    policy = Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=False, self_distill=SelfDistillConfig(),
                    pad_id=0)
    rows = _stale_rows(policy, torch.Generator().manual_seed(0), scale=0.05)
    batch = collate(rows, 0, mask_truncated=False)
    logp, _, _ = policy.logprobs(batch)
    mask = batch["completion_mask"]
    ratio = torch.exp(logp - batch["rollout_logprobs"])
    adv = batch["advantages"][:, None]
    clipped = ((adv > 0) & (ratio > 1 + cfg.eps_high)) | ((adv < 0) & (ratio < 1 - cfg.eps_low))
    assert (clipped & (mask > 0)).any() and (~clipped & (mask > 0)).any()  # both kinds of token are here
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
    (-(surrogate * mask).sum() / mask.sum()).backward()
    want = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None}
    policy.optimizer.zero_grad(set_to_none=True)
    got, metrics = _update_gradients(policy, rows)
    assert "tis/weight_mean" not in metrics and metrics["clip/frac"] > 0
    assert metrics["is/raw_max"] == pytest.approx(float(ratio.detach()[mask > 0].max()), rel=1e-4)  # the raw ratio, logged
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_a_stale_samples_weight_is_the_truncated_proximal_over_behaviour_ratio():
    """Brute force, off_policy_ratio proximal (decoupled PPO): the update's gradient on samples drawn by OLDER
    weights is that of -sum A * min(exp(proximal - behaviour), cap) * logp / tokens, proximal = the weights
    being updated."""
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    cap = 1.3
    cfg = TrainConfig(max_new_tokens=8, torch_threads=1, tis_cap=cap, max_staleness=1, prompts_per_step=2,
                      num_generations=2, loss_type="dapo", off_policy_ratio="proximal")
    policy = Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=True, self_distill=SelfDistillConfig(),
                    pad_id=0)
    rows = _stale_rows(policy, torch.Generator().manual_seed(0), scale=0.05)
    batch = collate(rows, 0, mask_truncated=False)
    # brute force, on the weights before the update
    logp, _, _ = policy.logprobs(batch)
    weight = torch.clamp(torch.exp(logp.detach() - batch["rollout_logprobs"]), max=cap)
    mask = batch["completion_mask"]
    assert (weight * mask).max() == cap and ((weight < 1) & (mask > 0)).any()  # truncated and below-1 weights
    loss = -(batch["advantages"][:, None] * weight * logp * mask).sum() / mask.sum()
    loss.backward()
    want = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None}
    policy.optimizer.zero_grad(set_to_none=True)
    got, metrics = _update_gradients(policy, rows)
    assert metrics["tis/weight_mean"] == pytest.approx(float((weight * mask).sum() / mask.sum()), rel=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the staleness bound


def _slow_update(monkeypatch, seconds: float):
    from rl.policy import Policy

    update = Policy.update

    def slow(self, samples, step):
        time.sleep(seconds)
        return update(self, samples, step)

    monkeypatch.setattr(Policy, "update", slow)


def test_the_producer_overlaps_the_update_within_the_bound(tiny, tmp_path, monkeypatch):  # noqa: F811
    """A slow update: the producer runs max_staleness steps ahead and waits there; nothing is dropped."""
    _slow_update(monkeypatch, 0.5)
    out = tmp_path / "run"
    assert _train(_async_args(tiny, out, "--max_steps", "6", "--max_staleness", "2")) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    lags = [r["async/staleness_max"] for r in rows]
    assert max(lags) == 2 and rows[0]["async/staleness_max"] == 0  # step 1 is sampled by the initial weights
    assert all(r["async/dropped_stale"] == 0 for r in rows)
    assert all(0 <= r["async/staleness_mean"] <= r["async/staleness_max"] for r in rows)
    assert max(r["async/queue_size"] for r in rows) >= 1  # the producer finished steps ahead of the trainer
    assert all(r["time/wait_rollout"] >= 0 and r["time/weight_sync"] >= 0 for r in rows)
    assert all(r["sampling/groups_kept"] == 2 for r in rows)  # dynamic sampling filled every step
    assert (out / "final" / "config.json").is_file()


def test_adaptive_depth_rollouts_in_the_producer_keep_their_per_token_depths(tiny, tmp_path):  # noqa: F811
    """Issue 22 x 23: the producer samples under the confidence rule and the update scores each token at its own
    depth; a step sampled by the current weights (step 1) matches the rollout to fp32 rounding, and a stale one
    shows the policy's change (not a depth error: scored at T it would be far larger on every step)."""
    out = tmp_path / "run"
    assert _train(_async_args(tiny, out, "--max_steps", "2", "--rollout_exit_rule", "confidence",
                              "--rollout_exit_threshold", "0.8")) == 0
    rows = _rows(out)
    assert all(1.0 <= r["rollout/mean_depth"] < 4.0 for r in rows)  # the rule ran in the producer
    first = rows[0]
    assert first["async/staleness_max"] == 0 and first["mismatch/logp_abs_max"] <= 1e-5


def test_samples_older_than_the_bound_never_reach_the_update(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The producer unthrottled (a test hook) runs ahead as far as its queue allows; the trainer drops what is
    more than max_staleness versions behind and counts it."""
    import rl.train

    monkeypatch.setattr(rl.train, "PRODUCER_THROTTLE", False)
    _slow_update(monkeypatch, 0.5)
    used = []
    from rl.policy import Policy

    update = Policy.update  # the slow one

    def record(self, samples, step):  # the versions that reach the update, from the samples themselves
        used.append((step, len(samples)))
        return update(self, samples, step)

    monkeypatch.setattr(Policy, "update", record)
    out = tmp_path / "run"
    assert _train(_async_args(tiny, out, "--max_steps", "6", "--dynamic_sampling", "false")) == 0
    rows = _rows(out)
    assert all(r["async/staleness_max"] <= 1 for r in rows)  # nothing older than max_staleness 1 was used
    dropped = sum(r["async/dropped_stale"] for r in rows)
    assert dropped > 0  # the producer ran ahead: groups were dropped, and counted
    for r in rows:  # every group of the step is either trained on or counted as dropped
        assert r["sampling/groups_kept"] + r["async/dropped_stale"] == 2
    assert sum(n for _, n in used) == 4 * sum(r["sampling/groups_kept"] for r in rows)


# ----------------------------------------------------------------------------- interrupts, kill -9, resume


def _prompts_by_step(out) -> dict[int, list[str]]:
    by_step: dict[int, list[str]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row["prompt"])
    return {step: prompts[::4] for step, prompts in by_step.items()}  # one per group of 4


def _producer_gone(pgid: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    raise AssertionError(f"a process of group {pgid} (the rollout process) outlived the trainer by {timeout} s")


@pytest.mark.slow
def test_interrupt_kill_and_resume_under_max_staleness_1(tiny, tmp_path):  # noqa: F811
    """Ctrl-C: exit 3, checkpoint, no orphan rollout process. kill -9: the rollout process exits by itself;
    --resume continues from the checkpoint: every step once, each step's prompts the data order's next ones
    (nothing in flight was checkpointed, nothing repeated or skipped)."""
    from rl.data import load_prompts
    from rl.prompts import PromptSampler

    out = tmp_path / "run"
    args = _async_args(tiny, out, "--max_steps", "100000", "--save_every", "1", "--dynamic_sampling", "false",
                       "--log_samples", "8")
    first = _start(tiny, *args)
    _wait_for_step(first, out, 2)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal: the rollout process gets it too
    _, err = first.communicate(timeout=120)
    assert first.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "(exit code 3)" in _one_line(err, "checkpoint written at step")
    _producer_gone(first.pid)
    steps = _assert_steps_once(out)

    second = _start(tiny, *args, "--resume")
    _wait_for_step(second, out, steps[-1] + 2)
    second.kill()  # kill -9 of the trainer alone: its rollout process must notice and exit
    second.communicate(timeout=60)
    _producer_gone(second.pid)
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    res = _cli(tiny, *_async_args(tiny, out, "--max_steps", str(last + 2), "--save_every", "1",
                                  "--dynamic_sampling", "false", "--log_samples", "8", "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    steps = _assert_steps_once(out)
    assert steps[-1] == last + 2 and (out / "final" / "config.json").is_file()
    dataset = load_prompts("arith", limit=64)
    sampler = PromptSampler(len(dataset), 3)
    want = {step: [dataset[i]["prompt"] for i in sampler.take(2)] for step in steps}
    got = _prompts_by_step(out)
    assert sorted(got) == steps
    for step in steps:
        assert got[step] == [p[-1]["content"] if isinstance(p, list) else p for p in want[step]], step
    assert all(r["async/dropped_stale"] == 0 and r["async/staleness_max"] <= 1 for r in _rows(out))


@pytest.mark.slow
def test_a_rollout_process_that_dies_leaves_the_finished_steps_checkpointed(tiny, tmp_path):  # noqa: F811
    """The rollout process killed mid-run (an OOM kill): the trainer stops with exit 1 and one line naming the
    death, after checkpointing its last finished step (save_every 0: nothing else would keep them); --resume
    continues from there, every step once."""
    out = tmp_path / "run"
    args = _async_args(tiny, out, "--max_steps", "100000", "--dynamic_sampling", "false")
    run = _start(tiny, *args)
    _wait_for_step(run, out, 2)
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    rollout = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(rollout) == 1, children  # the rollout process (beside multiprocessing's resource tracker)
    os.kill(int(rollout[0]), signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err[-3000:]
    line = _one_line(err, "error:")
    assert "the rollout process exited (code -9)" in line and "--resume continues" in line
    done = _assert_steps_once(out)
    assert (out / "checkpoints" / f"step-{done[-1]}" / "trainer_state.json").is_file()
    res = _cli(tiny, *_async_args(tiny, out, "--max_steps", str(done[-1] + 2), "--dynamic_sampling", "false",
                                  "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _assert_steps_once(out)[-1] == done[-1] + 2


@pytest.mark.slow
def test_two_training_processes_each_with_a_producer(tiny, tmp_path):  # noqa: F811
    """The 2-process CPU launch (DDP over gloo): one producer per process, their own gloo group, the same
    step batch on both processes (else DDP's collectives would hang or the shard plans disagree)."""
    from test_trainer import _launch

    out = tmp_path / "ddp"
    res = _launch(tiny, "cpu-2proc.yaml", out, "--max_steps", "3", "--save_every", "1", "--mini_batch_size", "4",
                  "--max_staleness", "1", "--max_no_update_steps", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["async/staleness_max"] <= 1 and r["async/dropped_stale"] == 0 for r in rows)
    assert rows[-1]["async/staleness_max"] == 1  # the producers sampled step 3 while step 2 updated
    assert all(r["sampling/groups_kept"] == 2 for r in rows)
    assert (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "step-3" / "rng-rank1.json").is_file()


FAILING_REWARDS = '''
CALLS = [0]


def fails_on_third_call(prompts, completions, **kw):
    CALLS[0] += 1
    if CALLS[0] == 3:
        raise ValueError("boom")
    return [float(len(str(c)) % 3) for c in completions]
'''


def test_a_reward_failing_in_the_rollout_process_stops_the_run_in_one_line(tiny, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    """The producer's RewardFunctionError reaches the trainer: exit 1, one line naming the function, the
    finished steps checkpointed (--resume continues)."""
    (tmp_path / "failing.py").write_text(FAILING_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned rollout process gets this sys.path
    out = tmp_path / "run"
    code = _train(_async_args(tiny, out, "--max_steps", "10", "--rewards", "failing:fails_on_third_call",
                              "--dynamic_sampling", "false"))
    assert code == 1
    err = capsys.readouterr().err
    line = _one_line(err, "error:")
    assert "fails_on_third_call" in line and "boom" in line and "--resume" in line
    steps = [r["step"] for r in _rows(out)]
    assert steps == [1, 2] and (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()


POOL_REWARD = '''
import multiprocessing

from rewards.math import get_pool


def pooled_length(prompts, completions, **kw):
    """Scores in a process pool of its own, as rewards.math's verifier pool does."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return [float(n % 3) for n in pool.map(len, [str(c) for c in completions])]


def verifier_pool_length(prompts, completions, **kw):
    """Scores in the math verifier's own worker pool (workers that ignore SIGTERM)."""
    results = get_pool().map(len, [(str(c),) for c in completions], timeout=30)
    return [float(r.value % 3) for r in results]
'''


def test_a_reward_that_starts_processes_runs_in_the_rollout_process(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The producer is not a daemon: a reward function there may start processes (a daemon may not: the
    default job's math verifier pool stopped a max_staleness run at its first symbolic check). And it stops
    by itself at the end, the verifier pool's workers included (it used to be killed after 5 s: its exit
    waited for workers that ignore SIGTERM)."""
    from rl import rollout_process

    (tmp_path / "pooled.py").write_text(POOL_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    closed = []
    close = rollout_process.RolloutProcess.close

    def recording_close(self):
        if self.process is not None:
            close(self)
            closed.append(self.killed)

    monkeypatch.setattr(rollout_process.RolloutProcess, "close", recording_close)
    out = tmp_path / "run"
    assert _train(_async_args(tiny, out, "--max_steps", "2", "--rewards",
                              "pooled:pooled_length,pooled:verifier_pool_length", "--dynamic_sampling", "false")) == 0
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert closed == [False]


NO_GUARD_SCRIPT = '''
from rl.config import TrainConfig
from rl.train import Trainer

raise SystemExit(Trainer(TrainConfig(model={model!r}, depth=3, data="arith", data_limit=16, rewards=["tinyreward:digit_sum"],
                    accuracy_reward="tinyreward:is_zero", prompts_per_step=2, num_generations=4, max_new_tokens=5,
                    micro_batch_size=4, max_steps=2, max_staleness=1, eval_every=0, progress=False,
                    output_dir={out!r})).train())
'''


def test_a_script_read_from_stdin_is_refused_in_one_line_under_max_staleness(tiny, tmp_path):  # noqa: F811
    """`python - <<EOF`: spawn cannot re-import a script without a file; refused before anything starts
    (it used to print spawn's traceback and then advise the __main__ guard the script already had)."""
    import subprocess
    import sys

    from test_run_lifecycle import _env

    script = "if __name__ == '__main__':\n" + "\n".join("    " + line for line in NO_GUARD_SCRIPT.format(
        model=str(tiny / "model"), out=str(tmp_path / "run")).strip().splitlines())
    res = subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, env=_env(tiny), capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 1 and "ConfigError" in res.stderr, res.stderr[-2000:]
    assert "config key 'max_staleness': the rollout process is spawned" in res.stderr and "'<stdin>'" in res.stderr


def test_a_script_that_trains_at_top_level_is_told_about_the_main_guard(tiny, tmp_path):  # noqa: F811
    """Spawn re-imports the launching script in the rollout process; without `if __name__ == "__main__":` that
    starts a second run there. It used to hang; now the rollout process ends at once with one line naming the
    guard, the trainer stops with exit 1 naming it too, and no process is left."""
    import subprocess
    import sys

    from test_run_lifecycle import _env

    out = tmp_path / "run"
    script = tmp_path / "train_no_guard.py"
    script.write_text(NO_GUARD_SCRIPT.format(model=str(tiny / "model"), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(tiny), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a script without the __main__ guard hung under max_staleness 1")
    _producer_gone(proc.pid)
    assert proc.returncode == 1, err[-3000:]
    child = _one_line(err, "rollout process: ")
    assert str(script) in child and "if __name__ ==" in child
    trainer = _one_line(err, "error:")
    assert "rollout process exited" in trainer and "if __name__ ==" in trainer and str(script) in trainer
    import fcntl

    with open(out / ".looprl.lock") as lock:  # released: the next run may use the directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_shared_weights_give_the_rollout_copy_the_trainers_function(lora_rank):
    """What the producer loads computes what the trainer's model computes, LoRA included (merged W + delta),
    after each publish; the version travels with them."""
    if lora_rank:
        pytest.importorskip("peft")
    from rl.async_rollout import SharedWeights
    from rl.model_io import load_model
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    cfg = TrainConfig(torch_threads=1, lora_rank=lora_rank, max_staleness=1)
    policy = Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=True, self_distill=SelfDistillConfig(),
                    pad_id=0)
    ctx = torch.multiprocessing.get_context("spawn")
    weights = SharedWeights(ctx.Lock(), ctx.Value("q", -1, lock=False))
    weights.allocate(policy.module)
    copy_ = load_model(EMBEDDED_MODEL, "test").eval()
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    for version in (1, 2):
        with torch.no_grad():  # an "update": every trainable parameter moves
            for p in policy.module.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(version)))
        weights.publish(policy.module, version)
        assert weights.load_into(copy_)[0] == version
        with torch.no_grad():
            want = policy.module(input_ids=ids, depth=4).logits
            got = copy_(input_ids=ids, depth=4).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_max_staleness_under_fsdp2_is_refused_in_one_line(tiny, tmp_path, monkeypatch):  # noqa: F811
    from rl.sharding import TAKEN_ENV
    from rl.train import Trainer

    monkeypatch.setenv(TAKEN_ENV, "1")  # what take_fsdp_request leaves when the launcher asked for FSDP2
    cfg = TrainConfig(model=str(tiny / "model"), depth=3, data="arith", data_limit=8, max_staleness=1,
                      rewards=["tinyreward:digit_sum"], accuracy_reward="", output_dir=str(tmp_path / "run"),
                      eval_every=0, progress=False)
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert str(e.value) == ("config key 'max_staleness': asynchronous rollouts run on one process or under DDP, "
                            "not FSDP2 (not supported yet); use max_staleness 0")
