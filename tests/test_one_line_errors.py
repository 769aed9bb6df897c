"""Bad models, bad files and bad outputs are one line naming the culprit, in train and eval alike
(issue 13): corrupt config.json, `hidden_size: "big"`, truncated weights, a path that does not exist,
binary garbage as data, an unwritable --out (checked before any compute), depths beyond the model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rl.data import EMBEDDED_MODEL

REPO = Path(__file__).resolve().parents[1]


def _one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if needle in line]
    assert len(lines) == 1, err
    return lines[0]


def _broken_models(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model dir, what the one-line error must say)."""
    cases = {}
    for name in ("bad_json", "big", "truncated"):
        shutil.copytree(EMBEDDED_MODEL, root / name)
    config = root / "bad_json" / "config.json"
    config.write_text(config.read_text()[:60])
    cases["bad_json"] = (root / "bad_json", "config.json: not valid JSON")
    config = root / "big" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": "big"}))
    cases["big"] = (root / "big", "config.json: 'hidden_size' must be a positive integer, got 'big'")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases["truncated"] = (root / "truncated", "cannot load the weights")
    cases["missing"] = (root / "nowhere", "no such model directory or hub id")
    shutil.copytree(EMBEDDED_MODEL, root / "no_chat_template")  # a base model's tokenizer: prompts cannot be encoded
    (root / "no_chat_template" / "chat_template.jinja").unlink()
    cases["no_chat_template"] = (root / "no_chat_template", "has no chat template, and looprl encodes every prompt")
    return cases


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return _broken_models(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("case", ["bad_json", "big", "truncated", "missing", "no_chat_template"])
def test_bad_model_is_one_line_in_train_and_eval(broken, case, tmp_path, capsys):
    from rl.evaluate import main as eval_main
    from rl.train import main as train_main

    path, expected = broken[case]
    assert train_main(["--model", str(path), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]) == 2
    line = _one_line(capsys, expected)
    assert "config key 'model'" in line and str(path) in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert eval_main(["--model", str(path), "--data", "arith", "--limit", "2"]) == 2
    assert str(path) in _one_line(capsys, expected)
    if case == "truncated":
        assert "model.safetensors" in line


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_binary_data_file_names_the_file_and_the_key(tmp_path, suffix, capsys):
    from rl.data import DataError, load_prompts
    from rl.train import main as train_main

    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=f"{garbage}: .*UTF-8"):
        load_prompts(str(garbage))
    assert train_main(["--eval_data", str(garbage), "--eval_every", "1", "--output_dir", str(tmp_path / "r"),
                       "--max_steps", "1"]) == 2
    assert str(garbage) in _one_line(capsys, "config key 'eval_data'")


def test_unwritable_out_is_refused_before_any_compute(tmp_path, capsys):
    from rl.evaluate import main as eval_main
    from rl.plot import main as plot_main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "eval.json"  # its directory is a file: can never be written
    # the model does not exist either: the --out check comes first, so nothing is loaded or generated
    assert eval_main(["--model", str(tmp_path / "nowhere"), "--data", "arith", "--out", str(out)]) == 2
    assert str(out) in _one_line(capsys, "--out")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    assert plot_main([str(run), "--out", str(out)]) == 2
    assert str(out) in _one_line(capsys, "--out")


def test_num_generations_1_is_refused():
    from rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'num_generations': 1 trains nothing"):
        load_config(["--num_generations", "1"])


def test_eval_depth_beyond_the_model_is_refused_like_train():
    """Subprocess: the CLI's exit code and its one stderr line (the embedded model has 4 loops)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "rl", "eval", "--data", "arith", "--depths", "1,9",
                          "--limit", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "looprl eval: --depths: [9] is out of range (1..4 for this model)"
