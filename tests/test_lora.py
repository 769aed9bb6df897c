"""LoRA (peft) training of looped models: keys, exact rollouts, base-as-reference KL, checkpoints, final/."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from test_trainer import REPO, _args, _kill9_resume_matches_uninterrupted, _rows, _train, tiny  # noqa: F401

peft = pytest.importorskip("peft")

EMBEDDED = REPO / "rl" / "assets" / "tiny-ouro"


def _lora_model(path, rank=4, seed=1, targets=None):
    """A looped model from `path` with a LoRA adapter whose B is random (a fresh adapter is exactly zero,
    which would hide an adapter-blind code path)."""
    from transformers import AutoModelForCausalLM

    import looped  # noqa: F401
    from rl.config import TrainConfig
    from rl.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = TrainConfig(lora_rank=rank, lora_target_modules=targets)
    torch.manual_seed(seed)  # peft draws A from the global generator: unseeded, the tests' tolerances were luck
    adapted = apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, adapted


def test_lora_keys_are_validated_in_one_line(tiny, tmp_path, capsys):  # noqa: F811
    assert _train(_args(tiny, tmp_path / "a", "--lora_dropout", "0.1")) == 2
    assert "config key 'lora_dropout': set while lora_rank is 0" in capsys.readouterr().err
    assert _train(_args(tiny, tmp_path / "b", "--lora_rank", "-1")) == 2
    assert "'lora_rank'" in capsys.readouterr().err
    assert _train(_args(tiny, tmp_path / "c", "--lora_rank", "4", "--lora_dropout", "1.0")) == 2
    assert "'lora_dropout'" in capsys.readouterr().err
    # a target that names no module: one line on stderr, exit 2, nothing trained
    proc = subprocess.run([sys.executable, "-m", "rl", "train", *_args(tiny, tmp_path / "d", "--lora_rank", "4",
                                                                       "--lora_target_modules", "qq_proj")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("looprl train:")]
    assert len(lines) == 1 and "config key 'lora_target_modules'" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / "final").exists()


def test_default_targets_are_the_shared_block_linears():
    from rl.lora import trainable_summary

    model, _ = _lora_model(EMBEDDED)
    wrapped = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert {n.split(".")[-1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    assert all(".layers." in n for n in wrapped)  # not the exit gate, not lm_head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert trainable_summary(model).startswith(f"trainable {sum(p.numel() for p in model.parameters() if p.requires_grad):,} of")


def test_fused_decode_samples_the_adapted_model():
    """The fused decode step includes the adapter's delta: same tokens and logprobs as the model's own
    forward and as a merged plain copy (an adapter-blind step would differ)."""
    from rollout import SamplingParams
    from rollout.torch_worker import TorchRolloutWorker

    model, adapted = _lora_model(EMBEDDED)
    merged = copy.deepcopy(adapted).merge_and_unload()
    prompts = [[1, 5, 7, 9], [3, 4]]
    params = SamplingParams(n=3, max_new_tokens=12, temperature=1.0, seed=7)
    fast = TorchRolloutWorker(model, depth=4)
    slow = TorchRolloutWorker(model, depth=4, fast_decode=False)
    plain = TorchRolloutWorker(merged, depth=4)
    runs = [w.generate(prompts, params) for w in (fast, slow, plain)]
    assert fast.uses_fast_decode
    # the model's own forward: same rounding of the adapter term; a merged copy: W + delta rounds otherwise
    for other, tol in zip(runs[1:], (1e-4, 1e-3)):  # fp32 noise of a large random delta (B std 0.2)
        assert other.completion_ids == runs[0].completion_ids
        assert max(abs(x - y) for a, b in zip(runs[0].logprobs, other.logprobs) for x, y in zip(a, b)) <= tol
    with adapted.disable_adapter():  # the adapter matters here: the base gives other logprobs by far
        base = TorchRolloutWorker(model, depth=4, fast_decode=False).generate(prompts, params)
    assert max(abs(x - y) for a, b in zip(runs[0].logprobs, base.logprobs) for x, y in zip(a, b)) > 1e-2


def test_fused_decode_samples_an_adapted_bfloat16_model():
    """dtype bfloat16 + LoRA: peft keeps the adapter in fp32 and casts its sum back to the base's bf16; the
    fused step does the same (it used to hand fp32 queries to a bf16 cache: a RuntimeError at the first
    rollout). Its logprobs are the model's own forward's up to bf16 rounding."""
    from rollout import SamplingParams
    from rollout.torch_worker import TorchRolloutWorker

    model, adapted = _lora_model(EMBEDDED)
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # as peft leaves them on a bf16 base (autocast_adapter_dtype)
    prompts = [[1, 5, 7, 9], [3, 4]]
    params = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=7)
    fast = TorchRolloutWorker(model, depth=4)
    runs = [w.generate(prompts, params) for w in (fast, TorchRolloutWorker(model, depth=4, fast_decode=False))]
    assert fast.uses_fast_decode
    first = [(a[0], b[0]) for a, b in zip(runs[0].logprobs, runs[1].logprobs)]  # the same context: the prompt
    assert max(abs(x - y) for x, y in first) < 0.1


def test_vllm_sync_gets_the_merged_weights_under_the_base_names():
    from rollout.vllm_worker import iter_vllm_weights

    model, adapted = _lora_model(EMBEDDED)
    merged = copy.deepcopy(adapted).merge_and_unload()
    got = {name: t.clone() for name, t in iter_vllm_weights(model)}
    want = {name: t.clone() for name, t in iter_vllm_weights(merged)}
    assert got.keys() == want.keys() and not any("lora" in n or "base_layer" in n for n in got)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_beta_uses_the_base_with_the_adapter_disabled(tiny, tmp_path, monkeypatch):  # noqa: F811
    """LoRA + beta > 0: one model loaded (no reference copy); the KL to the reference is 0 while the
    adapter is still zero (step 1), and grows once it has moved."""
    import rl.policy

    loads = []
    real = rl.policy.load_model
    monkeypatch.setattr(rl.policy, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "kl"
    assert _train(_args(tiny, out, "--max_steps", "3", "--lora_rank", "4", "--beta", "0.1", "--lr", "5e-2")) == 0
    assert len(loads) == 1
    rows = _rows(out)
    assert rows[0]["kl_ref"] == 0.0
    assert rows[-1]["kl_ref"] > 0.0


@pytest.mark.slow
def test_default_job_lora_rank_8_exact_and_portable_final(tmp_path):
    """`looprl train --lora_rank 8` on the embedded job: fp32 rollout/update logprobs agree to 1e-5,
    checkpoints hold the adapter only, final/ is merged and loads without looprl, final/adapter/ loads
    with peft onto the base and gives the same logits."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rl", "train", "--lora_rank", "8", "--lr", "5e-3", "--max_steps", "2",
                           "--prompts_per_step", "4", "--save_every", "1", "--eval_every", "0", "--progress", "false",
                           "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "policy: trainable 20,480 of" in proc.stderr and "lora 20,480" in proc.stderr
    rows = _rows(out)
    assert len(rows) == 2 and all(r["mismatch/logp_abs_max"] <= 1e-5 for r in rows)
    ckpt = out / "checkpoints" / "step-2"
    weights = [p for p in ckpt.iterdir() if p.name.startswith(("model", "pytorch_model"))]
    assert weights
    for path in weights:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        assert state and all(".lora_" in k for k in state), sorted(state)[:5]
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({str(out / 'final')!r}, trust_remote_code=True); "
            "assert not any(k.split('.')[0] in ('looped', 'rl', 'rollout') for k in sys.modules), 'imported looprl'; "
            "print(m(torch.tensor([[1, 2, 3, 4, 5]])).logits.tolist())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    final_logits = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(EMBEDDED)
    with_adapter = PeftModel.from_pretrained(base, out / "final" / "adapter").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        adapted = with_adapter(input_ids=ids).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(input_ids=ids).logits
    assert torch.allclose(adapted, final_logits, atol=1e-4)
    assert not torch.allclose(plain, final_logits, atol=1e-4)  # the adapter moved: the check is not vacuous


def test_self_distill_exit_terms_and_gate_train_with_lora(tiny, tmp_path, capsys):  # noqa: F811
    """Self-distillation, the exit-weighted term and the gate loss run with LoRA; the gate trains fully,
    the base weights stay frozen."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "all"
    assert _train(_args(tiny, out, "--max_steps", "2", "--lora_rank", "4", "--self_distill_coef", "0.5",
                        "--policy_exits", "all", "--gate_loss_coef", "1.0", "--lr", "5e-2")) == 0
    err = capsys.readouterr().err
    assert "policy: trainable" in err and "early_exit_gate" in err and "lora" in err
    for row in _rows(out):
        for key in ("loss/self_distill", "loss/gate", "policy/logp_t1", "loss/policy"):
            assert key in row and row[key] == row[key], key
        assert row["mismatch/logp_abs_max"] <= 1e-4
    initial = AutoModelForCausalLM.from_pretrained(tiny / "model")
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    before, after = dict(initial.named_parameters()), dict(final.named_parameters())
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.early_exit_gate.weight"], after["model.early_exit_gate.weight"])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(before[name], after[name]), name
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


def test_kill9_then_resume_is_exact_with_lora(tiny, tmp_path):  # noqa: F811
    """A LoRA run (adapter + fully trained gate) killed after a checkpoint and resumed logs the same metrics."""
    common = ["--max_steps", "8", "--save_every", "1", "--lora_rank", "4", "--gate_loss_coef", "1.0",
              "--lr", "5e-2", "--loss_type", "grpo"]
    ref, out = _kill9_resume_matches_uninterrupted(tiny, tmp_path, common)
    assert (ref / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


def test_lora_dropout_acts_in_the_gradient_forward_only(tiny, tmp_path):  # noqa: F811
    """lora_dropout > 0 changes the update (the gradient: B is zero at first, so not yet the loss), while the rollout/update logprobs stay exact:
    scoring is dropout-free."""
    rows = {}
    for p in ("0", "0.5"):
        extra = ["--lora_dropout", p] if p != "0" else []
        assert _train(_args(tiny, tmp_path / p, "--max_steps", "2", "--lora_rank", "4", "--lr", "5e-2", *extra)) == 0
        rows[p] = _rows(tmp_path / p)
    assert all(r["mismatch/logp_abs_max"] <= 1e-5 for r in rows["0.5"])
    assert rows["0.5"][0]["grad_norm"] != pytest.approx(rows["0"][0]["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_lora_under_two_ddp_processes_saves_and_resumes(tiny, tmp_path):  # noqa: F811
    """Two CPU processes (DDP): LoRA + beta trains, checkpoints hold the adapter only (DDP's `module.`
    prefix included), --resume loads them, final/ is merged."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{tiny}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", "29537", "-m", "rl", "train"]
    common = ["--save_every", "1", "--lora_rank", "4", "--beta", "0.1"]
    for steps, extra in (("2", []), ("3", ["--resume"])):
        res = subprocess.run([*launch, *_args(tiny, out, "--max_steps", steps, *common, *extra)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["kl_ref"] == 0.0
    assert all(r["mismatch/logp_abs_max"] <= 1e-4 for r in rows)
    state = torch.load(out / "checkpoints" / "step-3" / "pytorch_model.bin", map_location="cpu", weights_only=True) \
        if (out / "checkpoints" / "step-3" / "pytorch_model.bin").exists() else None
    if state is not None:  # the pickle format (another branch moves checkpoints to safetensors)
        assert state and all(".lora_" in k for k in state)
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


def test_lora_dropout_under_activation_checkpointing_has_the_plain_gradients():
    """Checkpointing re-runs each layer's forward in backward: the adapter's dropout must be on there too,
    drawing the forward's masks (it used to be off: a CheckpointError, or with matching tensor counts a
    silently different gradient)."""
    from accelerate import Accelerator
    from test_shared_prompt import _group_rows

    from rl.config import TrainConfig
    from rl.data import EMBEDDED_MODEL
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    grads = []
    for checkpointing in (False, True):
        cfg = TrainConfig(max_new_tokens=12, torch_threads=1, prompts_per_step=3, num_generations=2, lora_rank=4,
                          lora_dropout=0.3, gradient_checkpointing=checkpointing)
        torch.manual_seed(1)  # the same adapter init
        policy = Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=False, self_distill=SelfDistillConfig(),
                        pad_id=0)
        got, step = {}, policy._optimizer_step

        def capture(finite, at, policy=policy, got=got, step=step):
            got.update({n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
            return step(finite, at)

        policy._optimizer_step = capture
        policy.share_prompts = False  # (checkpointing runs without it: the same forward, so the same masks)
        torch.manual_seed(0)  # the same dropout masks
        policy.update(_group_rows(), 0)
        grads.append(got)
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
