"""Rollout correction (tis_mode): each mode's weights and masks against hand-computed ratios, the loss's
normaliser under the mask modes, the raw-ratio metrics (is/*), the config refusals a user meets, and a
2-step run of every mode."""

import json
import math
import subprocess
import sys

import pytest
import torch

from rl.config import TIS_MODES, TrainConfig
from rl.data import EMBEDDED_MODEL
from rl.rollout_correction import RawRatios, raw_ratio_metrics, rollout_correction

CAP, FLOOR = 2.0, 0.4
# raw ratios rho = pi_old / pi_rollout per token (0 = padding); rollout log-probs are 0, old = log(rho)
RATIOS = [[0.5, 3.0, 1.5],   # product 2.25 (> cap), geometric mean 1.310 (in band)
          [1.2, 1.1, 0.0],   # product 1.32, geometric mean 1.149: in band everywhere
          [0.3, 0.9, 1.0],   # product 0.27 (< floor), geometric mean 0.646 (in band)
          [3.0, 2.5, 0.0]]   # product 7.5, geometric mean 2.739: out of band everywhere
MASK = torch.tensor([[1.0 if r > 0 else 0.0 for r in row] for row in RATIOS])
OLD = torch.tensor([[math.log(r) if r > 0 else 0.0 for r in row] for row in RATIOS])
ROLLOUT = torch.zeros_like(OLD)
# mode: (weights, keep) per token, written out by hand (padding: weight and keep 0)
EXPECTED = {
    "token": ([[0.5, 2.0, 1.5], [1.2, 1.1, None], [0.3, 0.9, 1.0], [2.0, 2.0, None]],
              [[1, 1, 1], [1, 1, None], [1, 1, 1], [1, 1, None]]),
    "token_mask": ([[0.5, 0.0, 1.5], [1.2, 1.1, 0], [0.0, 0.9, 1.0], [0.0, 0.0, 0]],
                   [[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]]),
    "sequence": ([[2.0, 2.0, 2.0], [1.32, 1.32, 0], [0.27, 0.27, 0.27], [2.0, 2.0, 0]],
                 [[1, 1, 1], [1, 1, None], [1, 1, 1], [1, 1, None]]),
    "sequence_mask": ([[0.0, 0.0, 0.0], [1.32, 1.32, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0]],
                      [[0, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]]),
    "geometric_mask": ([[1.0, 1.0, 1.0], [1.0, 1.0, 0], [1.0, 1.0, 1.0], [0.0, 0.0, 0]],
                       [[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]]),
}


def _check(got: torch.Tensor, want: list[list]) -> None:
    for i, row in enumerate(want):
        for j, value in enumerate(row):
            if value is not None:  # None: a padding position the loss never reads
                assert got[i, j].item() == pytest.approx(value, rel=1e-5, abs=1e-6), (i, j, got[i, j].item(), value)


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_mode_weights_and_keep_mask_match_hand_computed_values(mode):
    out = rollout_correction(mode, OLD, ROLLOUT, MASK, CAP, FLOOR if mode.endswith("mask") else 0.0)
    weights, keep = EXPECTED[mode]
    _check(out.weights, weights)
    _check(out.keep, keep)
    assert not out.weights.requires_grad


def test_token_mode_is_todays_truncated_weight_bit_for_bit():
    from rl.losses import truncated_is_weights

    old, rollout = torch.randn(3, 5), torch.randn(3, 5)
    out = rollout_correction("token", old, rollout, torch.ones(3, 5), 2.0)
    assert torch.equal(out.weights, truncated_is_weights(old, rollout, 2.0))


def test_floor_zero_bounds_only_from_above_and_inf_cap_bounds_nothing():
    out = rollout_correction("token_mask", OLD, ROLLOUT, MASK, CAP, 0.0)
    _check(out.keep, [[1, 0, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]])  # 0.3 kept without a floor
    out = rollout_correction("sequence_mask", OLD, ROLLOUT, MASK, math.inf, FLOOR)
    _check(out.keep, [[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 0]])
    _check(out.weights, [[2.25] * 3, [1.32, 1.32, 0], [0.0] * 3, [7.5, 7.5, 0]])


def test_long_sequences_stay_finite_in_log_space():
    """200 tokens of ratio e^5: the product e^1000 overflows fp32 and fp64; the weights must not."""
    old, rollout, mask = torch.full((1, 200), 5.0), torch.zeros(1, 200), torch.ones(1, 200)
    seq = rollout_correction("sequence", old, rollout, mask, CAP)
    assert torch.equal(seq.weights, torch.full((1, 200), CAP))
    for mode in ("sequence_mask", "geometric_mask", "token_mask"):
        out = rollout_correction(mode, old, rollout, mask, CAP, FLOOR)
        assert torch.isfinite(out.weights).all() and out.keep.sum() == 0, mode
    tiny = rollout_correction("sequence", -old, rollout, mask, CAP)  # e^-1000 underflows to 0, not NaN
    assert torch.equal(tiny.weights, torch.zeros(1, 200))


def test_raw_ratio_metrics_are_taken_before_truncation_and_masking():
    keep = rollout_correction("token_mask", OLD, ROLLOUT, MASK, CAP, FLOOR).keep
    raw = RawRatios()
    raw.add(OLD, ROLLOUT, MASK, keep)
    got = raw_ratio_metrics(raw.ratio_sum, raw.tokens, raw.log_max, raw.log_min, raw.masked)
    real = [r for row in RATIOS for r in row if r > 0]
    assert got["is/raw_mean"] == pytest.approx(sum(real) / len(real))  # 14.0 / 10: the raw 3.0 counts as 3.0
    assert got["is/raw_max"] == pytest.approx(3.0) and got["is/raw_min"] == pytest.approx(0.3)
    assert got["is/masked_frac"] == pytest.approx(4 / 10)  # 3.0, 0.3, 3.0 and 2.5 leave the band
    none = RawRatios()
    none.add(OLD, ROLLOUT, MASK)
    assert raw_ratio_metrics(none.ratio_sum, none.tokens, none.log_max, none.log_min, none.masked)[
        "is/masked_frac"] == 0.0
    huge = RawRatios()
    huge.add(torch.full((1, 2), 800.0), torch.zeros(1, 2), torch.ones(1, 2))
    assert raw_ratio_metrics(huge.ratio_sum, huge.tokens, huge.log_max, huge.log_min, 0.0)["is/raw_max"] == math.inf


# ---------------------------------------------------------------- the update: normaliser under masks

def _policy(**keys):
    from accelerate import Accelerator

    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    cfg = TrainConfig(model=EMBEDDED_MODEL, depth=4, prompts_per_step=1, num_generations=4, lr=1e-9,
                      max_new_tokens=8, **keys)
    return Policy(cfg, Accelerator(cpu=True), EMBEDDED_MODEL, use_tis=True, self_distill=SelfDistillConfig(), pad_id=0)


def _rows(policy, log_ratios: list[list[float]], advantages: list[float]):
    """Samples whose rollout log-probs sit `log_ratios` below the policy's own: the raw ratios are exp(those)."""
    from rl.batch import Sample

    rows = [Sample(prompt_index=0, prompt_ids=[5, 6, 7], completion_ids=[10 + j for j in range(len(lr))],
                   rollout_logprobs=[0.0] * len(lr), truncated=False, reward=0.0, fn_rewards={}, correct=None,
                   text="", advantage=a) for lr, a in zip(log_ratios, advantages)]
    with torch.no_grad():
        old, _, _ = policy.logprobs(policy._collate(rows))
    for i, (row, lr) in enumerate(zip(rows, log_ratios)):
        row.rollout_logprobs = [float(old[i, j]) - lr[j] for j in range(len(lr))]
    return rows


LN = math.log
LOG_RATIOS = [[0.0, LN(3.0), LN(1.5)], [LN(1.2), LN(1.1)], [LN(0.3), LN(0.9), 0.0, 0.0], [LN(3.0), LN(2.5)]]
ADVANTAGES = [1.0, -2.0, 0.5, 3.0]


def test_token_mask_normaliser_counts_only_kept_tokens():
    """dapo: loss = sum over KEPT tokens of -A * rho / (number of kept tokens); rejected tokens neither
    train nor dilute the rest (today's normaliser, all 11 tokens, would give 11/7 times less)."""
    policy = _policy(tis_mode="token_mask", tis_cap=CAP, tis_floor=FLOOR, loss_type="dapo")
    metrics = policy.update(_rows(policy, LOG_RATIOS, ADVANTAGES), 0)
    kept = [(a, math.exp(r)) for lr, a in zip(LOG_RATIOS, ADVANTAGES) for r in lr if FLOOR <= math.exp(r) <= CAP]
    assert len(kept) == 7
    assert metrics["loss/policy"] == pytest.approx(sum(-a * rho for a, rho in kept) / len(kept), rel=1e-4)
    assert metrics["is/masked_frac"] == pytest.approx(4 / 11)
    assert metrics["tis/weight_mean"] == pytest.approx(sum(rho for _, rho in kept) / 7, rel=1e-4)
    raw = [math.exp(r) for lr in LOG_RATIOS for r in lr]
    assert metrics["is/raw_mean"] == pytest.approx(sum(raw) / 11, rel=1e-4)
    assert metrics["is/raw_max"] == pytest.approx(3.0, rel=1e-4)
    assert metrics["is/raw_min"] == pytest.approx(0.3, rel=1e-4)


def test_sequence_mask_grpo_normaliser_counts_only_kept_sequences():
    """grpo: mean over each kept sequence's tokens, then / kept sequences (a rejected sequence is not a 0)."""
    policy = _policy(tis_mode="sequence_mask", tis_cap=CAP, tis_floor=FLOOR, loss_type="grpo")
    metrics = policy.update(_rows(policy, LOG_RATIOS, ADVANTAGES), 0)
    products = [math.exp(sum(lr)) for lr in LOG_RATIOS]  # 4.5, 1.32, 0.27, 7.5: only row 1 is in band
    kept = [(a, p) for a, p in zip(ADVANTAGES, products) if FLOOR <= p <= CAP]
    assert len(kept) == 1
    assert metrics["loss/policy"] == pytest.approx(sum(-a * p for a, p in kept) / len(kept), rel=1e-4)
    assert metrics["is/masked_frac"] == pytest.approx(9 / 11)


def test_truncation_modes_keep_the_normaliser_and_weight_every_token():
    policy = _policy(tis_mode="sequence", tis_cap=CAP, loss_type="dapo")
    metrics = policy.update(_rows(policy, LOG_RATIOS, ADVANTAGES), 0)
    terms = [-a * min(math.exp(sum(lr)), CAP) for lr, a in zip(LOG_RATIOS, ADVANTAGES) for _ in lr]
    assert metrics["loss/policy"] == pytest.approx(sum(terms) / 11, rel=1e-4)
    assert metrics["is/masked_frac"] == 0.0


# ---------------------------------------------------------------- what a user meets

@pytest.mark.parametrize("args, key", [
    (["--tis_mode", "bogus"], "tis_mode"),
    (["--tis_floor", "0.5"], "tis_floor"),  # auto / token: truncation reads no floor
    (["--tis_mode", "sequence", "--tis_floor", "0.5"], "tis_floor"),
    (["--tis_mode", "token_mask", "--tis_floor", "2.0"], "tis_floor"),  # floor must be < tis_cap (2.0)
    (["--tis_mode", "geometric_mask", "--tis_floor", "-0.1"], "tis_floor"),
])
def test_bad_rollout_correction_keys_exit_2_with_one_line(tmp_path, args, key):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "rl", "train", *args, "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], res.stderr
    assert not out.exists()


def test_a_tis_cap_that_nothing_reads_is_refused_in_one_line():
    """tis_cap is read only where TIS is on: a cap given with TIS off (tis_mode off, or auto on the exact torch
    engine without max_staleness) would silently do nothing, as tis_floor outside the mask modes would."""
    from rl.config import ConfigError, load_config

    for argv, why in ((["--tis_cap", "5"], "tis_mode auto turns TIS on only"),
                      (["--tis_cap", "5", "--tis_mode", "off"], "tis_mode is off"),
                      (["--tis_cap", "5", "--max_staleness", "1"], "off_policy_ratio behaviour")):
        with pytest.raises(ConfigError) as e:
            load_config(argv)
        assert str(e.value).startswith("config key 'tis_cap': 5 would be ignored") and why in str(e.value)
        assert "\n" not in str(e.value)
    for argv in (["--tis_cap", "5", "--tis_mode", "token"],
                 ["--tis_cap", "5", "--max_staleness", "1", "--off_policy_ratio", "proximal"],
                 ["--tis_cap", "2"]):  # on, on through auto, or the default value
        assert load_config(argv).tis_cap == float(argv[1])


def test_trl_names_of_the_correction_keys():
    """TRL's upper bound is tis_cap under its own name; its mode and lower bound have no 1:1 mapping and
    are refused with what to set instead."""
    from rl.config import ConfigError, load_config

    assert load_config(["--vllm_importance_sampling_clip_max", "3.0", "--tis_mode", "token"]).tis_cap == 3.0
    for key, value in (("vllm_importance_sampling_mode", "token_truncate"),
                       ("vllm_importance_sampling_clip_min", "0.5")):
        with pytest.raises(ConfigError, match=f"{key}.*tis_(mode|floor)"):
            load_config([f"--{key}", value])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [m for m in TIS_MODES if m not in ("auto", "off")])
def test_two_step_run_of_each_mode_logs_is_metrics(tmp_path, mode):
    from rl.train import main

    out = tmp_path / "run"
    # a band of +-1e-7 around 1: the torch engine's ratios (~1 +- 1e-6) fall outside it, so masks engage
    band = ["--tis_cap", "1.0000001", "--tis_floor", "0.9999999"] if mode.endswith("mask") else []
    assert main(["--max_steps", "2", "--eval_every", "0", "--progress", "false", "--tis_mode", mode, *band,
                 "--output_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["is/raw_min"] <= row["is/raw_mean"] <= row["is/raw_max"]
        assert abs(row["is/raw_mean"] - 1.0) < 1e-3  # the torch engine's ratios are 1 up to float noise
        assert "tis/weight_mean" in row
        if mode.endswith("mask"):
            assert 0.0 < row["is/masked_frac"] <= 1.0
        else:
            assert row["is/masked_frac"] == 0.0
