"""Golden run: the default `looprl train` for 10 steps reproduces the per-step metrics recorded before the
issue-12 redesign (tests/data/golden_default_10steps.json), so refactors of the loop cannot change results."""

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "data" / "golden_default_10steps.json"


@pytest.mark.slow
def test_default_run_matches_golden_metrics(tmp_path):
    from rl.train import main

    golden = json.loads(GOLDEN.read_text())
    out = tmp_path / "run"
    code = main(["--max_steps", "10", "--seed", "0", "--eval_every", "0", "--progress", "false",
                 "--output_dir", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in golden["steps"]]
    for got, want in zip(rows, golden["steps"]):
        for key in golden["compared"]:
            assert abs(got[key] - want[key]) <= golden["tolerance"], (got["step"], key, got[key], want[key])
