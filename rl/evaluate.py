"""`looprl eval`: accuracy, pass@k and maj@k of one checkpoint at each loop depth.

A looped LM is several models in one (the same weights run 1..T loops), so evaluation is a table
over depths, not a number. Generation goes through the same fixed-depth rollout worker the trainer
uses, and scoring through the same reward registry, so eval numbers and training rewards agree; what
counts as correct (the accuracy function, its options, None = unscored, maj@k's votes) is rl/accuracy.py.
`--exit_threshold Q` instead decodes with the model's own exit gate (the adaptive-depth mode a
deployed Ouro model runs in) and reports accuracy and the mean depth it used.

`evaluate_depths(...)` is the library entry point; the trainer calls it every `eval_every` steps. Workers
come from `rollout.make_worker` and scores from `rewards.score_completions`, as in the trainer.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import rewards
from looped.facts import is_looped, max_depth
from rewards import extract_answer, score_completions
from rewards.guard import RewardGuard
from rewards.policy import Policy, from_options
from rl.accuracy import AccuracyError, check_accuracy_name, unscored_frac, verdicts, vote_classes
from rl.config import check_depths
from rl.data import EMBEDDED_MODEL, load_prompts
from rl.model_io import (
    checkpoint_source,
    is_checkpoint_dir,
    load_checkpoint_model,
    load_model,
    load_model_config,
    load_tokenizer,
    set_threads,
)
from rl.prompts import encode_prompts, fit_prompts, prompt_room
from rl.reward_cli import parse_option
from rl.run_dir import check_writable_file
from rl.special_tokens import apply_special_tokens
from rollout import ExitRule, SamplingParams, make_worker
from rollout.base import exit_rule_from_keys
from rollout.engines import check_installed
from rollout.speculative import accumulate_stats, check_spec_keys, rollout_metrics, spec_config

# ----------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k samples drawn from n is correct).

    1 - C(n-c, k) / C(n, k), computed as a running product so large n never overflows.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _vote(votes: Sequence[int | None], correct: Sequence[bool]) -> float:
    """1 if the biggest class of equal answers is correct (a class is correct when any member is).
    Tie rule: a tie between classes scores the fraction of tied classes that are correct (the expected
    value of a uniformly random tie-break), so a 2-2 tie of a right and a wrong answer scores 0.5."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [v for v, c in counts.items() if c == top]
    right = {v for v, ok in zip(votes, correct) if v is not None and ok}
    return sum(v in right for v in winners) / len(winners)


def _majority(votes: Sequence[int | None], correct: Sequence[bool], k: int, max_subsets: int, seed: int) -> float:
    n = len(votes)
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got n={n}, k={k}")
    if k == n:
        return _vote(votes, correct)
    if math.comb(n, k) <= max_subsets:
        subsets: Any = itertools.combinations(range(n), k)
    else:
        rng = random.Random(seed)
        subsets = (rng.sample(range(n), k) for _ in range(max_subsets))
    scores = [_vote([votes[i] for i in s], [correct[i] for i in s]) for s in subsets]
    return sum(scores) / len(scores)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None,
             max_subsets: int = 20_000, seed: int = 0, *, policy: Policy | None = None) -> float:
    """Majority-vote accuracy over k samples, averaged over all k-subsets of the n samples drawn.

    answers are the extracted final answers (None: nothing extractable, casts no vote); correct is
    the per-sample verdict. Answers the math verifier judges equal under `policy` (the accuracy
    function's options) are one vote (`rl.accuracy.vote_classes`); ties: `_vote`. With more than
    `max_subsets` subsets the average is over that many random subsets (seeded).
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"maj@k: {n} answers but {len(correct)} correctness flags")
    return _majority(vote_classes([answers], policy)[0], correct, n if k is None else k, max_subsets, seed)


def summarize_depth(scores: Sequence[float | None], lengths: Sequence[int], truncated: Sequence[bool],
                    answers: Sequence[str | None], n: int, *, policy: Policy | None = None,
                    accuracy_name: str = "accuracy function") -> dict[str, float | int | None]:
    """Per-depth metrics from prompt-major per-sample results (n samples per prompt).

    `scores` come from the accuracy function: 1 correct, 0 wrong, None unscored (anything else is
    refused, rl/accuracy.py). Unscored samples are left out of accuracy, pass@k and maj@k (a prompt's
    k shrinks to its scored samples; a prompt without any is left out) and counted in `unscored_frac`;
    accuracy is None when nothing was scored.
    """
    total = len(scores)
    if total == 0 or total % n:
        raise ValueError(f"expected a positive multiple of n={n} samples, got {total}")
    correct = verdicts(scores, accuracy_name)
    scored = [c for c in correct if c is not None]
    out: dict[str, float | int | None] = {
        "accuracy": sum(scored) / len(scored) if scored else None,
        "num_prompts": total // n,
        "n": n,
        "len_mean": sum(lengths) / total,
        "len_max": max(lengths),
        "truncated_frac": sum(truncated) / total,
        "unscored_frac": unscored_frac(correct),
    }
    if n > 1:
        groups = [[i for i in range(g, g + n) if correct[i] is not None] for g in range(0, total, n)]
        groups = [g for g in groups if g]
        votes = vote_classes([[answers[i] for i in g] for g in groups], policy)
        pass_k = [pass_at_k(len(g), sum(bool(correct[i]) for i in g), len(g)) for g in groups]
        maj_k = [_vote(v, [bool(correct[i]) for i in g]) for g, v in zip(groups, votes)]
        out["k"] = n
        out["pass@k"] = sum(pass_k) / len(groups) if groups else None
        out["maj@k"] = sum(maj_k) / len(groups) if groups else None
    return out


def flat_metrics(depth_results: Mapping[str, Mapping[str, Any]], prefix: str = "eval/") -> dict[str, float]:
    """{"1": {"accuracy": a, ...}} -> {"eval/accuracy_d1": a, ...}: the keys the trainer logs."""
    flat = {}
    for depth, metrics in depth_results.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}{name}_d{depth}"] = float(value)
    return flat


# ----------------------------------------------------------------------------- generation


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False, dynamic_ncols=True)


def _dataset_columns(dataset) -> tuple[list[Any], dict[str, list[Any]]]:
    """(prompts, other columns as lists) of an eval set; it needs `prompt` and `ground_truth`."""
    names = list(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
    for col in ("prompt", "ground_truth"):
        if col not in names:
            raise ValueError(f"eval dataset has no {col!r} column (columns: {names})")
    columns = {name: list(dataset[name]) for name in names if name not in ("prompt", "completion")}
    columns["ground_truth"] = [str(g) for g in columns["ground_truth"]]
    return list(dataset["prompt"]), columns


def _accuracy_fn(reward_fn: str | Callable, reward_kwargs: Mapping[str, Any] | None) -> tuple[Callable, Policy]:
    """The accuracy function with its options bound, and the verifier policy those options mean."""
    check_accuracy_name(reward_fn)
    options = dict(reward_kwargs or {})
    # a name, 'pkg.mod:fn', or a callable (passed through)
    return rewards.get(reward_fn, **options), from_options(options, where=rewards.reward_name(reward_fn))


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _max_positions(model) -> int | None:
    """The model's position-table size (None: none known, e.g. a vLLM worker factory without a model)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def evaluate_depths(model, tokenizer, dataset, depths: Sequence[int], n: int = 1, temperature: float = 0.0,
                    max_new_tokens: int = 256, reward_fn: str | Callable = "math_accuracy", batch_size: int = 16,
                    *, reward_kwargs: Mapping[str, Any] | None = None, top_p: float = 1.0, seed: int = 0,
                    progress: bool = False,
                    worker_factory: Callable[[int], Any] | None = None,
                    guard: RewardGuard | None = None,
                    draft_depth: int = 0, num_draft: int = 0, prompt_suffix: str = "",
                    ignore_eos: bool = False, max_positions: int | None = None) -> dict[str, dict[str, Any]]:
    """Generate n completions per prompt at each depth and score them.

    `reward_fn` called with `reward_kwargs` decides correct (1 / 0 / None = unscored, rl/accuracy.py);
    maj@k groups votes with the math verifier under the same options.
    Returns {str(depth): {"accuracy", "unscored_frac", "len_mean", "truncated_frac", ... (+ "pass@k",
    "maj@k", "k" if n > 1)}}. `worker_factory(depth)` builds the rollout worker (default: the torch worker around
    `model`); batch_size counts prompts per generate call (each with n samples). `guard` applies the
    trainer's reward_on_error / reward_timeout (default: any bad reward result is a one-line error).
    draft_depth, num_draft > 0: self-speculative decoding at the depths above draft_depth (same
    distribution; adds "rollout/accept_rate", "rollout/tokens_per_verify"). ignore_eos: every completion
    runs to max_new_tokens (benchmarks and memory tests). Prompts are left-truncated to what the model's
    positions (`max_positions`, default `model.config.max_position_embeddings`) leave after max_new_tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not depths or any(int(d) < 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of integers >= 1, got {list(depths)}")
    if n > 1 and temperature == 0:
        raise ValueError("n > 1 with temperature 0 draws n identical greedy samples; set temperature > 0")
    score_fn, policy = _accuracy_fn(reward_fn, reward_kwargs)
    prompts, columns = _dataset_columns(dataset)
    rewards.check_column_clash(rewards.reward_name(reward_fn), reward_kwargs or {}, list(columns))
    if not prompts:
        raise ValueError("eval dataset is empty")
    prompt_ids = fit_prompts(encode_prompts(tokenizer, prompts, prompt_suffix),
                             max_positions or _max_positions(model), max_new_tokens)
    if worker_factory is None:
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        pad = eos if pad is None else pad

        def worker_factory(depth: int):
            return make_worker("torch", depth=depth, model=model, eos_token_id=eos, pad_token_id=pad)

    was_training = getattr(model, "training", False)
    if model is not None and hasattr(model, "eval"):
        model.eval()
    results: dict[str, dict[str, Any]] = {}
    bar = _progress(len(depths) * len(prompts) * n, "eval", progress)
    try:
        for depth in depths:
            depth = int(depth)
            worker = worker_factory(depth)
            rewards_d: list[float | None] = []
            lengths: list[int] = []
            truncated: list[bool] = []
            answers: list[str | None] = []
            start, gen_time, spec_totals = time.perf_counter(), 0.0, {}
            bar.set_description(f"eval depth {depth}")
            for b, idx in enumerate(_batches(range(len(prompts)), batch_size)):
                params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed + 1000 * depth + b, ignore_eos=ignore_eos,
                                        speculative=spec_config(draft_depth, num_draft, depth))
                t0 = time.perf_counter()
                rollout = worker.generate([prompt_ids[i] for i in idx], params)
                gen_time += time.perf_counter() - t0
                accumulate_stats(spec_totals, rollout.stats)
                if len(rollout.completion_ids) != len(idx) * n:
                    raise RuntimeError(f"worker returned {len(rollout.completion_ids)} samples for "
                                       f"{len(idx)} prompts x n={n}")
                texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completion_ids]
                trunc = [r == "length" for r in rollout.finish_reasons]
                rows = [i for i in idx for _ in range(n)]
                rewards_d += score_completions(score_fn, [prompts[i] for i in rows], texts,
                                               columns={k: [v[i] for i in rows] for k, v in columns.items()},
                                               completion_ids=rollout.completion_ids, truncated=trunc,
                                               max_completion_length=max_new_tokens, guard=guard)
                lengths += [len(c) for c in rollout.completion_ids]
                truncated += trunc
                answers += [extract_answer(t, fallback=policy.fallback) for t in texts] if n > 1 \
                    else [None] * len(texts)
                bar.update(len(texts))
            elapsed = time.perf_counter() - start
            metrics = summarize_depth(rewards_d, lengths, truncated, answers, n, policy=policy,
                                      accuracy_name=rewards.reward_name(score_fn))
            metrics["time_s"] = elapsed
            metrics["time_generate_s"] = gen_time
            metrics["tokens_per_s"] = sum(lengths) / gen_time if gen_time > 0 else 0.0  # generation only
            metrics.update(rollout_metrics(spec_totals, gen_time, sum(lengths)))
            results[str(depth)] = metrics
            del worker, rollout  # a vLLM engine holds GPU memory until collected
            _release_memory()
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return results


def evaluate_exit_rule(model, tokenizer, dataset, rule: ExitRule, max_new_tokens: int = 256,
                       reward_fn: str | Callable = "math_accuracy", batch_size: int = 16,
                       progress: bool = False, guard: RewardGuard | None = None,
                       prompt_suffix: str = "", reward_kwargs: Mapping[str, Any] | None = None,
                       max_positions: int | None = None) -> dict[str, Any]:
    """Greedy decoding with an adaptive exit rule (rollout.base.ExitRule: confidence or gate) through the
    same torch rollout worker the trainer samples with (rollout/exit_rules.py: each token stops at its exit,
    the loops it skips hold each layer's K/V projection of its exit state).

    Reports accuracy, lengths and `depth_mean`, the mean loop count per generated token.
    """
    if not is_looped(model):
        raise ValueError(f"exit rule {rule.kind!r} needs a looped (Ouro) model, got {type(model).__name__}")
    score_fn, _ = _accuracy_fn(reward_fn, reward_kwargs)
    prompts, columns = _dataset_columns(dataset)
    rewards.check_column_clash(rewards.reward_name(reward_fn), reward_kwargs or {}, list(columns))
    prompt_ids = fit_prompts(encode_prompts(tokenizer, prompts, prompt_suffix),
                             max_positions or _max_positions(model), max_new_tokens)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    worker = make_worker("torch", depth=max_depth(model), model=model, eos_token_id=eos,
                         pad_token_id=eos if pad is None else pad)
    scores: list[float | None] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    depth_sum, depth_count = 0, 0
    bar = _progress(len(prompts), f"eval exit rule {rule.kind} {rule.threshold}", progress)
    start = time.perf_counter()
    try:
        for idx in _batches(range(len(prompts)), batch_size):
            rollout = worker.generate([prompt_ids[i] for i in idx],
                                      SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                                     exit_rule=rule))
            trunc = [r == "length" for r in rollout.finish_reasons]
            for d in rollout.token_depths:
                depth_sum += sum(d)
                depth_count += len(d)
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completion_ids]
            scores += score_completions(score_fn, [prompts[i] for i in idx], texts,
                                        columns={k: [v[i] for i in idx] for k, v in columns.items()},
                                        completion_ids=rollout.completion_ids, truncated=trunc,
                                        max_completion_length=max_new_tokens, guard=guard)
            lengths += [len(c) for c in rollout.completion_ids]
            truncated += trunc
            bar.update(len(idx))
    finally:
        bar.close()
    metrics: dict[str, Any] = summarize_depth(scores, lengths, truncated, [None] * len(scores), 1,
                                              accuracy_name=rewards.reward_name(score_fn))
    metrics.update(exit_rule=rule.kind, exit_threshold=rule.threshold, min_depth=rule.min_depth)
    metrics["depth_mean"] = depth_sum / depth_count if depth_count else None
    metrics["max_depth"] = max_depth(model)
    metrics["time_s"] = time.perf_counter() - start
    return metrics


def evaluate_exit_threshold(model, tokenizer, dataset, exit_threshold: float, **kwargs) -> dict[str, Any]:
    """`--exit_threshold q`: the `gate` exit rule at q (Ouro's exit-gate CDF; q >= 1 always reads loop T)."""
    if not 0.0 <= exit_threshold:
        raise ValueError(f"--exit_threshold must be >= 0, got {exit_threshold}")
    return evaluate_exit_rule(model, tokenizer, dataset, ExitRule("gate", float(exit_threshold)), **kwargs)


# ----------------------------------------------------------------------------- CLI


def print_table(report: Mapping[str, Any], file=None) -> None:
    """Rich table: one row per depth (and one per adaptive exit mode: --exit_threshold, --rollout_exit_rule)."""
    rows = dict(report.get("depths", {}))
    if "exit_threshold" in report:
        rows[f"exit q={report['exit_threshold']['exit_threshold']}"] = report["exit_threshold"]
    if "exit_rule" in report:
        m = report["exit_rule"]
        rows[f"{m['exit_rule']} {m['exit_threshold']} (min {m['min_depth']})"] = m
    table = Table(title=f"{report.get('model')}  on  {report.get('data')}")
    has_k = any("pass@k" in m for m in rows.values())
    k = next((m["k"] for m in rows.values() if "k" in m), None)
    has_depth = "exit_threshold" in report or "exit_rule" in report
    has_unscored = any(m.get("unscored_frac") for m in rows.values())
    table.add_column("depth", justify="right")
    table.add_column("accuracy", justify="right")
    if has_k:
        table.add_column(f"pass@{k}", justify="right")
        table.add_column(f"maj@{k}", justify="right")
    if has_depth:
        table.add_column("mean depth", justify="right")
    table.add_column("len mean", justify="right")
    table.add_column("truncated", justify="right")
    if has_unscored:
        table.add_column("unscored", justify="right")
    table.add_column("time s", justify="right")

    def cell(m: Mapping[str, Any], key: str, spec: str) -> str:
        return "-" if m.get(key) is None else format(m[key], spec)

    for name, m in rows.items():
        cells = [name, cell(m, "accuracy", ".3f")]
        if has_k:
            cells += [cell(m, "pass@k", ".3f"), cell(m, "maj@k", ".3f")]
        if has_depth:
            cells.append(cell(m, "depth_mean", ".2f"))
        cells += [f"{m['len_mean']:.1f}", f"{m['truncated_frac']:.1%}"]
        if has_unscored:
            cells.append(cell(m, "unscored_frac", ".1%"))
        cells.append(f"{m.get('time_s', 0):.1f}")
        table.add_row(*cells)
    console = Console(file=file)
    if not console.is_terminal:  # pipes/logs default to 80 columns, which would truncate the headers
        console = Console(file=file, width=160)
    console.print(table)


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated integers like 1,2,3,4, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise ValueError(f"--depths must list integers >= 1, got {text!r}")
    return depths


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="looprl eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory, or a run's checkpoints/step-N (its run's model "
                                                 "with the checkpoint's weights); default: the embedded tiny model")
    p.add_argument("--data", required=True, help="dataset name (arith, aime24, math500, ...) or local file")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--depths", default=None, help="comma-separated loop counts (default: 1..T, the model's loops)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt; n > 1 adds pass@n and maj@n")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0 = greedy for n=1, 1.0 for n>1)")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    p.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"completion tokens (default {DEFAULT_MAX_NEW_TOKENS}, lowered to what the model's "
                        "max_position_embeddings leave after the longest prompt, at least half of them)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--ignore_eos", action="store_true",
                   help="never stop at EOS: every completion runs to --max_new_tokens (benchmarks, memory tests)")
    p.add_argument("--reward", default="math_accuracy",
                   help="1/0 function deciding correct (training's accuracy_reward; default math_accuracy)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of --reward (JSON values), repeatable; the run's verifier options, e.g. "
                        "--option policy=rounded for reward_kwargs: {dapo_math: {policy: rounded}}")
    p.add_argument("--exit_threshold", type=float, default=None,
                   help="also decode greedily with the exit gate at this threshold q and report mean depth")
    p.add_argument("--rollout_exit_rule", default="fixed",
                   help="also decode greedily with this adaptive exit rule (confidence | gate; train's key) and "
                        "report its accuracy and mean depth; fixed = off")
    p.add_argument("--rollout_exit_threshold", type=float, default=None,
                   help="threshold of --rollout_exit_rule: confidence (0, 1], gate [0, 1]")
    p.add_argument("--rollout_min_depth", type=int, default=1, help="adaptive rules: no exit before this loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollout_draft_depth", type=int, default=0,
                   help="self-speculative decoding (torch engine): draft depth; same distribution; 0 = off")
    p.add_argument("--rollout_num_draft", type=int, default=0, help="tokens drafted per verification (0 = off)")
    p.add_argument("--prompt_suffix", default="",
                   help="text after the chat template's generation prompt (Ouro-Thinking: $'<think>\\n')")
    p.add_argument("--eos_token", default=None,
                   help="token that ends a completion, overriding the tokenizer's (Ouro-Thinking files: <|im_end|>)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def _load_tokenizer_and_config(path: str):
    """A checkpoint directory reads its run's model and special_tokens (rl/model_io.py checkpoint_source)."""
    source = checkpoint_source(path, "--model") if is_checkpoint_dir(path) else None
    base = source.model_path if source else path
    config = load_model_config(base, "--model")  # one-line errors, shared with train (rl/model_io.py)
    return load_tokenizer(base, "--model", special_tokens=source.special_tokens if source else None), config


def _load_model(path: str, device: str):
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if is_checkpoint_dir(path):
        model = load_checkpoint_model(checkpoint_source(path, "--model"), "--model", dtype=dtype)
    else:
        model = load_model(path, "--model", dtype=dtype)
    set_threads(model, torch.device(device).type)  # the trainer's rule: 1 thread for a tiny CPU model
    return model.to(device).eval()


def _vllm_factory(model_path: str, tokenizer, max_model_len: int, seed: int,
                  gpu_memory_utilization: float) -> Callable[[int], Any]:
    """One vLLM engine per depth (vLLM fixes the loop count at load time via hf_overrides)."""
    def factory(depth: int):
        return make_worker("vllm", depth=depth, model_path=model_path, eos_token_id=tokenizer.eos_token_id,
                           max_model_len=max_model_len, seed=seed, gpu_memory_utilization=gpu_memory_utilization)

    return factory


DEFAULT_MAX_NEW_TOKENS = 256


def default_max_new_tokens(max_positions: int | None, longest_prompt: int) -> int:
    """`looprl eval` without --max_new_tokens: 256, lowered so that the longest prompt and its completion fit
    the model's positions, but never below half of them (longer prompts then keep their last tokens)."""
    if not max_positions:
        return DEFAULT_MAX_NEW_TOKENS
    return min(DEFAULT_MAX_NEW_TOKENS, max(max_positions - longest_prompt, max_positions // 2))


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.out:  # before minutes of generation, not after
            check_writable_file(args.out, "--out")
        model_path = str(args.model or EMBEDDED_MODEL)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 1.0)
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        check_spec_keys(args.rollout_draft_depth, args.rollout_num_draft, engine=args.engine)
        reward_kwargs = dict(parse_option(o) for o in args.option)
        try:
            _accuracy_fn(args.reward, reward_kwargs)  # before loading anything: dapo_math, a bad option
        except AccuracyError as e:
            raise ValueError(f"--reward: {e}") from None
        dataset = load_prompts(args.data, split=args.split, limit=args.limit)
        tokenizer, config = _load_tokenizer_and_config(model_path)
        if args.eos_token:
            apply_special_tokens(tokenizer, None, {"eos_token": args.eos_token})
        exit_rule = exit_rule_from_keys(args.rollout_exit_rule, args.rollout_exit_threshold, args.rollout_min_depth,
                                        depth=max_depth(config), engine=args.engine,
                                        speculative=bool(args.rollout_draft_depth or args.rollout_num_draft))
        if args.depths:
            depths = parse_depths(args.depths)
            check_depths("--depths", depths, max_depth(config))  # the same rule as train
        else:
            depths = list(range(1, max_depth(config) + 1))
        positions = getattr(config, "max_position_embeddings", None)
        if args.max_new_tokens is not None:
            prompt_room(positions, args.max_new_tokens)  # refused before anything else is done
        prompt_ids = encode_prompts(tokenizer, list(dataset["prompt"]), args.prompt_suffix)
        if args.max_new_tokens is None:
            args.max_new_tokens = default_max_new_tokens(positions, max((len(p) for p in prompt_ids), default=0))
        room = prompt_room(positions, args.max_new_tokens)
        model, factory = None, None
        if args.engine == "vllm":
            check_installed("vllm")
            if is_checkpoint_dir(model_path):
                raise ValueError(f"--model {model_path}: --engine vllm loads model directories; export the "
                                 f"checkpoint first: looprl export --checkpoint {model_path} --out DIR")
            longest = max((len(p) for p in prompt_ids), default=0)
            longest = min(longest, room or longest)  # prompts are left-truncated to the room (fit_prompts)
            # Engines of finished depths are released, but vLLM does not always hand memory back:
            # size each engine so that all of them would fit at once.
            factory = _vllm_factory(model_path, tokenizer, longest + args.max_new_tokens, args.seed,
                                    gpu_memory_utilization=min(0.5, 0.85 / len(depths)))
        else:
            model = _load_model(model_path, device)
        progress = not args.no_progress and sys.stderr.isatty()
        report: dict[str, Any] = {
            "model": model_path,
            "data": args.data,
            "split": args.split,
            "num_prompts": len(dataset),
            "n": args.n,
            "temperature": temperature,
            "max_new_tokens": args.max_new_tokens,
            "engine": args.engine,
            "seed": args.seed,
            "reward": args.reward,
            "reward_kwargs": reward_kwargs,
            "ignore_eos": args.ignore_eos,
        }
        report["depths"] = evaluate_depths(model, tokenizer, dataset, depths, n=args.n, temperature=temperature,
                                           max_new_tokens=args.max_new_tokens, reward_fn=args.reward,
                                           reward_kwargs=reward_kwargs, batch_size=args.batch_size, top_p=args.top_p, seed=args.seed,
                                           progress=progress, worker_factory=factory,
                                           draft_depth=args.rollout_draft_depth, num_draft=args.rollout_num_draft,
                                           prompt_suffix=args.prompt_suffix, ignore_eos=args.ignore_eos,
                                           max_positions=positions)
        if args.exit_threshold is not None:
            if model is None:
                model = _load_model(model_path, device)
            report["exit_threshold"] = evaluate_exit_threshold(
                model, tokenizer, dataset, args.exit_threshold, max_new_tokens=args.max_new_tokens,
                reward_fn=args.reward, reward_kwargs=reward_kwargs, batch_size=args.batch_size, progress=progress,
                prompt_suffix=args.prompt_suffix, max_positions=positions)
        if exit_rule is not None:
            report["exit_rule"] = evaluate_exit_rule(
                model, tokenizer, dataset, exit_rule, max_new_tokens=args.max_new_tokens,
                reward_fn=args.reward, reward_kwargs=reward_kwargs, batch_size=args.batch_size, progress=progress,
                prompt_suffix=args.prompt_suffix, max_positions=positions)
    except (ValueError, FileNotFoundError) as e:
        print(f"looprl eval: {e}", file=sys.stderr)
        return 2
    print_table(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
