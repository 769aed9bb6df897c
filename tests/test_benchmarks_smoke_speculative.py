"""benchmarks/speculative.py runs end to end on the shipped tiny model (one batch, one draft config, one
repeat) and prints a well-formed table row for plain and speculative decoding."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py"


def test_speculative_benchmark_smoke():
    spec = importlib.util.spec_from_file_location("bench_speculative", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    text = module.main(["--models", "tiny", "--batches", "2", "--specs", "1:2", "--repeats", "1",
                        "--max_new", "6"])
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| tiny")]
    assert [(r[1].strip(), r[3].strip()) for r in rows] == [
        ("decode", "plain"), ("decode", "d1k2"), ("rl", "plain"), ("rl", "d1k2")]
    for r in rows:
        assert int(r[4]) > 0 and float(r[5]) > 0  # tokens produced, tokens/s
    assert 0.0 <= float(rows[1][7]) <= 1.0  # accept rate of the speculative row
