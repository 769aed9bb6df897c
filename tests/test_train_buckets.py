"""Length bucketing of the update's micro-batches: padding only shrinks, sizes stay capped, and every
process plans the same number of micro-batches (DDP makes the same number of backward calls)."""

import random

from rl.batch import Sample, length_buckets, own_filler, shard_plan


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
