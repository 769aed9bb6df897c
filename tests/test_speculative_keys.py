"""`rollout_draft_depth` / `rollout_num_draft` in `looprl train` and `looprl eval`: validation names the
key, the trainer logs the speculative metrics and its depth-matched mismatch stays at plain-rollout level,
and greedy eval with speculative decoding gives the very results of plain decoding."""

from __future__ import annotations

import json

import pytest
from test_eval import tiny_model_dir  # noqa: F401  (fixture)
from test_trainer import _args, _rows, _train, tiny  # noqa: F401  (fixture)

from rl.config import ConfigError, load_config


@pytest.mark.parametrize("argv,message", [
    (["--rollout_draft_depth", "1"], "set both"),
    (["--rollout_num_draft", "3"], "set both"),
    (["--depth", "4", "--rollout_draft_depth", "4", "--rollout_num_draft", "3"], "below the rollout depth"),
    (["--rollout_draft_depth", "-1", "--rollout_num_draft", "3"], "'rollout_draft_depth'"),
    (["--rollout_draft_depth", "1", "--rollout_num_draft", "3", "--engine", "vllm"], "engine torch"),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_defaults_are_off():
    cfg = load_config([])
    assert cfg.rollout_draft_depth == 0 and cfg.rollout_num_draft == 0


def test_trainer_logs_speculative_metrics_and_mismatch_stays_exact(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert _train(_args(tiny, out, "--max_steps", "2", "--rollout_draft_depth", "1", "--rollout_num_draft", "3",
                        "--max_new_tokens", "12")) == 0
    rows = _rows(out)[-2:]
    for r in rows:
        assert 0.0 <= r["rollout/accept_rate"] <= 1.0
        assert r["rollout/tokens_per_verify"] == pytest.approx(1 + 3 * r["rollout/accept_rate"])
        assert r["time/rollout_per_token"] > 0
        # torch engine, CPU fp32: the update scores exactly what the speculative worker emitted
        assert r["mismatch/logp_abs_max"] <= 1e-4 and r["mismatch/kl"] <= 1e-8


def test_eval_greedy_speculative_equals_plain(tiny_model_dir, tmp_path):  # noqa: F811
    from rl.evaluate import main

    reports = []
    for extra in ([], ["--rollout_draft_depth", "2", "--rollout_num_draft", "3"]):
        out = tmp_path / f"eval{len(extra)}.json"
        argv = ["--model", str(tiny_model_dir), "--data", "arith", "--limit", "6", "--depths", "1,4",
                "--max_new_tokens", "10", "--out", str(out), *extra]
        assert main(argv) == 0
        reports.append(json.loads(out.read_text())["depths"])
    plain, spec = reports
    for depth in ("1", "4"):
        for key in ("accuracy", "len_mean", "truncated_frac"):
            assert spec[depth][key] == plain[depth][key], (depth, key)
    assert "rollout/accept_rate" in spec["4"] and "rollout/accept_rate" not in spec["1"]  # depth 1 <= draft depth
