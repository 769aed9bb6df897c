"""A run never loses or mixes work (issue 13): end-of-run checkpoint, one run per output_dir, corrupt
checkpoint fallback, atomic final/ on a full disk, resume past max_steps, misbehaving reward functions.
Each failure is exit code + one line naming the culprit, and what was written before is still there."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import REPO, _args, _rows, _train, tiny  # noqa: F401  (tiny is a fixture)

BAD_REWARDS = '''
import math, os, time

def boom(prompts, completions, **kw):
    raise ZeroDivisionError("division by zero")

def nan_first(prompts, completions, **kw):
    """NaN for the first sample of every call, a varied score for the rest."""
    return [math.nan if i == 0 else float(len(str(c)) % 3) for i, c in enumerate(completions)]

def flaky_on_rank_1(prompts, completions, **kw):
    """Raises on the 3rd call of process 1 only (the other process scores fine)."""
    CALLS[0] += 1
    if CALLS[0] == 3 and os.environ.get("LOCAL_RANK") == "1":
        raise RuntimeError("third call fails on rank 1")
    return [float(len(str(c)) % 3) for c in completions]

def somenone(prompts, completions, **kw):
    return [None if i % 2 else 1.0 for i in range(len(completions))]

def nones(prompts, completions, **kw):
    return [None] * len(completions)

def hang(prompts, completions, **kw):
    time.sleep(60)
    return [0.0] * len(completions)

CALLS = [0]

def flaky(prompts, completions, **kw):
    """Raises on its 3rd call unless FIXED is set (the user fixed it)."""
    CALLS[0] += 1
    if CALLS[0] == 3 and not os.environ.get("FIXED"):
        raise RuntimeError("third call fails")
    return [float(len(str(c)) % 3) for c in completions]

def hang_on_second_call(prompts, completions, **kw):
    CALLS[0] += 1
    if CALLS[0] == 2:
        open("hanging", "w").close()  # tells the test the reward function is stuck now
        time.sleep(120)
    return [float(len(str(c)) % 3) for c in completions]
'''


@pytest.fixture(scope="module")
def bad(tiny):  # noqa: F811
    (tiny / "badreward.py").write_text(BAD_REWARDS)
    return tiny


def _err_line(capsys, needle: str) -> str:
    """The one stderr line holding `needle` (no traceback anywhere)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if needle in line]
    assert len(lines) == 1, err
    return lines[0]


def test_used_output_dir_end_checkpoint_resume_and_overwrite(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "2")) == 0
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()  # save_every 0: still at the end
    assert (out / "final" / "modeling_ouro.py").is_file()  # final/ ships its model code (test_trl_user.py)
    first = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert _train(_args(tiny, out, "--max_steps", "3")) == 2  # a second run into the same dir: refused
    assert "--resume" in _err_line(capsys, "already holds a run")
    assert _train(_args(tiny, out, "--max_steps", "1", "--resume")) == 2  # nothing to continue to
    assert "at step 2" in _err_line(capsys, "beyond max_steps 1")
    assert (out / "metrics.jsonl").read_text() == first and (out / "final" / "config.json").is_file()

    assert _train(_args(tiny, out, "--max_steps", "3", "--resume")) == 0
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert _train(_args(tiny, out, "--max_steps", "1", "--overwrite")) == 0
    assert [r["step"] for r in _rows(out)] == [1]
    assert not (out / "checkpoints" / "step-3").exists()


def test_output_dir_that_is_a_file_is_one_line(tiny, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "file"
    target.write_text("mine")
    assert _train(_args(tiny, target, "--max_steps", "1")) == 2
    assert "output_dir" in _err_line(capsys, "exists and is not a directory")
    assert target.read_text() == "mine"
    assert _train(_args(tiny, target / "run", "--max_steps", "1")) == 2  # cannot be created: unwritable
    assert str(target / "run") in _err_line(capsys, "not writable")
    assert target.read_text() == "mine"


def test_corrupt_newest_checkpoint_falls_back_then_fails_in_one_line(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "2", "--save_every", "1")) == 0
    weights = out / "checkpoints" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash while the disk filled
    capsys.readouterr()
    assert _train(_args(tiny, out, "--max_steps", "2", "--resume")) == 0
    warning = _err_line(capsys, "is unreadable")
    assert "step-2" in warning and "previous one" in warning
    assert [r["step"] for r in _rows(out)] == [1, 2]  # step 2 ran again from step 1's checkpoint

    for step in (1, 2):
        (out / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{not json")
    rows = _rows(out)
    assert _train(_args(tiny, out, "--max_steps", "3", "--resume")) == 2
    assert "step-2" in _err_line(capsys, "no readable checkpoint")
    assert _rows(out) == rows


class _Payload:
    """Unpickling this creates the directory `path`: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoints_hold_no_pickles_and_resume_never_unpickles(tiny, tmp_path, capsys):  # noqa: F811
    """Trainer state is safetensors + JSON; pickles planted in a checkpoint (accelerate's old file names)
    are never opened, and an old pickle-only checkpoint is skipped in one line, not loaded."""
    import json
    import pickle

    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "2", "--save_every", "1", "--policy_exits", "all",
                        "--policy_exit_weights", "learned")) == 0
    files = [p for p in (out / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".json", ".safetensors"}, sorted(p.name for p in files)

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    names = ("random_states_0.pkl", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin",
             "scheduler.bin", "pytorch_model.bin", "model.bin", "rng_state.pth")
    for name in names:
        (out / "checkpoints" / "step-2" / name).write_bytes(payload)
    old = out / "checkpoints" / "step-9"  # a checkpoint in the old (accelerate save_state) layout
    old.mkdir()
    for name in names:
        (old / name).write_bytes(payload)
    (old / "trainer_state.json").write_text(json.dumps({"step": 9, "sampler": {}, "nan_streak": 0}))
    capsys.readouterr()
    assert _train(_args(tiny, out, "--max_steps", "3", "--resume", "--policy_exits", "all",
                        "--policy_exit_weights", "learned")) == 0
    assert not marker.exists(), "a pickle in the checkpoint was executed"
    warning = _err_line(capsys, "is unreadable")
    assert "step-9" in warning and "never loaded" in warning
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]  # continued from step-2, not from the planted step-9


def test_python_api_callable_reward_and_full_disk_keeps_final_atomic(tiny, tmp_path, capsys,  # noqa: F811
                                                                     monkeypatch):
    """Trainer(TrainConfig(...)).train() with a plain callable reward; a disk that fills while final/ is
    written leaves no half final/ and says so in one line."""
    from rl.config import TrainConfig
    from rl.train import Trainer

    def length_reward(prompts, completions, **kw):
        return [float(len(c) % 3) for c in completions]

    out = tmp_path / "api"
    def length_is_even(prompts, completions, **kw):  # an accuracy function scores 1 / 0
        return [float(len(c) % 2 == 0) for c in completions]

    cfg = TrainConfig(model=str(tiny / "model"), depth=3, data="arith", data_limit=16, rewards=[length_reward],
                      accuracy_reward=length_is_even, prompts_per_step=2, num_generations=4, max_new_tokens=4,
                      micro_batch_size=8, max_steps=1, eval_every=0, progress=False, output_dir=str(out))
    trainer = Trainer(cfg)

    def full_disk(path, **kw):
        (Path(path) / "config.json").write_text("{}")  # transformers writes the config first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer.policy.module, "save_pretrained", full_disk)  # the HF model's own save
    assert trainer.train() == 1
    assert str(out / "final") in _err_line(capsys, "no space left on device")
    assert not (out / "final").exists() and not list(out.glob(".tmp-*"))
    assert [r["step"] for r in _rows(out)] == [1] and "reward/length_reward/mean" in _rows(out)[0]
    assert "rewards:\n- " in (out / "config.yaml").read_text()  # the callable is saved as module:name


def test_reward_function_that_raises_stops_in_one_line(bad, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(_args(bad, out, "--max_steps", "2", "--rewards", "badreward:boom")) == 1
    line = _err_line(capsys, "reward 'boom' raised ZeroDivisionError")
    assert "samples 0..7" in line and "reward_on_error" in line


def test_reward_function_error_checkpoints_the_last_step_and_resume_continues(bad, tmp_path):
    """A reward function raising mid-run (exit 1) keeps the finished steps: fixed, --resume runs each step once."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{bad}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", "rl", "train", *_args(bad, out, "--max_steps", "4", "--rewards", "badreward:flaky",
                                                          "--dynamic_sampling", "false")]
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = [x for x in res.stderr.splitlines() if "third call fails" in x]
    assert "checkpoint written at step 2" in line and "--resume" in line
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    res = subprocess.run([*argv, "--resume"], cwd=tmp_path, env={**env, "FIXED": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_reward_function_error_on_one_process_stops_every_process_with_a_checkpoint(bad, tmp_path):
    """Two gloo processes, the reward fails on one only: both stop (no hang in mismatched collectives),
    with the checkpoint of the last finished step."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{bad}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", "29561", "-m", "rl", "train",
           *_args(bad, out, "--max_steps", "4", "--rewards", "badreward:flaky_on_rank_1", "--dynamic_sampling",
                  "false", "--mini_batch_size", "4")]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "third call fails on rank 1" in res.stderr, res.stderr[-3000:]
    assert "checkpoint written at step 2" in res.stderr
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_skip_group_policy_drops_only_the_bad_groups(bad, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(_args(bad, out, "--max_steps", "1", "--rewards", "badreward:nan_first", "--dynamic_sampling",
                        "false", "--reward_on_error", "skip_group")) == 0
    assert "reward 'nan_first': sample 0: score is nan" in _err_line(capsys, "their groups skipped")
    (row,) = _rows(out)
    assert row["rewards/fn_bad_samples"] == 1 and row["sampling/groups_kept"] == 1  # 1 bad sample: its group
    assert row["rewards/skipped_samples"] == 4 and row["sampling/groups_skipped"] == 1  # its group: 4 samples
    assert row["sampling/groups_sampled"] == 2


def test_skip_group_metrics_are_true_when_every_group_is_dropped(bad, tmp_path):
    """Every sample unscored by any function: both groups (8 samples) dropped; the counts and the warning
    say so (not 'equal rewards', not 0 groups sampled)."""
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"every group \(2\) was skipped .*reward_on_error: skip_group"):
        assert _train(_args(bad, out, "--max_steps", "1", "--rewards", "badreward:somenone,badreward:nones",
                            "--dynamic_sampling", "false", "--reward_on_error", "skip_group")) == 0
    (row,) = _rows(out)
    assert row["rewards/skipped_samples"] == 8 and row["sampling/groups_sampled"] == 2
    assert row["sampling/groups_skipped"] == 2 and row["sampling/groups_kept"] == 0
    assert row["completion/len_mean"] > 0 and row["accuracy"] == row["accuracy"]  # drawn samples: not nan


def test_cli_reward_timeout_bounds_a_hung_function(bad):
    """`looprl reward --timeout` stops a user function that never returns: exit 2, one line, quickly."""
    env = {**os.environ, "PYTHONPATH": f"{bad}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "rl", "reward", "--fn", "badreward:hang", "--completion", "x",
                          "--answer", "1", "--timeout", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=50)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "reward 'hang' timed out" in res.stderr


def test_ctrl_c_inside_a_hung_reward_function_checkpoints_and_exits(bad, tmp_path):
    """The headline case: a reward function hangs, the user presses Ctrl-C once; the run stops at once
    with a checkpoint of the last finished step (not after the hang, not with a traceback)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{bad}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "rl", "train", *_args(bad, out, "--max_steps", "5", "--rewards",
                             "badreward:hang_on_second_call", "--dynamic_sampling", "false")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "hanging").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "hanging").exists(), "the reward function was never called twice"
    start = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and time.time() - start < 30, err[-2000:]  # interrupted, checkpoint written
    assert "Traceback" not in err and "interrupted during the rewards of step 2" in err
    assert [r["step"] for r in _rows(out)] == [1]
    assert (out / "checkpoints" / "step-1" / "trainer_state.json").is_file()


def test_reward_timeout_with_zero_policy_keeps_training(bad, tmp_path, capsys):
    """reward_timeout bounds a hung function inside the trainer (worker thread), zero scores it."""
    out = tmp_path / "run"
    start = time.monotonic()
    assert _train(_args(bad, out, "--max_steps", "1", "--rewards", "tinyreward:digit_sum,badreward:hang",
                        "--dynamic_sampling", "false", "--reward_timeout", "0.5", "--reward_on_error", "zero")) == 0
    assert time.monotonic() - start < 50  # the hung function sleeps 60 s per call
    assert "no result after 0.5s" in _err_line(capsys, "reward 'hang' timed out")
    (row,) = _rows(out)
    assert row["rewards/fn_errors"] == 1 and row["reward/hang/mean"] == 0.0
