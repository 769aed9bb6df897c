"""`looprl plot`: a PNG from fabricated metrics.jsonl files; clear one-line errors on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl.plot import PANELS, PlotError, ema, load_metrics, main, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def write_run(path, steps=12, reward_offset=0.0, with_eval=True):
    path.mkdir(parents=True, exist_ok=True)
    with (path / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            acc = min(1.0, 0.1 + reward_offset + step / 20)
            row = {
                "step": step,
                "reward/mean": 2 * acc - 1,
                "accuracy": acc,
                "groups/zero_std_frac": 0.5 / step,
                "completion/len_mean": 10.0 + step,
                "mismatch/logp_abs_max": 1e-6 * step,
                "mismatch/kl": 1e-8 * step,
                "exit/kl_t1": 0.9 / step,
                "exit/kl_t2_T": 0.4 / step,
                "policy/logp_t1": -1.0 / step,
                "policy/logp_t4": -0.5 / step,
                "policy/w_t1": 0.25,
                "policy/w_t4": 0.75,
                "loss/self_distill": 0.05 / step,
                "self_distill/coef": min(1.0, step / 4),
                "lr": 1e-5,
                "note": "strings are ignored",
            }
            if with_eval and step % 4 == 0:
                row.update({f"eval/accuracy_d{t}": acc * t / 4 for t in (1, 2, 4)})
            f.write(json.dumps(row) + "\n")
    return path


def read_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    return mpimg.imread(path)


def test_plot_two_runs_writes_a_readable_png(tmp_path):
    a = write_run(tmp_path / "grpo")
    b = write_run(tmp_path / "dapo", reward_offset=0.2, with_eval=False)
    out = tmp_path / "figs" / "curves.png"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    image = read_png(out)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0.01  # something was drawn, not a blank canvas


def test_plot_default_output_in_run_dir(tmp_path):
    run = write_run(tmp_path / "run")
    assert main([str(run)]) == 0
    read_png(run / "reward_curve.png")


def test_load_metrics_series_and_panel_selection(tmp_path):
    run = load_metrics(write_run(tmp_path / "r", steps=8))
    assert run.name == "r"
    steps, values = run.series["eval/accuracy_d4"]
    assert steps == [4.0, 8.0] and len(values) == 2
    assert "note" not in run.series and "step" not in run.series
    picks = {p.title: p.select(list(run.series)) for p in PANELS}
    assert picks["per-exit KL to the last exit"] == [("t=1", "exit/kl_t1"), ("t=2", "exit/kl_t2_T")]
    assert picks["policy log-prob per exit (sampled tokens)"] == [("t=1", "policy/logp_t1"), ("t=4", "policy/logp_t4")]
    assert picks["policy weight per exit w_t"] == [("t=1", "policy/w_t1"), ("t=4", "policy/w_t4")]
    assert picks["self-distillation"] == [("loss", "loss/self_distill"), ("coefficient", "self_distill/coef")]
    assert [label for label, _ in picks["eval accuracy per depth"]] == ["depth 1", "depth 2", "depth 4"]


def test_missing_metrics_skip_their_panels(tmp_path):
    run = tmp_path / "only_reward"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n"
                                              for s in range(5)))
    out = plot_runs([run], tmp_path / "o.png")
    read_png(out)
    # No step key: rows are numbered 1, 2, ...
    (run / "metrics.jsonl").write_text('{"accuracy": 0.5}\n{"accuracy": 0.75}\n')
    assert load_metrics(run).series["accuracy"] == ([1.0, 2.0], [0.5, 0.75])


@pytest.mark.parametrize("content, expected", [
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"step": 1, "accuracy": 0.5}\n{"step": 2, "accur', "metrics.jsonl: line 2: not valid JSON"),
    ('{"step": 1}\n[1, 2]\n', "metrics.jsonl: line 2: expected a JSON object"),
    ('{"step": "one", "accuracy": 1}\n', "metrics.jsonl: line 1: field 'step'"),
    ('{"step": 1, "lr": 0.1}\n', "no plottable metrics"),
])
def test_bad_metrics_file_is_a_one_line_error(tmp_path, capsys, content, expected):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    assert main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_missing_run_dir_or_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope: no such run directory or metrics file" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PlotError, match=r"empty_dir: holds no metrics.jsonl"):
        load_metrics(tmp_path / "empty_dir")


def test_cli_names_a_directory_without_metrics_and_writes_exactly_the_out_path(tmp_path):
    """As a user runs it: an existing directory without metrics.jsonl is named as such (not 'no such
    directory'); --out without an extension is a PNG at exactly that path, and the line says that path;
    an extension matplotlib cannot write is refused in one line before anything is read."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def plot(*args):
        return subprocess.run([sys.executable, "-m", "rl", "plot", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    (tmp_path / "empty_dir").mkdir()
    res = plot(str(tmp_path / "empty_dir"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "empty_dir: holds no metrics.jsonl" in res.stderr and "no such" not in res.stderr
    run = write_run(tmp_path / "run")
    res = plot(str(run), "--out", str(tmp_path / "curves"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {tmp_path / 'curves'}"
    read_png(tmp_path / "curves")
    assert not (tmp_path / "curves.png").exists()
    res = plot(str(run), "--out", str(tmp_path / "curves.xyz"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cannot write .xyz images" in res.stderr
    assert not (tmp_path / "curves.xyz").exists()


def test_ema_is_debiased_and_smooths():
    assert ema([5.0]) == [5.0]
    smoothed = ema([0.0, 10.0, 0.0, 10.0], weight=0.5)
    assert smoothed[0] == 0.0 and all(0.0 < v < 10.0 for v in smoothed[1:])
    assert ema([3.0] * 20, weight=0.9) == pytest.approx([3.0] * 20)
    assert not any(math.isnan(v) for v in ema(list(range(100))))
