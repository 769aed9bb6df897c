"""Config loading: YAML + --key value overrides, validation errors that name the key, checkpoint picking."""

import pytest
import yaml

from rl.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints
from rl.config import ConfigError, TrainConfig, load_config, save_config, validate


def test_defaults_are_valid_and_embedded_dapo():
    cfg = load_config([])
    assert cfg.model == "embedded" and cfg.data == "arith"
    assert cfg.loss_type == "dapo" and cfg.dynamic_sampling and (cfg.eps_low, cfg.eps_high) == (0.2, 0.28)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 8\nlr: 1.0e-5\nrewards: [dapo_math, format]\nreward_weights: [1, 0.5]\n"
                    "reward_kwargs: {format: {style: boxed}}\n")
    cfg = load_config(["--config", str(path), "--max_steps", "3", "--seed", "7", "--loss_type=grpo",
                       "--dynamic_sampling", "false", "--mask_truncated", "--eval_depths", "1,2,4"])
    assert cfg.max_steps == 3 and cfg.lr == 1e-5 and cfg.seed == 7 and cfg.loss_type == "grpo"
    assert cfg.rewards == ["dapo_math", "format"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.reward_kwargs == {"format": {"style": "boxed"}}
    assert cfg.dynamic_sampling is False and cfg.mask_truncated is True and cfg.eval_depths == [1, 2, 4]


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["--depth", "2", "--self_distill_exits", "1"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg and yaml.safe_load((tmp_path / "config.yaml").read_text())["depth"] == 2


@pytest.mark.parametrize("argv,key", [
    (["--max_stepz", "3"], "max_stepz"),  # unknown key (with a suggestion)
    (["--lr", "fast"], "'lr'"),  # wrong type
    (["--max_steps", "2.5"], "'max_steps'"),
    (["--dynamic_sampling", "maybe"], "'dynamic_sampling'"),
    (["--depth", "0"], "'depth'"),  # out of range
    (["--depth", "4", "--update_depth", "2"], "'update_depth'"),  # differs from depth without the experiment flag
    (["--mini_batch_size", "24"], "'mini_batch_size'"),  # 24 does not divide 16 * 8
    (["--mini_batch_size", "4"], "'mini_batch_size'"),  # not a multiple of num_generations
    (["--loss_type", "ppo"], "'loss_type'"),
    (["--scale_rewards", "all"], "'scale_rewards'"),
    (["--reward_weights", "1,2"], "'reward_weights'"),  # 2 weights for 1 reward
    (["--overlong_buffer_len", "16"], "'overlong_buffer_len'"),  # must be < max_new_tokens
    (["--eval_every", "5", "--eval_data", "none"], "'eval_data'"),
    (["--eval_depths", "0,2"], "'eval_depths'"),
    (["--top_p", "0"], "'top_p'"),
    # exits are checked against the depth: before the model is read only when depth is given (default: its T)
    (["--depth", "4", "--self_distill_coef", "0.1", "--self_distill_exits", "4"], "self_distill_exits"),
    (["--depth", "4", "--policy_exits", "5"], "policy_exits"),  # 4 loops have 4 exits
    (["--policy_exits", "first"], "policy_exits"),
    (["--policy_exit_weights", "softmax"], "policy_exit_weights"),
    (["--gate_loss_coef", "-1"], "gate_loss_coef"),
    (["--micro_batch_tokens", "-1"], "'micro_batch_tokens'"),
    (["--ignore_eos", "maybe"], "'ignore_eos'"),
])

def test_errors_name_the_key(argv, key):
    with pytest.raises(ConfigError, match=key):
        load_config(argv)


def test_policy_exits_spellings():
    assert load_config([]).policy_exits == "last"
    assert load_config(["--policy_exits", "[1,2,4]"]).policy_exits == [1, 2, 4]
    assert load_config(["--policy_exits", "1,2,4"]).policy_exits == [1, 2, 4]
    assert load_config(["--policy_exits", "all", "--policy_exit_weights", "gate"]).policy_exits == "all"


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 3\nlearning_rat: 0.1\n")  # (learning_rate is TRL's name for lr: accepted)
    with pytest.raises(ConfigError, match=r"'learning_rat' in .*bad.yaml"):
        load_config(["--config", str(path)])


def test_depth_mismatch_needs_flag_and_model_bounds():
    assert load_config(["--update_depth", "2", "--allow_depth_mismatch"]).effective_update_depth == 2
    with pytest.raises(ConfigError, match="out of range .*1..3"):
        validate(TrainConfig(depth=4), max_depth=3)
    with pytest.raises(ConfigError, match="'prompts_per_step'.*3 processes"):
        validate(TrainConfig(prompts_per_step=16, num_generations=6, mini_batch_size=0), num_processes=3)


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-2", True), ("step-10", True), ("step-12", False), (".tmp-step-14", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10]  # numeric order, not lexical
    assert latest_checkpoint(tmp_path).name == "step-10"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_configs_default_yaml_mirrors_the_embedded_default():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert load_config(["--config", str(path)]) == TrainConfig()
    assert set(yaml.safe_load(path.read_text())) == set(TrainConfig().to_dict())


def test_every_key_has_help_text_shown_by_train_help(capsys):
    import dataclasses

    from rl.config import help_text
    from rl.train import main

    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert shown == help_text() + "\n"
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"config key {f.name!r} has no help text"
        assert f"--{f.name} (" in shown and f.metadata["help"] in shown


def test_registries_name_the_key_of_an_unknown_choice():
    for key, value in (("loss_type", "ppo2"), ("advantage_estimator", "rloo9"), ("engine", "sglang")):
        with pytest.raises(ConfigError, match=key):
            load_config([f"--{key}", value])


# ----------------------------------------------------------------------------- refused silent wrongs


@pytest.mark.parametrize("argv, line", [
    (["--reward_weights", "[1,"], "config key 'reward_weights': '[1' is not valid YAML"),
    (["--reward_kwargs", "{dapo_math: {policy: rounded}"], "config key 'reward_kwargs': '{dapo_math: {policy: "
                                                          "rounded}' is not valid YAML"),
    (["--reward_weights", "[nan]"], "config key 'reward_weights': must be a finite number, got [nan]"),
    (["--reward_weights", "[.inf]"], "config key 'reward_weights': must be a finite number, got [inf]"),
    (["--lr", "nan"], "config key 'lr': must be a finite number, got nan"),
    (["--temperature", "inf"], "config key 'temperature': must be a finite number, got inf"),
    (["--warmup_steps", "5", "--max_steps", "3"], "config key 'warmup_steps': 5 > max_steps 3"),
    (["--data_limit", "0"], "config key 'data_limit': must be > 0, got 0"),
    (["--output_dir", ""], "config key 'output_dir': empty"),
])
def test_malformed_nonfinite_twice_given_or_useless_values_are_refused_naming_the_key(argv, line):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_infinite_caps_mean_no_cap_and_warmup_may_span_the_run():
    cfg = load_config(["--tis_mode", "token", "--tis_cap", "inf", "--max_grad_norm", "inf", "--warmup_steps", "3",
                       "--max_steps", "3"])
    assert cfg.tis_cap == cfg.max_grad_norm == float("inf")


def test_a_key_twice_on_the_command_line_is_said_once_and_the_last_wins(capsys):
    assert load_config(["--lr", "1e-4", "--max_steps", "2", "--lr", "2e-4"]).lr == 2e-4
    assert load_config(["--lr", "1e-4", "--lr", "2e-4"]).lr == 2e-4  # said once per process
    err = capsys.readouterr().err.splitlines()
    assert err == ["looprl train: WARNING: config key 'lr' given twice on the command line: the last value "
                   "'2e-4' is used, '1e-4' ignored"]


def test_a_key_twice_in_a_yaml_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\nmax_steps: 3\nlr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config key 'lr' given twice \(line 3\)"):
        load_config(["--config", str(path)])
    path.write_text("base: &b {lr: 1.0e-4}\n")  # YAML merges may still be overridden
    (tmp_path / "m.yaml").write_text("reward_kwargs: {dapo_math: {<<: {policy: exact}, policy: rounded}}\n")
    assert load_config(["--config", str(tmp_path / "m.yaml")]).reward_kwargs == {"dapo_math": {"policy": "rounded"}}


def test_report_to_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="config key 'report_to': wandb is not installed: pip install wandb"):
        load_config(["--report_to", "wandb"])


def test_a_data_split_for_a_local_file_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1", "answer": "2"}\n')
    assert load_config(["--data", str(path)]).data_split == "train"
    with pytest.raises(ConfigError, match="config key 'data_split': 'test' given, but data .* is a local path"):
        load_config(["--data", str(path), "--data_split", "test"])


@pytest.mark.parametrize("kwargs, line", [
    ({"max_steps": "2"}, "config key 'max_steps': expected int, got str '2'"),
    ({"lr": True}, "config key 'lr': expected float, got bool True"),
    ({"reward_weights": ["1"]}, "config key 'reward_weights': expected list[float] | None, got list ['1']"),
    ({"rewards": "dapo_math"}, "config key 'rewards': expected list[str], got str 'dapo_math'"),
])
def test_python_api_values_of_the_wrong_type_are_refused_naming_the_key(kwargs, line):
    with pytest.raises(ConfigError) as e:
        validate(TrainConfig(**kwargs), registries=False)
    assert str(e.value) == line


class _Scorer:
    def __call__(self, prompts, completions, **kw):
        return [0.0] * len(completions)


def test_a_callable_object_reward_is_recorded_by_its_class_so_resume_compares_equal():
    from rl.config import portable_dict
    from rl.resume import config_changes

    first = portable_dict(TrainConfig(rewards=[_Scorer(), len]))
    assert first["rewards"] == [f"{__name__}:_Scorer", "builtins:len"]
    validate(TrainConfig(rewards=[_Scorer()], accuracy_reward=_Scorer()), registries=False)  # callables pass
    assert config_changes(first, TrainConfig(rewards=[_Scorer(), len]), "runs/x") == {}
