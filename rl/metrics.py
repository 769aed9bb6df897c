"""Run outputs a person reads: metrics.jsonl, samples.jsonl, the progress bar, optional trackers."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from rl.accuracy import unscored_frac
from rl.jsonl import iter_jsonl


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors -> float, NaN/inf -> None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [row for _, row in iter_jsonl(path)]


def truncate_after(path: str | Path, step: int) -> None:
    """Drop rows logged after `step` (a killed run may have logged steps its checkpoint does not hold)."""
    path = Path(path)
    if path.is_file():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class RunLogger:
    """Writes one JSON object per step (main process only) and mirrors it to accelerate trackers."""

    def __init__(self, output_dir: str | Path, accelerator, report_to: str = "none",
                 config: dict[str, Any] | None = None, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.metrics_path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "samples.jsonl"
        self.trackers = False
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for p in (self.metrics_path, self.samples_path):
                p.unlink(missing_ok=True)
        else:
            truncate_after(self.metrics_path, resume_step)
            truncate_after(self.samples_path, resume_step)
        if report_to != "none":
            self.trackers = self._init_trackers(report_to, config or {})

    def _init_trackers(self, report_to: str, config: dict[str, Any]) -> bool:
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
        if importlib.util.find_spec(module) is None and not (
                report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            warnings.warn(f"report_to={report_to!r} but {module} is not installed; logging to jsonl only",
                          stacklevel=2)
            return False
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        self.accelerator.init_trackers("looprl", config=flat)  # tensorboard: <output_dir>/looprl/
        return True

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.trackers:
                self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        return row

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.main and rows:
            with self.samples_path.open("a") as f:
                for r in rows:
                    f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}) + "\n")

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    return float(torch.tensor(xs).std()) if len(xs) > 1 else 0.0


def reward_metrics(samples, fn_names: list[str]) -> dict[str, float]:
    """reward/*, accuracy (+ accuracy/unscored_frac) and completion/* over every sample drawn this step
    (kept or not). A sample of a group skipped by reward_on_error: skip_group has no reward (left out of the
    reward means, counted in rewards/skipped_samples); its accuracy verdict is the accuracy function's."""
    rewards = [s.reward for s in samples if not getattr(s, "skip", False)]
    correct = [s.correct for s in samples]  # None = unscored: out of the mean, counted (rl/accuracy.py)
    m = {"reward/mean": _mean(rewards), "reward/std": _std(rewards), "accuracy": _mean(correct),
         "accuracy/unscored_frac": unscored_frac(correct)}
    for name in fn_names:
        scores = [float(s.fn_rewards[name]) for s in samples if s.fn_rewards[name] is not None]
        m[f"reward/{name}/mean"] = _mean(scores)
        m[f"reward/{name}/std"] = _std(scores)
    lengths = [len(s.completion_ids) for s in samples]
    m["completion/len_mean"] = _mean(lengths)
    m["completion/len_max"] = float(max(lengths)) if lengths else 0.0
    m["completion/truncated_frac"] = _mean([float(s.truncated) for s in samples])
    return m


def sample_rows(samples, dataset, limit: int) -> list[dict[str, Any]]:
    """The first `limit` samples as samples.jsonl rows (prompt text, completion, reward, advantage, ...)."""
    rows = []
    for s in samples[:limit]:
        prompt = dataset[s.prompt_index]["prompt"]
        rows.append({"prompt": prompt[-1]["content"] if isinstance(prompt, list) else prompt,
                     "completion": s.text, "reward": s.reward, "advantage": s.advantage,
                     "ground_truth": dataset[s.prompt_index].get("ground_truth"),
                     "truncated": s.truncated, **{f"reward/{k}": v for k, v in s.fn_rewards.items()}})
    return rows


def summarize(metrics_path: str | Path, key: str = "accuracy") -> str:
    """'accuracy: first tenth of steps X -> last tenth Y (+Z points)', the embedded job's success check."""
    values = [r[key] for r in read_jsonl(metrics_path) if isinstance(r.get(key), (int, float))]
    if not values:
        return f"no {key} logged"
    tenth = max(1, len(values) // 10)
    first, last = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
    return (f"{key}: first tenth of steps {first:.3f} -> last tenth {last:.3f} "
            f"({100 * (last - first):+.1f} points over {len(values)} steps)")
