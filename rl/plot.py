"""`looprl plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`: reward curves of training runs in one PNG.

Reads each run's `metrics.jsonl` (one JSON object per step, written by the trainer) and draws one
panel per quantity a looped-LM RL run is judged by: reward and accuracy (raw + smoothed), the
fraction of zero-variance groups (no learning signal), completion length, the rollouts' mean depth per
token (rollout/mean_depth: T for fixed-depth rollouts, lower under an adaptive exit rule), rollout/update mismatch
(the depth-mismatch failure looprl exists to prevent), per-exit KL to the deepest exit, the
exit-weighted policy term's per-exit log-prob and weight (policy/logp_t{t}, policy/w_t{t}), the exit
gate's mean distribution, the self-distillation loss and its (possibly ramped) coefficient, and eval
accuracy per depth. Several runs overlay with one colour each, so GRPO vs DAPO or self-distillation
on/off can be compared at a glance. A metric no run logged simply has no panel.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rl.jsonl import iter_jsonl

METRICS_FILE = "metrics.jsonl"
SMOOTHING = 0.9  # EMA weight of the past, as TensorBoard's smoothing slider.


class PlotError(ValueError):
    """A user-facing problem with the inputs (missing/empty/corrupt metrics file)."""


@dataclass
class Run:
    """One run's metrics as {metric name: (steps, values)}, numeric values only."""

    name: str
    path: Path
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def _metrics_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.exists():
        raise PlotError(f"{path}: no such run directory or metrics file")
    candidate = path / METRICS_FILE
    if not candidate.is_file():
        raise PlotError(f"{path}: holds no {METRICS_FILE} (no step logged yet, or not a looprl run directory)")
    return candidate


def image_format(out: str | Path) -> str:
    """The format `out` is written in, from its extension (none: PNG, written at exactly that path; matplotlib
    alone would add '.png'). An extension matplotlib cannot write is refused naming the ones it can."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(out).suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise PlotError(f"--out {out}: cannot write .{suffix} images; use one of "
                        f"{', '.join('.' + k for k in sorted(supported))} (or no extension: PNG)")
    return suffix or "png"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_metrics(run_dir: str | Path, name: str | None = None) -> Run:
    """Parse a run's metrics.jsonl; a malformed line is an error naming the file and line number."""
    path = _metrics_path(run_dir)
    run = Run(name=name or (path.parent.name if path.name == METRICS_FILE else path.stem), path=path)
    n_rows = 0
    for lineno, row in iter_jsonl(path, PlotError):
        n_rows += 1
        step = row.get("step", n_rows)
        if not _is_number(step):
            raise PlotError(f"{path}: line {lineno}: field 'step' is not a number ({step!r})")
        for key, value in row.items():
            if key != "step" and _is_number(value):
                steps, values = run.series.setdefault(key, ([], []))
                steps.append(float(step))
                values.append(float(value))
    if n_rows == 0:
        raise PlotError(f"{path}: empty (no metric rows yet)")
    return run


def ema(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (the curve TensorBoard draws with smoothing=weight)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight**i))
    return out


# A panel: title, y label, and a function picking its (label, metric key) series from a run's keys.
@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    select: Callable[[Sequence[str]], list[tuple[str, str]]]
    smooth: bool = False  # draw raw faintly + EMA boldly
    markers: bool = False  # sparse metrics (eval) read better as points
    log: bool = False  # log y axis (when every value is > 0): mismatch is judged by its order of magnitude


def _fixed(*keys_labels: tuple[str, str]) -> Callable[[Sequence[str]], list[tuple[str, str]]]:
    return lambda keys: [(label, k) for label, k in keys_labels if k in keys]


def _numbered(pattern: str, label: str) -> Callable[[Sequence[str]], list[tuple[str, str]]]:
    """Keys like exit/kl_t1_T, exit/kl_t2 or eval/accuracy_d3, sorted by their number."""
    regex = re.compile(pattern)

    def select(keys: Sequence[str]) -> list[tuple[str, str]]:
        found = [(int(m.group(1)), k) for k in keys if (m := regex.fullmatch(k))]
        return [(label.format(t=t), k) for t, k in sorted(found)]

    return select


PANELS: list[Panel] = [
    Panel("reward", "mean reward", _fixed(("reward", "reward/mean")), smooth=True),
    Panel("accuracy", "fraction correct", _fixed(("accuracy", "accuracy")), smooth=True),
    Panel("zero-variance groups", "fraction of groups", _fixed(("zero std", "groups/zero_std_frac")), smooth=True),
    Panel("completion length", "tokens", _fixed(("mean", "completion/len_mean")), smooth=True),
    Panel("rollout depth (loops per token)", "mean depth", _fixed(("mean depth", "rollout/mean_depth")),
          smooth=True),
    Panel("rollout/update mismatch: max |Δlogp|", "nats", _fixed(("max |Δlogp|", "mismatch/logp_abs_max")),
          log=True),
    Panel("rollout/update mismatch: KL", "nats / token", _fixed(("KL", "mismatch/kl")), log=True),
    Panel("per-exit KL to the last exit", "nats / token", _numbered(r"exit/kl_t(\d+)(?:_\w+)?", "t={t}")),
    Panel("policy log-prob per exit (sampled tokens)", "nats / token", _numbered(r"policy/logp_t(\d+)", "t={t}"),
          smooth=True),
    Panel("policy weight per exit w_t", "mean weight", _numbered(r"policy/w_t(\d+)", "t={t}")),
    Panel("exit gate p(t)", "mean probability", _numbered(r"exit/p_mean_t(\d+)", "t={t}")),
    Panel("self-distillation", "nats / token; coefficient", _fixed(("loss", "loss/self_distill"),
                                                                   ("coefficient", "self_distill/coef"))),
    Panel("eval accuracy per depth", "fraction correct", _numbered(r"eval/accuracy_d(\d+)", "depth {t}"),
          markers=True),
]

LINESTYLES = ["-", "--", ":", "-."]


def _unique_names(paths: Sequence[str]) -> list[str]:
    """Legend names: the run directory's name, or parent/name when two runs share a name."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).resolve().parent.name}/{Path(p).resolve().name}" for p in paths]
    return names


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Draw every panel that at least one run has data for; returns the written PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training boxes or in CI
    import matplotlib.pyplot as plt

    names = _unique_names([str(d) for d in run_dirs])
    runs = [load_metrics(d, name) for d, name in zip(run_dirs, names)]
    panels = [(p, [p.select(list(r.series)) for r in runs]) for p in PANELS]
    panels = [(p, picks) for p, picks in panels if any(picks)]
    if not panels:
        keys = sorted({k for r in runs for k in r.series})
        raise PlotError(f"no plottable metrics in {', '.join(str(r.path) for r in runs)} (keys: {keys[:10]})")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi_run = len(runs) > 1
    for ax, (panel, picks) in zip(axes.flat, panels):
        for run_i, (run, series) in enumerate(zip(runs, picks)):
            for s_i, (label, key) in enumerate(series):
                steps, values = run.series[key]
                # One run: a colour per series. Several runs: a colour per run, a line style per series.
                color = colors[(run_i if multi_run else s_i) % len(colors)]
                style = LINESTYLES[s_i % len(LINESTYLES)] if multi_run else "-"
                name = run.name if len(series) == 1 else f"{run.name} · {label}" if multi_run else label
                if panel.smooth and len(values) > 1:
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                    ax.plot(steps, ema(values), color=color, linestyle=style, linewidth=1.8, label=name)
                else:
                    ax.plot(steps, values, color=color, linestyle=style, linewidth=1.5,
                            marker="o" if panel.markers or len(values) == 1 else None, markersize=3, label=name)
        drawn = [v for run, series in zip(runs, picks) for _, key in series for v in run.series[key][1]]
        if panel.log and drawn and min(drawn) > 0:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if multi_run or sum(len(s) for s in picks) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format=image_format(out))  # exactly `out`, whatever its extension
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="looprl plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default=None, help="image to write, format by extension (.png, .pdf, .svg ...; none: PNG at exactly this path; "
                        "default: RUN_DIR/reward_curve.png of the first run)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    out = args.out
    if out is None:
        first = Path(args.run_dirs[0])
        out = (first.parent if first.is_file() else first) / "reward_curve.png"
    try:
        from rl.run_dir import check_writable_file

        image_format(out)  # a format matplotlib cannot write: before reading and drawing every run
        check_writable_file(out, "--out")
        path = plot_runs(args.run_dirs, out, title=args.title)
    except (PlotError, ValueError) as e:
        print(f"looprl plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
