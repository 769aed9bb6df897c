"""Length bucketing of the update's micro-batches: padding only shrinks, sizes stay capped, and every
process plans the same number of micro-batches (DDP makes the same number of backward calls)."""

import math
import random

from rl import batch
from rl.batch import Sample, length_buckets, own_filler, padded_width, shard_plan


def _padded(lengths: list[int], cuts: list[int]) -> int:
    return sum((b - a) * lengths[b - 1] for a, b in zip([0] + cuts[:-1], cuts))


def test_length_buckets_cover_cap_and_pad_less():
    rng = random.Random(0)
    lengths = sorted(8 + min(128, int(rng.expovariate(1 / 55))) for _ in range(64))
    cuts = length_buckets(lengths, max_size=64, overhead=256)
    assert cuts[-1] == 64 and cuts == sorted(set(cuts))
    assert len(cuts) > 1  # a long tail is worth splitting
    assert _padded(lengths, cuts) < 64 * max(lengths) * 0.75
    capped = length_buckets(lengths, max_size=10, overhead=256)
    assert all(b - a <= 10 for a, b in zip([0] + capped[:-1], capped))
    assert length_buckets([5] * 20, max_size=64, overhead=1) == [20]  # equal lengths: nothing to save
    assert length_buckets([], max_size=4) == []


def _sample(prompt_len: int, completion_len: int) -> Sample:
    return Sample(prompt_index=0, prompt_ids=[1] * prompt_len, completion_ids=[2] * completion_len,
                  rollout_logprobs=[0.0] * completion_len, truncated=False, reward=0.0, fn_rewards={},
                  correct=None, text="")


def test_shards_equal_count_on_every_rank():
    rng = random.Random(1)
    samples = [_sample(8, rng.choice([1, 2, 3, 120])) for _ in range(32)]
    samples[0::2] = [_sample(8, 2) for _ in range(16)]  # rank 0 gets short rows only: fewer buckets
    shards = [shard_plan(samples, rank=r, world=2, micro_batch_size=16) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    for rank, plan in enumerate(shards):
        real = [s for chunk in plan for s in chunk]
        assert sorted(map(id, real)) == sorted(map(id, samples[rank::2]))  # every local sample exactly once
        assert all(len(chunk) <= 16 for chunk in plan)
    assert [] in shards[0]  # the short rank pads with zero-weight dummies
    for rank, plan in enumerate(shards):  # the filler runs one of the rank's own rows: the shortest
        (filler,) = own_filler(plan)
        assert any(filler is s for s in samples[rank::2])
        assert filler.length == min(s.length for s in samples[rank::2])


def _widths(samples: list[Sample], plan: list[list[Sample]]) -> list[int]:
    return [len(chunk) * padded_width(chunk) for chunk in plan if chunk]


def test_token_budget_caps_padded_tokens_and_long_rows_run_alone():
    rng = random.Random(2)
    samples = [_sample(rng.randint(4, 40), rng.choice([3, 50, 200, 900])) for _ in range(48)]
    budget = 800
    plan = shard_plan(samples, rank=0, world=1, micro_batch_size=256, micro_batch_tokens=budget)
    assert sorted(map(id, (s for chunk in plan for s in chunk))) == sorted(map(id, samples))
    for chunk in plan:  # collate's width: longest prompt + longest completion
        assert len(chunk) * padded_width(chunk) <= budget or len(chunk) == 1
    assert any(padded_width(c) > budget for c in plan)  # the 900-token rows: alone, over the budget
    # off (0): the micro_batch_size rule alone, the same cuts as before the budget existed
    lengths = sorted(s.length for s in samples)
    assert length_buckets(lengths, 256) == length_buckets(lengths, 256, max_tokens=0)
    assert len(shard_plan(samples, 0, 1, 256)) < len(plan)
    # with ranks: equal counts, every local sample once, budget kept
    ranks = [shard_plan(samples, rank=r, world=3, micro_batch_size=4, micro_batch_tokens=budget) for r in range(3)]
    assert len({len(p) for p in ranks}) == 1
    for rank, plan in enumerate(ranks):
        assert sorted(map(id, (s for c in plan for s in c))) == sorted(map(id, samples[rank::3]))
        assert all(len(c) <= 4 and (len(c) * padded_width(c) <= budget or len(c) == 1) for c in plan if c)


def test_token_budget_counts_the_collated_width_not_the_longest_row():
    # a long prompt with a short completion and a short prompt with a long one: each row is 110 tokens,
    # but collated together they pad to 100 + 100 = 200 columns
    rows = [_sample(100, 10), _sample(10, 100)]
    assert [len(c) for c in shard_plan(rows, 0, 1, 8, micro_batch_tokens=300)] == [1, 1]
    assert [len(c) for c in shard_plan(rows, 0, 1, 8, micro_batch_tokens=400)] == [2]


def test_token_budget_balances_equal_rows():
    """8 equal rows, room for 7: two micro-batches either way, the 4 + 4 split peaks lower than 7 + 1."""
    rows = [_sample(64, 1024) for _ in range(8)]
    assert [len(c) for c in shard_plan(rows, 0, 1, 256, micro_batch_tokens=8192)] == [4, 4]


def _loop_length_buckets(lengths: list[int], max_size: int, overhead: int | None = None, *, max_tokens: int = 0,
                   prompt_lengths: list[int] | None = None) -> list[int]:
    """The plain double loop the numpy version replaced (the reference it must equal)."""
    overhead = batch.BUCKET_OVERHEAD_TOKENS if overhead is None else overhead
    n = len(lengths)
    if n == 0:
        return []
    prompts = prompt_lengths or [0] * n
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j rows
    peak = [0] * (n + 1)  # peak[j]: padded tokens of the biggest bucket of that plan
    cut_from = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]  # ascending: the last row of a bucket is its longest
        widest_prompt = widest_completion = 0
        for i in range(j - 1, max(0, j - max_size) - 1, -1):  # bucket rows i..j-1, growing downwards
            widest_prompt = max(widest_prompt, prompts[i])
            widest_completion = max(widest_completion, lengths[i] - prompts[i])
            width = widest_prompt + max(widest_completion, 1) if prompt_lengths else longest
            if max_tokens and i < j - 1 and (j - i) * width > max_tokens:
                break  # a bigger bucket only gets wider
            cost = best[i] + (j - i) * longest + overhead
            biggest = max(peak[i], (j - i) * width)
            # ties: the longest bucket (as an ascending scan with `<` picks); under a budget the one
            # whose biggest micro-batch is smallest first (e.g. 4 + 4 rows rather than 7 + 1: less memory)
            if cost < best[j] or (cost == best[j] and (not max_tokens or biggest <= peak[j])):
                best[j], peak[j], cut_from[j] = cost, biggest, i
    cuts, j = [], n
    while j > 0:
        cuts.append(j)
        j = cut_from[j]
    return cuts[::-1]


def test_length_buckets_equal_the_plain_double_loop_ties_and_caps_included():
    """Random small cases (ties are frequent with small integer lengths): same cuts as the plain loop."""
    import random

    rng = random.Random(0)
    for _ in range(1500):
        pairs = sorted(((rng.randint(1, 12), rng.randint(0, 15)) for _ in range(rng.randint(0, 30))),
                       key=lambda t: t[0] + t[1])
        lengths, prompts = [p + c for p, c in pairs], [p for p, _ in pairs]
        args = (lengths, rng.choice([1, 2, 3, 5, 8, 64]), rng.choice([0, 1, 5, 20, 256]))
        kw = dict(max_tokens=rng.choice([0, 0, 10, 30, 60, 200]), prompt_lengths=prompts if rng.random() < 0.6 else None)
        assert length_buckets(*args, **kw) == _loop_length_buckets(*args, **kw), (args, kw)
