"""What a TRL user expects (issue 13): TRL's key names, reward modules from the working directory,
final/ loading without looprl, a fast `looprl --help`, help for every key, make-tiny leaving the
shipped model alone. (The Python API with a callable reward is in test_run_safety.py.)"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.config import ConfigError, TrainConfig, help_text, load_config

REPO = Path(__file__).resolve().parents[1]


def test_trl_key_names_are_aliases(tmp_path):
    cfg = load_config(["--learning_rate", "1e-5", "--max_completion_length", "32", "--epsilon_high", "0.3",
                       "--mask_truncated_completions", "--lr_scheduler_type", "cosine"])
    assert (cfg.lr, cfg.max_new_tokens, cfg.eps_high, cfg.mask_truncated, cfg.lr_scheduler) == \
        (1e-5, 32, 0.3, True, "cosine")
    path = tmp_path / "trl.yaml"
    path.write_text("learning_rate: 2.0e-6\nepsilon: 0.1\nsave_steps: 5\n")
    cfg = load_config(["--config", str(path)])
    assert (cfg.lr, cfg.eps_low, cfg.save_every) == (2e-6, 0.1, 5)
    with pytest.raises(ConfigError, match="'lr' given twice"):
        load_config(["--lr", "1e-5", "--learning_rate", "1e-6"])
    path.write_text("learning_rate: 2.0e-6\nlr: 1.0e-6\n")
    with pytest.raises(ConfigError, match="'lr' given twice"):
        load_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="'num_train_epochs' .* no equivalent here: .*max_steps"):
        load_config(["--num_train_epochs", "3"])


def test_epsilon_high_is_the_cispo_cap_under_cispo(tmp_path):
    """TRL's CISPO truncates its importance weight at epsilon_high: a migrated TRL CISPO config must set
    cispo_cap (eps_high is a clip CISPO does not use), wherever loss_type and epsilon_high are given."""
    default = TrainConfig()
    cfg = load_config(["--loss_type", "cispo", "--epsilon_high", "3.0"])
    assert (cfg.cispo_cap, cfg.eps_high) == (3.0, default.eps_high)
    cfg = load_config(["--epsilon_high", "4", "--loss_type=cispo"])  # order does not matter
    assert (cfg.cispo_cap, cfg.eps_high) == (4.0, default.eps_high)
    path = tmp_path / "trl.yaml"
    path.write_text("loss_type: cispo\nepsilon_high: 6.0\n")
    cfg = load_config(["--config", str(path)])
    assert (cfg.cispo_cap, cfg.eps_high) == (6.0, default.eps_high)
    path.write_text("epsilon_high: 7.0\n")  # the loss type from the command line decides for the file
    cfg = load_config(["--config", str(path), "--loss_type", "cispo"])
    assert (cfg.cispo_cap, cfg.eps_high) == (7.0, default.eps_high)
    path.write_text("loss_type: cispo\nepsilon_high: 6.0\n")  # the command line's loss type wins
    cfg = load_config(["--config", str(path), "--loss_type", "dapo", "--cispo_cap", "2"])
    assert (cfg.eps_high, cfg.cispo_cap) == (6.0, 2.0)
    for loss in ("grpo", "dapo", "dr_grpo"):  # a clip-range loss: TRL's epsilon_high is the upper clip
        cfg = load_config(["--loss_type", loss, "--epsilon_high", "0.3"])
        assert (cfg.eps_high, cfg.cispo_cap) == (0.3, default.cispo_cap)
    with pytest.raises(ConfigError, match="'cispo_cap' given twice"):
        load_config(["--loss_type", "cispo", "--epsilon_high", "3", "--cispo_cap", "4"])
    path.write_text("loss_type: cispo\nepsilon_high: 6.0\ncispo_cap: 5.0\n")
    with pytest.raises(ConfigError, match="'cispo_cap' given twice .*'epsilon_high'"):
        load_config(["--config", str(path)])


def test_help_lists_the_trl_aliases():
    text = help_text()  # (help text for every key: tests/test_config.py)
    assert "--learning_rate = --lr" in text and "--max_completion_length = --max_new_tokens" in text
    assert "under loss_type cispo, --epsilon_high = --cispo_cap" in text.splitlines()[-1]


def test_reward_module_in_the_working_directory_is_found_by_the_cli(tmp_path):
    """The `looprl` console script does not put the working directory on sys.path; the registry does."""
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n"
        "    return [1.0 / (1 + len(c if isinstance(c, str) else c[0]['content'])) for c in completions]\n")
    script = Path(sys.executable).with_name("looprl")
    if not script.is_file():
        pytest.skip("no looprl console script next to this python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(script), "reward", "--fn", "my_rewards:brevity", "--completion", "abc",
                          "--answer", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "score: 0.25" in res.stdout


def test_commands_without_a_model_start_without_torch():
    """`looprl --help`, `looprl train --help` and `looprl reward --list` used to import torch + transformers
    (6-10 s; `train --help` imported the whole trainer)."""
    code = ("import sys, contextlib, io\nfrom rl.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0 and main(['reward', '--list']) == 0 and main(['train', '--help']) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert elapsed < 5.0  # generous for a loaded 2-core machine; importing torch alone takes longer here


HIDE_LOOPRL = '''
import sys

class HideLooprl:  # as if looprl were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("rl", "rewards", "rollout", "looped"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)")

sys.meta_path.insert(0, HideLooprl())
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
logits = model(torch.tensor([[1, 5, 7, 9, 11]]), depth=2).logits
print(type(model).__name__, repr(logits.double().sum().item()))
assert not any(name.split(".")[0] in ("rl", "looped") for name in sys.modules)
'''


def test_saved_final_loads_without_looprl(tmp_path):
    from rl.make_tiny import TinyConfig, build_model, build_tokenizer
    from rl.model_io import save_portable

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(TinyConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2), tokenizer).eval()
    final = tmp_path / "final"
    save_portable(model, tokenizer, final)
    # the modeling file, its config and what they import relatively; not looped/__init__.py, facts.py, ...
    assert {p.name for p in final.glob("*.py")} == {"modeling_ouro.py", "configuration_ouro.py", "hf_compat.py"}
    expected = model(torch.tensor([[1, 5, 7, 9, 11]]), depth=2).logits.double().sum().item()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf")  # the remote-code module cache goes here, not into ~/.cache
    res = subprocess.run([sys.executable, "-c", HIDE_LOOPRL, str(final)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    name, value = res.stdout.split()
    assert name == "OuroForCausalLM" and float(value) == pytest.approx(expected, rel=1e-6)


def test_make_tiny_default_output_is_not_the_shipped_model():
    from rl.data import EMBEDDED_MODEL
    from rl.make_tiny import parse_args

    out = Path(parse_args([]).out)
    assert not out.is_absolute() and out.resolve() != Path(EMBEDDED_MODEL).resolve()
