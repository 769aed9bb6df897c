"""A broken or useless model never finishes as a success, and the model's own limits hold (issue 21, classes
5, 9, 10 and their rough edges): fp16 training refused, non-finite weights stop the run before anything of
them is saved, a collapsed run stops, the default depth is the model's T, prompt + completion fit the
model's positions, a missing vLLM / a full disk are one line, checkpoints export and evaluate as models."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import REPO, _args, _rows, _tokenizer, _train, tiny  # noqa: F401  (tiny is a fixture)

from rl.config import ConfigError, TrainConfig, fit_to_positions, load_config

CONSTANT_REWARD = '''
def constant(prompts, completions, **kw):
    """Every completion scores the same: every group has equal rewards, no step can learn."""
    return [0.0] * len(completions)
'''


def _cli(args, cwd, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **popen)


def _line(res: subprocess.CompletedProcess, needle: str) -> str:
    """The one stderr line holding `needle`; no traceback anywhere."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if needle in line]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _no_depth(args):
    i = args.index("--depth")
    return args[:i] + args[i + 2:]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []


# ----------------------------------------------------------------------------- class 5: broken model


def test_float16_training_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    res = _cli(["train", "--dtype", "float16", "--output_dir", str(out)], tmp_path)
    assert res.returncode == 2
    assert "bfloat16" in _line(res, "config key 'dtype': float16 cannot train")
    assert not out.exists()
    assert load_config(["--vllm_dtype", "float16"]).vllm_dtype == "float16"  # rollout weights may be fp16


def test_non_finite_weights_stop_the_run_and_are_never_saved(tiny, tmp_path, capsys):  # noqa: F811
    """Whatever makes an update non-finite (fp16 AdamW, an overflowing lr): exit 1, one line naming the last
    good checkpoint, the step's metrics row logged, no checkpoint and no final/ of the broken weights."""
    from rl.config import load_config
    from rl.train import Trainer

    out = tmp_path / "run"
    trainer = Trainer(load_config(_args(tiny, out, "--max_steps", "4", "--save_every", "1")))
    step = trainer.policy.optimizer.step
    calls = []

    def poisoned_step(*a, **kw):  # the second update leaves a NaN in the weights
        result = step(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(trainer.policy.module.parameters()).view(-1)[0] = math.nan
        return result

    trainer.policy.optimizer.step = poisoned_step
    assert trainer.train() == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "non-finite weights" in line]
    assert "step 2: the update left 1 non-finite weights" in line and str(out / "checkpoints" / "step-1") in line
    assert _checkpoints(out) == ["step-1"] and not (out / "final").exists()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["weights/nonfinite"] == 0 and rows[1]["weights/nonfinite"] == 1


def test_no_final_from_a_checkpoint_with_non_finite_weights(tiny, tmp_path):  # noqa: F811
    """The check before final/: resuming a complete run whose checkpoint holds a NaN writes no final/."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "1")) == 0
    ckpt = out / "checkpoints" / "step-1"
    file = ckpt / "model.safetensors"  # rl/checkpoint.py MODEL_FILE
    state = load_file(file)
    next(iter(state.values())).view(-1)[0] = math.nan
    save_file(state, file)
    final = (out / "final" / "model.safetensors").read_bytes()
    res = _cli(["train", *_args(tiny, out, "--max_steps", "1", "--resume")], tiny)
    assert res.returncode == 1
    assert "no final/ written" in _line(res, "non-finite weights")
    assert (out / "final" / "model.safetensors").read_bytes() == final  # the sound final/ is untouched


def test_a_collapsed_run_stops_after_max_no_update_steps(tiny, tmp_path):  # noqa: F811
    (tiny / "constreward.py").write_text(CONSTANT_REWARD)
    out = tmp_path / "run"
    args = _args(tiny, out, "--max_steps", "6", "--rewards", "constreward:constant", "--max_rounds", "1")
    res = _cli(["train", *args, "--max_no_update_steps", "2"], tiny)
    assert res.returncode == 1
    line = _line(res, "2 steps in a row (to step 2) had equal rewards in every group")
    assert "max_no_update_steps" in line and str(out / "checkpoints" / "step-2") in line
    assert [r["step"] for r in _rows(out)] == [1, 2] and not (out / "final").exists()
    assert _checkpoints(out) == ["step-2"]  # the finished steps are kept
    # 0 = never stop; the default stops after 20 such steps
    out0 = tmp_path / "off"
    assert _train([*_args(tiny, out0, "--max_steps", "3", "--rewards", "constreward:constant", "--max_rounds", "1"),
                   "--max_no_update_steps", "0"]) == 0
    assert (out0 / "final").is_dir()
    assert TrainConfig().max_no_update_steps == 20
    with pytest.raises(ConfigError, match="'max_no_update_steps'"):
        load_config(["--max_no_update_steps", "-1"])


ONE_INFORMATIVE_PROMPT = '''
def first_prompt_varies(prompts, completions, **kw):
    """Only the call's first prompt gets rewards that vary (0, 1, 0, 1 over its completions): every other
    group of the round has equal rewards."""
    return [float(i % 2) if p == prompts[0] else 0.0 for i, p in enumerate(prompts)]
'''


def test_a_batch_cut_to_half_or_less_by_dynamic_sampling_is_warned_once(tiny, tmp_path):  # noqa: F811
    """Dynamic sampling out of rounds with <= half of prompts_per_step groups trains on a much smaller batch
    than asked: one warning per run naming the counts and max_rounds (sampling/groups_kept every step)."""
    (tiny / "oneprompt.py").write_text(ONE_INFORMATIVE_PROMPT)
    out = tmp_path / "run"
    res = _cli(["train", *_args(tiny, out, "--max_steps", "2", "--rewards", "oneprompt:first_prompt_varies",
                                "--max_rounds", "1", "--prompts_per_step", "4", "--max_no_update_steps", "0")], tiny)
    assert res.returncode == 0, res.stderr[-2000:]
    line = _line(res, "dynamic sampling kept")
    assert "of prompts_per_step 4 groups" in line and "max_rounds 1" in line and "warned once" in line
    assert [r["sampling/groups_kept"] for r in _rows(out)] == [1, 1]


# ----------------------------------------------------------------------------- class 9: default depth


def test_default_depth_is_the_models_own_loop_count(tiny, tmp_path):  # noqa: F811
    assert TrainConfig().depth is None and load_config([]).depth is None
    out = tmp_path / "t3"
    res = _cli(["train", *_no_depth(_args(tiny, out, "--max_steps", "1"))], tiny)
    assert res.returncode == 0, res.stderr
    assert "depth 3," in res.stderr  # the T=3 model runs at 3, not at the embedded model's 4
    assert yaml.safe_load((out / "config.yaml").read_text())["depth"] == 3  # config.yaml = what ran


def test_plain_hf_lm_trains_at_depth_1_by_default_and_prompts_fit_its_positions(tiny, tmp_path):  # noqa: F811
    """A GPT-2 (learned positions: a longer sequence would index past its table) with the default
    max_prompt_length 2048 and a 100-token prompt: depth 1, the limit lowered to n_positions -
    max_new_tokens, and the truncation warning says why."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer()
    path = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=48,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"problem": "1+1=? " + "x" * 60 * (i % 2), "answer": "2"}) + "\n"
                            for i in range(8)))
    args = _no_depth(_args(tiny, tmp_path / "run", "--max_steps", "1"))
    args[args.index("--model") + 1] = str(path)
    args[args.index("--data") + 1] = str(data)
    res = _cli(["train", *args], tiny)
    assert res.returncode == 0, res.stderr
    assert "depth 1," in res.stderr
    warning = _line(res, "WARNING: prompt")
    assert "max_prompt_length 43 (max_prompt_length 2048 lowered to 43: the model's max_position_embeddings 48 " \
           "- max_new_tokens 5)" in warning
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["max_prompt_length"] == 43


# ----------------------------------------------------------------------------- class 10: the model's limits


def test_fit_to_positions_rule():
    cfg = TrainConfig(max_new_tokens=16)
    assert fit_to_positions(cfg, 4096) is None and cfg.max_prompt_length == 2048
    assert "lowered to 240" in fit_to_positions(cfg, 256)
    assert cfg.max_prompt_length == 240
    cfg.engine = "vllm"
    assert cfg.engine_options()["max_model_len"] == 256  # the default vLLM context fits the model
    assert fit_to_positions(cfg, None) is None  # a config without positions: nothing to check
    with pytest.raises(ConfigError, match="'max_new_tokens': 256 leaves no room"):
        fit_to_positions(TrainConfig(max_new_tokens=256), 256)
    with pytest.raises(ConfigError, match="'eval_max_new_tokens'"):
        fit_to_positions(TrainConfig(eval_max_new_tokens=300), 256)
    with pytest.raises(ConfigError, match="'vllm_max_model_len': 4096 exceeds the model's max_position_embeddings"):
        fit_to_positions(TrainConfig(vllm_max_model_len=4096), 256)


def test_completion_longer_than_the_models_positions_is_one_line(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = _cli(["train", *_args(tiny, out, "--max_new_tokens", "500")], tiny)  # the tiny model has 128
    assert res.returncode == 2
    assert "max_position_embeddings (128)" in _line(res, "config key 'max_new_tokens': 500 leaves no room")
    assert not (out / "metrics.jsonl").exists()


def test_eval_fits_prompts_to_the_models_positions(tiny, tmp_path):  # noqa: F811
    """`looprl eval` applies the trainer's rule: a prompt longer than the model's positions leave after
    max_new_tokens keeps its last tokens (warned, not silently past the table, not a huge allocation), and
    a max_new_tokens beyond the positions is refused in one line."""
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"problem": "1+1=? " + "x " * 400 * (i % 2) + str(i), "answer": "2"}) + "\n"
                            for i in range(4)))
    common = ["--model", str(tiny / "model"), "--data", str(data), "--depths", "1", "--reward",
              "tinyreward:is_zero", "--no_progress"]
    res = _cli(["eval", *common, "--max_new_tokens", "5", "--out", str(tmp_path / "r.json")], tiny)
    assert res.returncode == 0, res.stderr
    warning = _line(res, "prompt(s) longer than the 123 tokens")  # the tiny model has 128 positions
    assert "max_position_embeddings 128 leaves after max_new_tokens 5" in warning
    assert "keeping the last 123 tokens of each" in warning
    assert json.loads((tmp_path / "r.json").read_text())["depths"]["1"]["len_mean"] > 0
    res = _cli(["eval", *common, "--out", str(tmp_path / "d.json")], tiny)  # the default 256 fits the model
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "d.json").read_text())["max_new_tokens"] == 64  # half: the prompts are longer
    assert "keeping the last 64 tokens of each" in _line(res, "prompt(s) longer than the 64 tokens")
    res = _cli(["eval", *common, "--max_new_tokens", "128"], tiny)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--max_new_tokens 128 leaves no room for a prompt within the model's max_position_embeddings (128)" \
        in _line(res, "looprl eval:")


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_without_vllm_is_one_line(tmp_path, capsys):
    from rl.evaluate import main as eval_main

    res = _cli(["train", "--engine", "vllm", "--output_dir", str(tmp_path / "run")], tmp_path)
    assert res.returncode == 2
    assert "pip install 'looprl[vllm]'" in _line(res, "config key 'engine': rollout engine 'vllm' needs vllm")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert eval_main(["--engine", "vllm", "--data", "arith", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs vllm" in err and "pip install" in err


# ----------------------------------------------------------------------------- disk full


def test_torch_short_write_is_one_plain_line_naming_the_file(tmp_path):
    from rl.run_dir import one_line

    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    line = one_line(err, tmp_path, tmp_path / "checkpoints" / "step-1" / "optimizer.bin")
    assert line.startswith(f"could not finish writing {tmp_path}/checkpoints/step-1/optimizer.bin: the disk is "
                           "full or a file-size limit was hit")
    assert "enforce" not in line
    assert one_line(OSError(27, "File too large")) == "file too large (a file-size limit) writing a file"


def test_a_file_size_limit_while_checkpointing_is_one_line(tiny, tmp_path):  # noqa: F811
    """torch.save (or safetensors) hitting RLIMIT_FSIZE, what a full disk looks like to them: exit 1, one line
    naming the checkpoint file, no half checkpoint."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "run"
    res = _cli(["train", *_args(tiny, out, "--max_steps", "2", "--save_every", "1")], tiny, preexec_fn=limit)
    assert res.returncode == 1
    line = _line(res, "cannot write checkpoint")
    assert f"{out}/checkpoints/step-1/" in line and "file-size limit" in line and "enforce fail" not in line
    assert _checkpoints(out) == [] and not list((out / "checkpoints").glob(".tmp-*"))
    assert [r["step"] for r in _rows(out)] == [1]


# ----------------------------------------------------------------------------- checkpoints as models


@pytest.fixture(scope="module")
def run_with_checkpoints(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert _train(_args(tiny, out, "--max_steps", "2", "--save_every", "1")) == 0
    return out


def test_export_a_checkpoint_as_a_portable_model(tiny, run_with_checkpoints, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file

    from rl.export import main as export_main
    from rl.model_io import checkpoint_weights

    run = run_with_checkpoints
    res = _cli(["export", "--checkpoint", str(run / "checkpoints" / "step-2"), "--out", str(tmp_path / "m2")], tiny)
    assert res.returncode == 0, res.stderr
    assert export_main(["--checkpoint", str(run / "checkpoints" / "step-1"), "--out", str(tmp_path / "m1")]) == 0
    exported = load_file(tmp_path / "m1" / "model.safetensors")
    saved = checkpoint_weights(run / "checkpoints" / "step-1", "test")
    assert exported.keys() <= saved.keys() and all(torch.equal(exported[k], saved[k]) for k in exported)
    # the last checkpoint exports to what final/ holds, with final/'s model code
    final = load_file(run / "final" / "model.safetensors")
    last = load_file(tmp_path / "m2" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert (tmp_path / "m2" / "modeling_ouro.py").is_file() and (tmp_path / "m2" / "tokenizer.json").is_file()
    assert not all(torch.equal(exported[k], last[k]) for k in last)  # step 1 is another model
    # refused in one line: an existing --out, a directory that is no checkpoint
    capsys.readouterr()
    assert export_main(["--checkpoint", str(run / "checkpoints" / "step-1"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; add --overwrite" in err
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a training checkpoint" in err and not (tmp_path / "m3").exists()


def test_eval_a_checkpoint_directory(tiny, run_with_checkpoints, tmp_path):  # noqa: F811
    from rl.evaluate import main as eval_main

    run = run_with_checkpoints
    results = {}
    for name, model in (("ckpt", run / "checkpoints" / "step-2"), ("final", run / "final")):
        args = ["--model", str(model), "--data", "arith", "--limit", "6", "--depths", "1,3", "--max_new_tokens",
                "5", "--reward", "tinyreward:is_zero", "--no_progress", "--out", str(tmp_path / f"{name}.json")]
        if name == "ckpt":  # as a user runs it
            res = _cli(["eval", *args], tiny)
            assert res.returncode == 0, res.stderr
        else:
            assert eval_main(args) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["depths"]
    for depth in ("1", "3"):  # the checkpoint's weights, not the run's base model's
        for key in ("accuracy", "len_mean", "truncated_frac"):
            assert results["ckpt"][depth][key] == results["final"][depth][key]


def test_checkpoint_model_has_the_checkpoints_weights_and_eval_uses_the_thread_rule(tiny,  # noqa: F811
                                                                                     run_with_checkpoints):
    from rl.evaluate import _load_model
    from rl.model_io import checkpoint_weights, load_model

    ckpt = run_with_checkpoints / "checkpoints" / "step-1"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model = _load_model(str(ckpt), "cpu")
        assert torch.get_num_threads() == 1  # a tiny model on CPU: one thread, as in the trainer
    finally:
        torch.set_num_threads(threads)
    saved = checkpoint_weights(ckpt, "test")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    base = load_model(str(tiny / "model"), "test").state_dict()
    assert not all(torch.equal(base[k], v) for k, v in saved.items())


def test_count_nonfinite_counts_inf_and_nan_and_not_an_overflowing_sum():
    """The per-step weight check sums each tensor first (finite sum: no inf/NaN in it) and counts exactly only
    when a sum is not finite: a real inf/NaN, or finite values whose sum overflows (counted 0)."""
    from rl.model_io import count_nonfinite

    tensors = [torch.randn(50, 30) for _ in range(4)] + [torch.randn(5), torch.tensor([1, 2])]
    assert count_nonfinite(tensors) == 0
    tensors[1][5, 7], tensors[4][1], tensors[0][0, 0] = math.inf, math.nan, -math.inf
    assert count_nonfinite(tensors) == 3
    assert count_nonfinite([torch.full((10,), 3e38)]) == 0 and count_nonfinite([]) == 0
