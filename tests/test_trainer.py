"""End-to-end trainer runs on a tiny random looped model: run layout, metrics, depth-matched mismatch,
resume after kill -9, signals, non-finite losses, a standard HF model and two CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time/", "tokens_per_s")

REWARD_MODULE = '''
import os, signal

def _text(c):  # chat prompts get completions as [{"role": "assistant", "content": ...}] (TRL)
    return c if isinstance(c, str) else c[0]["content"]

def digit_sum(prompts, completions, **kw):
    """A reward with variance on random text: (sum of character codes) mod 3."""
    return [float(sum(map(ord, _text(c))) % 3) for c in completions]

def is_zero(prompts, completions, **kw):
    return [float(sum(map(ord, _text(c))) % 3 == 0) for c in completions]

def huge_reward(prompts, completions, **kw):
    """Finite rewards (a NaN reward is refused by rewards.guard) whose advantages overflow the loss."""
    return [3e38 if i % 2 else -3e38 for i in range(len(completions))]

CALLS = [0]

def sigterm_on_second_call(prompts, completions, **kw):
    CALLS[0] += 1
    if CALLS[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return digit_sum(prompts, completions)
'''


def _tokenizer():
    from rl.make_tiny import build_tokenizer  # the embedded model's char-level tokenizer (100 ids)

    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer, 3-loop random Ouro model + char tokenizer + a reward module on sys.path."""
    import looped  # noqa: F401  (registers the Ouro classes with the Auto classes)
    from looped import OuroConfig, OuroForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = OuroConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, total_ut_steps=3, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, max_position_embeddings=128)
    OuroForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "tinyreward.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared 2-core machine
    yield root
    torch.set_num_threads(threads)
    sys.path.remove(str(root))


def _args(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--depth", "3", "--data", "arith", "--data_limit", "64",
            "--rewards", "tinyreward:digit_sum", "--accuracy_reward", "tinyreward:is_zero",
            "--prompts_per_step", "2", "--num_generations", "4", "--max_new_tokens", "5",
            "--micro_batch_size", "4", "--lr", "1e-2", "--progress", "false", "--output_dir", str(out),
            "--seed", "3", "--eval_every", "0", *extra]


def _train(argv) -> int:
    from rl.train import main

    return main(argv)


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _strip(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def _assert_same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        ra, rb = _strip(ra), _strip(rb)
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)


def test_run_layout_metrics_and_depth_matched_scores(tiny, tmp_path):
    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "2", "--save_every", "1", "--num_iterations", "2",
                        "--loss_type", "dapo", "--eval_every", "2", "--eval_data", "arith", "--eval_depths", "1,3",
                        "--eval_limit", "4", "--report_to", "tensorboard")) == 0
    all_rows = _rows(out)
    assert [r["step"] for r in all_rows] == [0, 1, 2]
    # step 0 is the eval baseline before any update: eval keys only
    baseline, rows = all_rows[0], all_rows[1:]
    assert {"eval/accuracy_d1", "eval/accuracy_d3"} <= baseline.keys() and "loss/policy" not in baseline
    required = ["reward/mean", "reward/digit_sum/mean", "reward/digit_sum/std", "accuracy", "groups/zero_std_frac", "sampling/rounds",
                "completion/len_mean", "completion/truncated_frac", "loss/policy", "clip/frac_low",
                "clip/frac_high", "entropy", "mismatch/logp_abs_max", "mismatch/logp_abs_mean", "mismatch/kl",
                "grad_norm", "lr", "time/rollout", "time/reward", "time/update", "tokens_per_s",
                "exit/p_mean_t1", "exit/p_mean_t3", "exit/kl_t2"]
    for key in required:
        assert key in rows[0], key
    for r in rows:  # torch engine, CPU fp32: the update scores exactly what the worker sampled
        assert r["mismatch/logp_abs_max"] <= 1e-4
        assert r["mismatch/kl"] <= 1e-8
    assert list((out / "looprl").glob("events.out.tfevents.*")), "no tensorboard event file"
    assert "eval/accuracy_d1" not in rows[0] and {"eval/accuracy_d1", "eval/accuracy_d3"} <= rows[1].keys()
    # num_iterations 2: the second pass sees ratios != 1 after the first update, so clipping can engage
    assert rows[0]["grad_norm"] > 0
    cfg_text = (out / "config.yaml").read_text()
    assert "depth: 3" in cfg_text and "num_iterations: 2" in cfg_text
    assert (out / "checkpoints" / "step-1" / "trainer_state.json").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "advantage"} <= samples[0].keys()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token == "<eos>"
    initial = AutoModelForCausalLM.from_pretrained(tiny / "model")
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters())]
    assert any(moved)


def _kill9_after_step2_checkpoint(tiny, out, common) -> None:
    """Start `looprl train` in a subprocess and SIGKILL it once checkpoints/step-2 exists (before it finishes)."""
    env = {**os.environ, "PYTHONPATH": f"{tiny}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rl", "train", *_args(tiny, out, *common)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "step-2"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the subprocess never wrote checkpoints/step-2"
    assert not (out / "final").exists(), "killed too late: the run had already finished"


def _kill9_resume_matches_uninterrupted(tiny, tmp_path, common) -> tuple[Path, Path]:
    """Run `common` uninterrupted (ref/) and killed with SIGKILL after step 2 then resumed (killed/);
    asserts the same metrics; returns both run directories."""
    ref = tmp_path / "ref"
    assert _train(_args(tiny, ref, *common)) == 0

    out = tmp_path / "killed"
    _kill9_after_step2_checkpoint(tiny, out, common)

    assert _train(_args(tiny, out, *common, "--resume")) == 0
    _assert_same_metrics(_rows(ref), _rows(out))
    return ref, out


def test_kill9_then_resume_matches_uninterrupted(tiny, tmp_path):
    """A run killed with SIGKILL after a checkpoint, then --resume: every step once, same metrics."""
    # enough steps after the step-2 checkpoint that the run cannot finish before the kill lands
    common = ["--max_steps", "10", "--save_every", "1", "--loss_type", "grpo", "--scale_rewards", "batch"]
    _kill9_resume_matches_uninterrupted(tiny, tmp_path, common)


def test_sigterm_checkpoints_and_exits_cleanly(tiny, tmp_path):
    out = tmp_path / "term"
    before = signal.getsignal(signal.SIGTERM)
    args = _args(tiny, out, "--max_steps", "5", "--rewards", "tinyreward:sigterm_on_second_call",
                 "--dynamic_sampling", "false")
    assert _train(args) == 3  # interrupted, checkpoint written (rl/exit_codes.py)
    rows = _rows(out)
    # the signal came inside step 2's reward function: it is abandoned at once (a hung reward function
    # must not hold the run), step 2 is dropped and the checkpoint is the last finished step
    assert [r["step"] for r in rows] == [1]
    assert (out / "checkpoints" / "step-1" / "trainer_state.json").is_file()
    assert not (out / "checkpoints" / "step-2").exists()
    assert not (out / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is uninstalled


def test_non_finite_loss_skips_then_aborts(tiny, tmp_path, capsys):
    out = tmp_path / "nan"
    args = _args(tiny, out, "--max_steps", "6", "--rewards", "tinyreward:huge_reward", "--max_nan_steps", "2",
                 "--dynamic_sampling", "false", "--scale_rewards", "none")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        code = _train(args)
    assert code == 1
    assert "aborting, checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()  # updates skipped: weights good
    assert all(r["updates/skipped"] == 1 for r in _rows(out))


def test_config_errors_name_the_key(tiny, tmp_path, capsys):
    assert _train(_args(tiny, tmp_path / "x", "--depth", "5")) == 2
    assert "'depth'" in capsys.readouterr().err  # the tiny model has 3 loops
    assert _train(_args(tiny, tmp_path / "x", "--update_depth", "2")) == 2
    assert "update_depth" in capsys.readouterr().err


def test_standard_hf_causal_lm_trains_at_depth_1(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    path = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    args = _args(tiny, tmp_path / "run", "--max_steps", "1")
    args[args.index("--model") + 1] = str(path)
    args[args.index("--depth") + 1] = "1"
    assert _train(args) == 0
    (row,) = _rows(tmp_path / "run")
    assert row["mismatch/logp_abs_max"] <= 1e-4
    assert not any(k.startswith("exit/") for k in row)


def _launch(tiny, config: str, out, *extra):
    """`accelerate launch --config_file configs/accelerate/<config> -m rl train ...` on the tiny model."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": f"{tiny}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate" / config), "--main_process_port", port, "-m", "rl", "train",
           *_args(tiny, out, *extra)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate(tiny, tmp_path):
    out = tmp_path / "ddp"
    res = _launch(tiny, "cpu-2proc.yaml", out, "--max_steps", "2", "--save_every", "1", "--mini_batch_size", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["sampling/groups_sampled"] >= 2 and rows[0]["mismatch/logp_abs_max"] <= 1e-4
    assert (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "step-1" / "rng-rank1.json").is_file()  # one RNG state per process


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_match_ddp_resume_exactly_and_save_a_portable_model(tiny, tmp_path):
    """FSDP2 (fully_shard over 2 gloo processes): the same metrics as 2-process DDP, per-process
    sharded checkpoints, an exact --resume, and a consolidated final/ that loads without looprl."""
    from transformers import AutoModelForCausalLM

    from rl.checkpoint import load_checkpoint_weights

    common = ("--max_steps", "3", "--save_every", "1", "--mini_batch_size", "4", "--num_iterations", "2")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for config, out in (("cpu-2proc.yaml", ddp), ("fsdp2-cpu-2proc.yaml", fsdp)):
        res = _launch(tiny, config, out, *common)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = _rows(ddp), _rows(fsdp)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert a[0]["reward/mean"] == b[0]["reward/mean"]  # step 1 samples the same weights
    for ra, rb in zip(a, b):
        assert ra["loss/policy"] != 0.0 or rb["step"] > 1  # something trains: the comparison is not vacuous
        for key in ("loss/policy", "reward/mean", "grad_norm", "entropy", "mismatch/logp_abs_max"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), (rb["step"], key)

    for run in (ddp, fsdp):  # trainer state is data only, for every backend that runs here
        files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()]
        assert {p.suffix for p in files} == {".json", ".safetensors"}, sorted(p.name for p in files)
    step3 = fsdp / "checkpoints" / "step-3"
    assert {p.name for p in step3.glob("*-rank*.safetensors")} == {
        "model-rank0-of-2.safetensors", "model-rank1-of-2.safetensors",
        "optimizer-rank0-of-2.safetensors", "optimizer-rank1-of-2.safetensors"}
    assert not (step3 / "model.safetensors").exists()  # no process wrote (or held) the full state
    weights = load_checkpoint_weights(step3)  # the shards, consolidated
    final = AutoModelForCausalLM.from_pretrained(fsdp / "final", trust_remote_code=True)
    final_state = final.state_dict()
    assert set(weights) == set(final_state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, final_state[name]), name
    ddp_final = load_checkpoint_weights(ddp / "checkpoints" / "step-3")
    assert max(float((weights[k] - ddp_final[k]).abs().max()) for k in weights) < 1e-4

    # --resume from the step-2 sharded checkpoint reproduces step 3 exactly
    import shutil

    shutil.rmtree(step3)
    res = _launch(tiny, "fsdp2-cpu-2proc.yaml", fsdp, *common, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_metrics(b, _rows(fsdp))
    assert all(torch.equal(t, load_checkpoint_weights(step3)[k]) for k, t in weights.items())

    # one process cannot continue a 2-process sharded checkpoint: refused in one line, nothing written
    res = subprocess.run([sys.executable, "-m", "rl", "train", *_args(tiny, fsdp, *common, "--max_steps", "4",
                                                                    "--resume")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{tiny}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "resume with the same number of processes" in res.stderr
    assert [r["step"] for r in _rows(fsdp)] == [1, 2, 3]


def test_lone_cpu_launch_is_detected():
    """`accelerate launch --cpu --num_processes 2` (no mpirun) starts one process with MASTER_ADDR but no
    rank variables: the trainer warns instead of silently training as one process."""
    from rl.train import lone_cpu_launch

    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert lone_cpu_launch(simple)
    assert not lone_cpu_launch({**simple, "WORLD_SIZE": "2", "RANK": "0"})  # torchrun / cpu-2proc.yaml
    assert not lone_cpu_launch({"ACCELERATE_USE_CPU": "True"})  # --cpu with one process: nothing asked
    assert not lone_cpu_launch({})


def test_policy_exits_last_exit_path_matches_the_plain_trainer(tiny, tmp_path):
    """`policy_exits [T]` runs the exit-weighted path (per-exit old log-probs from the scoring pass, w_T = 1)
    and must log the same metrics as the default `last`, off-policy too (2 iterations x 2 mini-batches)."""
    common = ["--max_steps", "2", "--num_iterations", "2", "--mini_batch_size", "4", "--loss_type", "dapo"]
    plain, exits = tmp_path / "plain", tmp_path / "exits"
    assert _train(_args(tiny, plain, *common)) == 0
    assert _train(_args(tiny, exits, *common, "--policy_exits", "3")) == 0
    rows = _rows(exits)
    assert all(r["policy/w_t3"] == pytest.approx(1.0) and r["policy/logp_t3"] < 0 for r in rows)
    assert rows[0]["clip/frac"] > 0 or rows[1]["clip/frac"] > 0  # off-policy: the clip is exercised
    stripped = [{k: v for k, v in r.items() if not k.startswith("policy/")} for r in rows]
    _assert_same_metrics(_rows(plain), stripped)


def test_kill9_then_resume_restores_learned_exit_weights(tiny, tmp_path):
    """Learned exit weights live in the checkpoint: a killed run resumed with --resume logs the same
    policy/w_t{t} (and every other metric) as an uninterrupted one."""
    common = ["--max_steps", "8", "--save_every", "1", "--policy_exits", "all", "--policy_exit_weights", "learned",
              "--num_iterations", "2", "--loss_type", "cispo", "--lr", "5e-2"]
    ref = tmp_path / "ref"
    assert _train(_args(tiny, ref, *common)) == 0
    last = _rows(ref)[-1]
    assert abs(last["policy/w_t1"] - 1 / 3) > 1e-4, "the learned weights never moved: the test would be vacuous"
    saved = json.loads((ref / "final" / "policy_exit_weights.json").read_text())
    assert saved["exits"] == [1, 2, 3] and sum(saved["weights"]) == pytest.approx(1.0)

    out = tmp_path / "killed"
    _kill9_after_step2_checkpoint(tiny, out, common)
    assert _train(_args(tiny, out, *common, "--resume")) == 0
    _assert_same_metrics(_rows(ref), _rows(out))


def test_gate_loss_moves_the_gate(tiny, tmp_path):
    """gate_loss_coef > 0: the exit gate's parameters change during RL (they get no gradient otherwise)."""
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny / "model").model.early_exit_gate
    runs = {}
    for name, extra in (("off", []), ("on", ["--gate_loss_coef", "1.0"]),
                        ("fast", ["--gate_loss_coef", "1.0", "--gate_lr", "1e-1"])):
        assert _train(_args(tiny, tmp_path / name, "--max_steps", "2", *extra)) == 0
        runs[name] = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").model.early_exit_gate
    assert torch.equal(runs["off"].weight, initial.weight)
    assert not torch.equal(runs["on"].weight, initial.weight)
    moved = {k: float((runs[k].weight - initial.weight).detach().abs().max()) for k in ("on", "fast")}
    assert moved["fast"] > 3 * moved["on"]  # gate_lr: the gate's own rate (Adam steps ~ lr)
    assert "loss/gate" in _rows(tmp_path / "on")[0]


def test_self_distill_warmup_ramps_the_coefficient(tiny, tmp_path):
    """self_distill_warmup_steps N: the coefficient in force at step s is coef * min(1, s / N), logged as
    self_distill/coef, and it is the one the update uses: one step of a ramp (coef 0.8, N = 2) moves the
    weights exactly as one step at a flat 0.4, and not as one at 0.8."""
    from safetensors.torch import load_file

    assert _train(_args(tiny, tmp_path / "ramp", "--max_steps", "4", "--self_distill_coef", "0.8",
                        "--self_distill_warmup_steps", "2")) == 0
    assert [r["self_distill/coef"] for r in _rows(tmp_path / "ramp")] == pytest.approx([0.4, 0.8, 0.8, 0.8])
    weights = {}
    for name, extra in (("ramp1", ["0.8", "--self_distill_warmup_steps", "2"]), ("half", ["0.4"]),
                        ("full", ["0.8"])):
        assert _train(_args(tiny, tmp_path / name, "--max_steps", "1", "--self_distill_coef", *extra)) == 0
        weights[name] = load_file(tmp_path / name / "final" / "model.safetensors")
    assert all(torch.equal(weights["ramp1"][k], weights["half"][k]) for k in weights["half"])
    assert not all(torch.equal(weights["ramp1"][k], weights["full"][k]) for k in weights["full"])
