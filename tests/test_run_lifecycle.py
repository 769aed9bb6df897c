"""The run's life (issue 21, classes 3, 4, 7, 8): a config error before torch loads, --print_config, what
--resume may change (refused in one line, or applied, logged and recorded), one process per output_dir,
exit codes that tell an interrupted run from a finished one, and a checkpoint written before final/.
Where a user meets it, it runs as a subprocess: exit code, the one line, nothing written lost or mixed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_trainer import REPO, _args, _rows, _train, tiny  # noqa: F401  (tiny is a fixture)

LIFE_REWARDS = '''
import os, signal

from rewards.math import get_pool


def pooled(prompts, completions, **kw):
    """A varied score computed in the verifier pool's worker processes (forked from the trainer)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(r.value % 3) for r in get_pool().map("builtins:len", [(t,) for t in texts], timeout=30)]


CALLS = [0]


def sigterm_on_second_call(prompts, completions, **kw):
    CALLS[0] += 1
    if CALLS[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(str(c)) % 3) for c in completions]
'''


@pytest.fixture(scope="module")
def life(tiny):  # noqa: F811
    (tiny / "lifereward.py").write_text(LIFE_REWARDS)
    return tiny


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _cli(root: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl", "train", *argv], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=timeout)


def _one_line(err: str, needle: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if needle in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file the run wrote (the lock file aside), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".looprl.lock"}


def _start(root: Path, *argv: str) -> subprocess.Popen:
    """A training process in its own process group (as a shell job / Slurm step is)."""
    return subprocess.Popen([sys.executable, "-m", "rl", "train", *argv], cwd=root, env=_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _logged_steps(out: Path) -> list[int]:
    """The steps in a LIVE run's metrics.jsonl: only whole lines (the trainer may be writing the last one)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line)["step"] for line in text.split("\n")[:-1] if line.strip()]


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= step for s in _logged_steps(out)):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the run never logged step {step}: {proc.communicate()[1][-3000:]}")


def _assert_steps_once(out: Path) -> list[int]:
    steps = [r["step"] for r in _rows(out)]
    assert steps == list(range(1, len(steps) + 1)), steps  # every step once, in order: nothing mixed
    return steps


# ----------------------------------------------------------------------------- config before torch


def test_config_error_is_answered_before_torch_loads(tmp_path):
    start = time.monotonic()
    res = _cli(tmp_path, "--bogus_key", "1", "--output_dir", str(tmp_path / "run"))
    assert time.monotonic() - start < 5  # ~0.3 s; importing torch first took ~8 s
    assert res.returncode == 2
    assert res.stderr.strip() == "looprl train: unknown config key 'bogus_key' in command line"
    assert not (tmp_path / "run").exists()
    probe = ("import sys; from rl.cli import main; code = main(['train', '--lr', '-1']); "
             "print(code, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.split() == ["2", "False"], res.stderr  # the value error too, torch never imported
    assert "config key 'lr': must be > 0, got -1.0" in res.stderr


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("learning_rate: 1.0e-3\nmax_steps: 7\n")  # a TRL alias resolves to our key
    probe = ("import sys; from rl.cli import main; code = main(['train', '--config', 'job.yaml', '--print_config', "
             "'--max_steps', '9', '--output_dir', 'run']); print('torch' in sys.modules, file=sys.stderr); "
             "sys.exit(code)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "False", res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed["lr"] == 1e-3 and printed["max_steps"] == 9 and printed["output_dir"] == "run"
    from rl.config import build_config, portable_dict

    assert printed == portable_dict(build_config(printed))  # loadable as --config: every key, nothing extra
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- --resume and the config


def test_resume_with_a_frozen_key_changed_is_refused_in_one_line(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "2")) == 0
    before = _snapshot(out)
    res = _cli(tiny, *_args(tiny, out, "--max_steps", "4", "--resume", "--seed", "4", "--loss_type", "grpo",
                            "--data_limit", "32"))
    assert res.returncode == 2
    line = _one_line(res.stderr, "cannot change on resume")
    assert "seed 3 -> 4" in line and "loss_type 'dapo' -> 'grpo'" in line and "data_limit 64 -> 32" in line
    assert str(out) in line
    assert _snapshot(out) == before  # nothing written: metrics, checkpoints, config.yaml, final/ as they were


def test_resume_with_a_new_lr_and_max_steps_uses_logs_and_records_them(tiny, tmp_path):  # noqa: F811
    """A linear schedule over 2 steps at lr 1e-2, then --resume to 4 steps at lr 2e-2: from step 3 the
    optimizer runs at the new rate on the stretched schedule (2e-2 * (1 - 2/4)), not the checkpoint's."""
    from rl.config import load_config
    from rl.train import Trainer

    out = tmp_path / "run"
    common = ("--lr_scheduler", "linear", "--save_every", "1")
    assert _train(_args(tiny, out, "--max_steps", "2", *common)) == 0
    trainer = Trainer(load_config(_args(tiny, out, "--max_steps", "4", "--lr", "2e-2", "--resume", *common)))
    assert trainer.train() == 0 and trainer.exit_code == 0 and trainer.interrupted is None
    lrs = [r["lr"] for r in _rows(out)]
    assert lrs == pytest.approx([1e-2, 5e-3, 1e-2, 5e-3])  # 1e-2 * (1, 1/2), then 2e-2 * (1/2, 1/4)
    assert trainer.policy.optimizer.param_groups[0]["initial_lr"] == pytest.approx(2e-2)
    assert trainer.policy.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # 2e-2 * (1 - 4/4)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 2e-2 and saved["max_steps"] == 4  # config.yaml holds what ran
    (row,) = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["changes"] == {"lr": {"old": 1e-2, "new": 2e-2},
                                                   "max_steps": {"old": 2, "new": 4}}
    state = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 2e-2  # the next --resume compares against what ran last
    _assert_steps_once(out)
    # a resume with the same settings changes nothing and records nothing
    assert _train(_args(tiny, out, "--max_steps", "5", "--lr", "2e-2", "--resume", *common)) == 0
    assert len((out / "config_changes.jsonl").read_text().splitlines()) == 2  # max_steps 4 -> 5 only
    assert "lr" not in json.loads((out / "config_changes.jsonl").read_text().splitlines()[1])["changes"]


def test_resume_keeps_the_checkpoints_settings_for_keys_not_given(tiny, tmp_path):  # noqa: F811
    """`--resume --max_steps 4` alone changes max_steps only: lr, reward_on_error, reward_timeout (and
    model, data, rewards ...) keep the trained run's values, not the defaults, and nothing else is recorded."""
    out = tmp_path / "run"
    first = _args(tiny, out, "--max_steps", "2", "--lr", "1e-4", "--reward_on_error", "zero", "--reward_timeout", "30")
    assert _train(first) == 0
    shown = _cli(tiny, "--output_dir", str(out), "--max_steps", "4", "--resume", "--print_config")
    assert shown.returncode == 0, shown.stderr  # --print_config shows what the resumed run will train with
    printed = yaml.safe_load(shown.stdout)
    assert (printed["lr"], printed["reward_on_error"], printed["max_steps"]) == (1e-4, "zero", 4)
    assert _train(["--output_dir", str(out), "--max_steps", "4", "--resume"]) == 0
    assert [r["lr"] for r in _rows(out)] == pytest.approx([1e-4] * 4)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["lr"], saved["reward_on_error"], saved["reward_timeout"], saved["max_steps"]) == (1e-4, "zero", 30, 4)
    assert saved["rewards"] == ["tinyreward:digit_sum"] and saved["model"] == str(tiny / "model")
    (row,) = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert row["changes"] == {"max_steps": {"old": 2, "new": 4}}
    _assert_steps_once(out)


# ----------------------------------------------------------------------------- lock and signals


@pytest.mark.slow
def test_one_process_per_output_dir_and_interrupts_exit_3(life, tmp_path):
    """A live run holds output_dir: a second --resume or --overwrite is refused naming the dir and the pid.
    Ctrl-C to the whole process group (verifier workers included): exit 3, no traceback, a checkpoint
    that --resume continues. After a kill -9 the lock does not block."""
    out = tmp_path / "run"
    # a run that cannot end before the signal, however slow the machine makes the checks below
    args = _args(life, out, "--max_steps", "100000", "--save_every", "1", "--rewards", "lifereward:pooled",
                 "--max_no_update_steps", "0")
    first = _start(life, *args)
    _wait_for_step(first, out, 1)
    for flag in ("--resume", "--overwrite"):
        res = _cli(life, *args, flag)
        assert res.returncode == 2, res.stderr[-3000:]
        line = _one_line(res.stderr, "in use by another looprl run")
        assert str(out) in line and f"pid {first.pid}" in line
    assert first.poll() is None  # the first run goes on, untouched

    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = first.communicate(timeout=120)
    assert first.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if "got SIGINT" in line]) == 1  # the workers stay quiet
    # "interrupted: checkpoint written at step N", or when the signal lands inside the step's reward calls
    # "interrupted during the rewards of step N+1: checkpoint written at step N": both the last finished step
    line = _one_line(err, "checkpoint written at step")
    assert "interrupted" in line and "(exit code 3)" in line
    steps = _assert_steps_once(out)
    assert f"checkpoint written at step {steps[-1]}" in line
    assert (out / "checkpoints" / f"step-{steps[-1]}" / "trainer_state.json").is_file()

    second = _start(life, *args, "--resume")  # resumes; then killed with -9: its lock dies with it
    _wait_for_step(second, out, steps[-1] + 1)
    second.kill()
    second.communicate(timeout=60)
    assert (out / ".looprl.lock").read_text().strip() == str(second.pid)  # a stale lock file
    last = max(s for s, _ in [(int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*")])
    res = _cli(life, *_args(life, out, "--max_steps", str(last + 1), "--save_every", "1", "--rewards",
                            "lifereward:pooled", "--max_no_update_steps", "0", "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _assert_steps_once(out)[-1] == last + 1 and (out / "final" / "config.json").is_file()


def test_sigterm_to_the_process_group_with_verifier_workers(life, tmp_path):
    """`timeout` and Slurm signal the whole group: the pool's forked workers must not print or die
    mid-step; the trainer finishes its step, checkpoints, exits 3 and cleans the workers up."""
    out = tmp_path / "run"
    proc = _start(life, *_args(life, out, "--max_steps", "100000", "--rewards", "lifereward:pooled",
                 "--max_no_update_steps", "0"))
    _wait_for_step(proc, out, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if "got SIGTERM" in line]) == 1, err[-3000:]
    steps = _assert_steps_once(out)
    assert (out / "checkpoints" / f"step-{steps[-1]}" / "trainer_state.json").is_file()
    deadline = time.time() + 60  # the workers exit right after the trainer; a loaded machine may take seconds
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break  # no verifier worker outlived the trainer
        time.sleep(0.5)
    else:
        raise AssertionError(f"verifier workers of pid {proc.pid} still alive 60 s after the trainer exited")


def test_python_api_tells_an_interrupted_run_from_a_finished_one(life, tmp_path):
    from rl.config import load_config
    from rl.run_dir import RunLock
    from rl.train import Trainer

    out = tmp_path / "api"
    trainer = Trainer(load_config(_args(life, out, "--max_steps", "5", "--rewards", "lifereward:sigterm_on_second_call",
                                        "--dynamic_sampling", "false")))
    with pytest.raises(Exception, match="in use by another looprl run"):  # locked from construction on
        RunLock(out, warn=print)
    assert trainer.train() == 3
    assert trainer.exit_code == 3 and trainer.interrupted == "SIGTERM"
    assert [r["step"] for r in _rows(out)] == [1] and (out / "checkpoints" / "step-1").is_dir()
    RunLock(out, warn=print).release()  # train() released the output_dir


# ----------------------------------------------------------------------------- final/ after the checkpoint


FAILING_FINAL = """
import errno, os, sys
import rl.policy
from rl.train import main

def full_disk(self, path, tokenizer):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

rl.policy.Policy.save_pretrained = full_disk
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_final_write_keeps_the_run_resumable(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    (tmp_path / "failing_final.py").write_text(FAILING_FINAL)
    args = _args(tiny, out, "--max_steps", "2")
    res = subprocess.run([sys.executable, str(tmp_path / "failing_final.py"), *args], cwd=tmp_path,
                         env=_env(tiny), capture_output=True, text=True, timeout=240)
    assert res.returncode == 1, res.stderr[-3000:]
    line = _one_line(res.stderr, "no space left on device")
    assert "checkpointed at step 2" in line and "--resume writes final/ again" in line
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file() and not (out / "final").exists()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]

    res = _cli(tiny, *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "final" / "config.json").is_file()
    assert _rows(out) == rows  # nothing trained again, nothing lost


@pytest.mark.slow
def test_two_processes_stop_together_when_the_output_dir_is_locked(tiny, tmp_path):  # noqa: F811
    """accelerate 2-process run: only the main process takes the lock, and when it cannot, every process
    stops with the same line (none waits for the others in a collective)."""
    from rl.run_dir import RunLock

    out = tmp_path / "ddp"
    held = RunLock(out, warn=print)  # this test process is "the other run"
    try:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", "29547", "-m", "rl", "train",
               *_args(tiny, out, "--max_steps", "2", "--mini_batch_size", "4")]
        res = subprocess.run(cmd, cwd=REPO, env=_env(tiny), capture_output=True, text=True, timeout=240)
    finally:
        held.release()
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "in use by another looprl run" in line]
    assert len(lines) == 2 and all(f"pid {os.getpid()}" in line for line in lines), res.stderr[-3000:]
    assert "Traceback" not in res.stderr.split("in use by another looprl run")[0]  # no worker traceback first
    assert _snapshot(out) == {}


def test_resume_refuses_prompts_that_changed_under_the_same_path(tiny, tmp_path):  # noqa: F811
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = _args(tiny, out, "--max_steps", "1")
    args[args.index("--data") + 1] = str(data)
    assert _train(args) == 0
    rows[3]["answer"] = "7"  # the file is edited (or regenerated) between the run and its --resume
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _snapshot(out)
    res = _cli(tiny, *args[:args.index("--max_steps")], "--max_steps", "2", "--resume")
    assert res.returncode == 2
    line = _one_line(res.stderr, "differ from those")
    assert str(data) in line and "same row count, content changed" in line
    assert _snapshot(out) == before


def test_an_interrupt_inside_the_verifier_pool_propagates_and_the_pool_recovers(monkeypatch):
    """A signal handler that raises while the pool writes a task (the trainer's Ctrl-C inside a reward
    function) must reach the trainer as that exception, not become a failed task scored as wrong."""
    from rewards.guard import RewardInterrupted
    from rewards.pool import WorkerPool

    with WorkerPool(num_workers=1) as pool:
        assert pool.map(abs, [(-1,)], timeout=30)[0].value == 1
        worker = pool._workers[0]
        real_send = worker.conn.send

        def interrupted(obj):
            real_send(obj)  # the task went out; the guard's handler raises right after
            raise RewardInterrupted("SIGINT")

        monkeypatch.setattr(worker.conn, "send", interrupted)
        with pytest.raises(RewardInterrupted):
            pool.map(abs, [(-2,), (-3,)], timeout=30)
        assert pool.restarts == 1 and pool._workers[0] is not worker  # the busy worker was replaced
        assert [r.value for r in pool.map(abs, [(-4,), (-5,)], timeout=30)] == [4, 5]
