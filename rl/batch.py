"""Pure batch helpers of the update: the Sample record, collation to tensors, length buckets, shard plans.

Nothing here holds state or touches a model, so each piece is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A micro-batch's fixed cost (kernel launches, Python, optimizer-free fwd/bwd overhead) in padded tokens:
# length bucketing only splits a micro-batch when that saves more padding than this.
BUCKET_OVERHEAD_TOKENS = 256


@dataclass
class Sample:
    """One scored completion, from rollout to update."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float]
    truncated: bool
    reward: float
    fn_rewards: dict[str, float | None]
    correct: float | None
    text: str
    advantage: float = 0.0
    skip: bool = False  # a reward function failed on it under reward_on_error: skip_group (its group is dropped)
    token_depths: list[int] | None = None  # adaptive rollouts: each completion token's depth (rollout.base.Rollout)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def trained_tokens(samples: list[Sample], mask_truncated: bool) -> int:
    """Completion tokens the loss sees (truncated completions count 0 under overlong filtering)."""
    return sum(0 if (mask_truncated and s.truncated) else len(s.completion_ids) for s in samples)


def collate(samples: list[Sample], pad_id: int, *, mask_truncated: bool, device: torch.device | str = "cpu",
            old_logprobs: list[list[float]] | None = None) -> dict:
    """Left-padded prompts, right-padded completions: completions all start at column `prompt_len`.

    Returns input_ids/attention_mask [B, P+C], completion_mask/rollout_logprobs(/old_logprobs) [B, C],
    advantages [B], real_len [B] (completion lengths) and prompt_len P; with adaptive rollouts also
    token_depths [B, C] (each completion token's depth, 0 on padding).
    """
    p_len = max(len(s.prompt_ids) for s in samples)
    c_len = max(max(len(s.completion_ids) for s in samples), 1)
    ids = torch.full((len(samples), p_len + c_len), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros((len(samples), c_len))
    rollout_lp = torch.zeros((len(samples), c_len))
    old_lp = torch.zeros((len(samples), c_len)) if old_logprobs is not None else None
    for i, s in enumerate(samples):
        p, c = s.prompt_ids, s.completion_ids
        ids[i, p_len - len(p):p_len] = torch.tensor(p)
        ids[i, p_len:p_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, p_len - len(p):p_len + len(c)] = 1
        cmask[i, :len(c)] = 0.0 if (mask_truncated and s.truncated) else 1.0
        rollout_lp[i, :len(c)] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        if old_lp is not None:
            old_lp[i, :len(c)] = torch.tensor(old_logprobs[i], dtype=torch.float32)
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "rollout_logprobs": rollout_lp,
             "advantages": adv, "prompt_len": p_len,
             "real_len": torch.tensor([len(s.completion_ids) for s in samples])}
    if old_lp is not None:
        batch["old_logprobs"] = old_lp
    if any(s.token_depths is not None for s in samples):
        depths = torch.zeros((len(samples), c_len), dtype=torch.long)
        for i, s in enumerate(samples):
            depths[i, :len(s.token_depths)] = torch.tensor(s.token_depths, dtype=torch.long)
        batch["token_depths"] = depths
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def exit_mask(batch: dict) -> torch.Tensor:
    """[B, S] positions whose next-token prediction is a trained completion token (for exit terms)."""
    ids, p_len, cmask = batch["input_ids"], batch["prompt_len"], batch["completion_mask"]
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    mask[:, p_len - 1:ids.shape[1] - 1] = cmask.bool()
    return mask


def padded_width(samples: list[Sample]) -> int:
    """Columns of the collated micro-batch: longest prompt + longest completion (collate's layout)."""
    return max(len(s.prompt_ids) for s in samples) + max(max(len(s.completion_ids) for s in samples), 1)


def length_buckets(lengths: list[int], max_size: int, overhead: int | None = None, *, max_tokens: int = 0,
                   prompt_lengths: list[int] | None = None) -> list[int]:
    """End indices of consecutive buckets of the ascending `lengths`, each at most `max_size` rows.

    Minimises padded tokens (rows x longest row, summed over buckets) plus `overhead` tokens per
    bucket, by dynamic programming over the cut points. One bucket of everything is what plain
    fixed-size chunking pads to; the update's forward/backward cost is linear in padded tokens.

    max_tokens > 0 (micro_batch_tokens) also caps each bucket's padded tokens, rows x padded width,
    where the width is the longest row, or with `prompt_lengths` collate's: longest prompt + longest
    completion. A single row wider than the cap still gets a bucket of its own. Among plans of equal
    cost it then takes the one whose biggest bucket is smallest (the update's peak memory).
    """
    overhead = BUCKET_OVERHEAD_TOKENS if overhead is None else overhead
    n = len(lengths)
    if n == 0:
        return []
    # numpy over each bucket end j's candidate starts i (the update calls this every step: the plain
    # double loop over 256 rows took ~35 ms of a ~250 ms CPU update)
    length = np.asarray(lengths, dtype=np.int64)
    prompt = np.asarray(prompt_lengths if prompt_lengths else [0] * n, dtype=np.int64)
    completion = length - prompt
    best = np.full(n + 1, np.inf)  # best[j]: cost of the first j rows
    best[0] = 0.0
    peak = np.zeros(n + 1, dtype=np.int64)  # peak[j]: padded tokens of the biggest bucket of that plan
    cut_from = [0] * (n + 1)
    for j in range(1, n + 1):
        lo = max(0, j - max_size)
        rows = j - np.arange(lo, j)  # bucket rows i..j-1 for i = lo..j-1
        longest = int(length[j - 1])  # ascending: the last row of a bucket is its longest
        if prompt_lengths:  # collate's width: longest prompt + longest completion of the bucket
            widest_prompt = np.maximum.accumulate(prompt[lo:j][::-1])[::-1]
            widest_completion = np.maximum.accumulate(completion[lo:j][::-1])[::-1]
            width = widest_prompt + np.maximum(widest_completion, 1)
        else:
            width = np.full(j - lo, longest, dtype=np.int64)
        tokens = rows * width
        cost = best[lo:j] + rows * longest + overhead
        biggest = np.maximum(peak[lo:j], tokens)
        if max_tokens:  # a bucket over the cap is out, unless it is one row (a wider one only gets wider)
            cost = np.where((tokens <= max_tokens) | (rows == 1), cost, np.inf)
        # the cheapest; ties: the longest bucket (smallest i), and under a budget first the one whose biggest
        # micro-batch is smallest (e.g. 4 + 4 rows rather than 7 + 1: less memory)
        cheapest = cost == cost.min()
        if max_tokens:
            cheapest &= biggest == biggest[cheapest].min()
        i = lo + int(np.flatnonzero(cheapest)[0])
        best[j], peak[j], cut_from[j] = cost[i - lo], biggest[i - lo], i
    cuts, j = [], n
    while j > 0:
        cuts.append(j)
        j = cut_from[j]
    return cuts[::-1]


def shard_plan(samples: list[Sample], rank: int, world: int, micro_batch_size: int, *,
               micro_batch_tokens: int = 0) -> list[list[Sample]]:
    """This process's micro-batches of a mini-batch; equal counts on every process (DDP needs it).

    Samples are sorted by length and cut into length buckets of at most micro_batch_size, so each
    micro-batch pads only to its own longest row (the loss does not depend on the grouping: its
    normaliser is the mini-batch's). micro_batch_tokens > 0 also caps each micro-batch's padded
    tokens (its memory); a sample wider than that runs alone. Every process plans every rank's
    buckets (all see all samples), so all agree on the count; a rank with fewer buckets runs
    zero-weight dummies (empty lists).
    """
    plans = []
    for r in range(world):
        local = sorted(samples[r::world], key=lambda s: s.length)
        cuts = length_buckets([s.length for s in local], micro_batch_size, max_tokens=micro_batch_tokens,
                              prompt_lengths=[len(s.prompt_ids) for s in local])
        plans.append([local[a:b] for a, b in zip([0] + cuts[:-1], cuts)])
    count = max(len(p) for p in plans)
    mine = plans[rank]
    return mine + [[] for _ in range(count - len(mine))]


def own_filler(plan: list[list[Sample]]) -> list[Sample]:
    """The rows of this process's zero-weight filler micro-batch (the empty lists of its shard plan).

    Its shortest row of the mini-batch: cheap to run, and a row this process owns, so what the update
    keeps per own row (the old log-probs scored before the first optimizer step) has it. A row of
    another process is not there: with several updates per step that was a KeyError on every rank
    but the first whenever completion lengths gave the processes different bucket counts.
    """
    return [min((s for chunk in plan for s in chunk), key=lambda s: s.length)]
