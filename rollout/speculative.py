"""Self-speculative decoding for looped LMs: draft with the exit after d loops, verify with the exit after T.

Why it is cheap for a looped model: loop t at position i only reads loop t-1 states of positions <= i,
so the loops 1..d a draft computes for a token are exactly the loops 1..d the depth-T model needs for
it. A round therefore costs k+1 single-token passes through loops 1..d (the k drafted tokens plus the
token fed at the start of the round, which also gives the last draft its loops 1..d) and ONE pass of
loops d+1..T over those k+1 tokens together, instead of k+1 sequential depth-T steps. On an
overhead-bound decoder (small models, small batches, CPU) that saves sequential steps; on a
compute-bound batch every rejected draft costs real FLOPs (see docs/BENCHMARKS.md).

One round, per row, starting from the last emitted token x0 (not yet in the cache):
  1. draft: feed x0, y1, ..., yk through loops 1..d at the row's next cache columns; y_{i+1} is drawn
     from the draft distribution q_i of the exit after loop d;
  2. verify: run loops d+1..T on the k+1 loop-d states at once -> target distributions p_0..p_k;
  3. accept y_i while accepted so far and u_i < p(y_i) / q(y_i) (greedy: while argmax p == y_i); the
     first rejected position emits a token from norm(max(0, p - q)) (greedy: argmax p), and a fully
     accepted draft emits a bonus token from p_k. So a round emits accepted + 1 tokens per row;
  4. the K/V of rejected drafts are "truncated" by never being attended to: each row's cache
     columns stay contiguous (a row's next round starts right after its last accepted token and
     overwrites the rejected columns in every loop's slot), and the attention bias only admits a
     row's own prompt tokens and columns at or before the query. Rows therefore sit at different
     columns; `OuroDecodeStep.run_loops` writes and reads per-row columns.

Distributions (the worker's convention, rollout/sampling.py): target p = softmax of the top-k/top-p
truncated depth-T logits / temperature, i.e. exactly what plain depth-T decoding draws from; draft
q = the same transform of the depth-d logits. Standard speculative sampling then emits tokens with
exactly the distribution of plain depth-T sampling (for any q). Returned logprobs are the depth-T
logprobs of the emitted tokens under the usual convention (untruncated log softmax(logits_T / temp)),
read from the verification pass, never the draft's. Random draws differ from plain decoding with
the same seed, so the samples differ; their distribution does not.
"""

from __future__ import annotations

import torch

from rollout.base import SamplingParams, SpecConfig
from rollout.sampling import race_draw, sample_next, sampling_probs, scale_logits

# ------------------------------------------------------------------ trainer / eval keys
# `rollout_draft_depth` and `rollout_num_draft` (0 = off) of `looprl train` and `looprl eval` map to a
# SpecConfig here, so the trainer and the eval CLI need one line each.


def check_spec_keys(draft_depth: int, num_draft: int, depth: int | None = None, engine: str = "torch") -> None:
    """ValueError naming the key when rollout_draft_depth / rollout_num_draft cannot run."""
    for key, value in (("rollout_draft_depth", draft_depth), ("rollout_num_draft", num_draft)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config key {key!r}: must be an integer >= 0 (0 = off), got {value!r}")
    if (draft_depth == 0) != (num_draft == 0):
        raise ValueError("config keys 'rollout_draft_depth' and 'rollout_num_draft': set both (speculative "
                         f"rollouts) or neither, got {draft_depth} and {num_draft}")
    if draft_depth and engine != "torch":
        raise ValueError(f"config key 'rollout_draft_depth': speculative rollouts need engine torch, not {engine!r}")
    if draft_depth and depth is not None and draft_depth >= depth:
        raise ValueError(f"config key 'rollout_draft_depth': {draft_depth} must be below the rollout depth {depth}")


def spec_config(draft_depth: int, num_draft: int, depth: int) -> SpecConfig | None:
    """SamplingParams.speculative for these keys at rollout depth `depth`; None = plain decoding (keys off,
    or a depth the draft cannot be shallower than, e.g. the shallow depths of `looprl eval`)."""
    check_spec_keys(draft_depth, num_draft)
    if draft_depth == 0 or depth <= draft_depth:
        return None
    return SpecConfig(draft_depth=draft_depth, num_draft=num_draft)


SUMMED_STATS = ("drafted", "accepted", "verify_rows")


def accumulate_stats(totals: dict[str, float], stats: dict[str, float]) -> None:
    """Add one generate() call's speculative counters into `totals` (in place; no-op for plain rollouts)."""
    for key in SUMMED_STATS:
        if key in stats:
            totals[f"spec_{key}"] = totals.get(f"spec_{key}", 0.0) + stats[key]


def rollout_metrics(totals: dict[str, float], rollout_seconds: float, generated_tokens: int) -> dict[str, float]:
    """`time/rollout_per_token` (seconds per generated token) always; `rollout/accept_rate` and `rollout/tokens_per_verify` when drafts ran."""
    metrics = {"time/rollout_per_token": rollout_seconds / max(generated_tokens, 1)}
    drafted, rows = totals.get("spec_drafted", 0.0), totals.get("spec_verify_rows", 0.0)
    if drafted:
        accepted = totals.get("spec_accepted", 0.0)
        metrics["rollout/accept_rate"] = accepted / drafted
        metrics["rollout/tokens_per_verify"] = (accepted + rows) / rows
    return metrics


# ------------------------------------------------------------------ decoding


def accept_greedy(scaled: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification. scaled: [B, k+1, V] depth-T scores; drafts: [B, k].

    Returns (accepted [B]: length of the prefix of drafts equal to the depth-T argmax, next [B]: the
    depth-T argmax right after that prefix), so the output equals plain depth-T greedy decoding."""
    target = scaled.argmax(dim=-1)  # [B, k+1]
    accepted = (target[:, :-1] == drafts).long().cumprod(dim=-1).sum(dim=-1)
    return accepted, target.gather(1, accepted.unsqueeze(1)).squeeze(1)


def accept_sampled(
    target: torch.Tensor, draft: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling. target: [B, k+1, V] depth-T sampling probabilities p_0..p_k; draft: [B, k, V]
    the draft probabilities q_0..q_{k-1} each draft was drawn from; drafts: [B, k].

    Accept y_i with probability min(1, p(y_i) / q(y_i)) while all before it were accepted; at the first
    rejection draw from norm(max(0, p - q)); after k acceptances draw the bonus token from p_k.
    Returns (accepted [B], next token [B])."""
    batch, k = drafts.shape
    index = drafts.unsqueeze(-1)
    p_draft = target[:, :k].gather(-1, index).squeeze(-1)
    q_draft = draft.gather(-1, index).squeeze(-1)  # > 0: the draft was drawn from q
    u = torch.rand((batch, k), generator=generator, device=drafts.device)
    ok = u * q_draft < p_draft  # u < p / q; always true when p >= q
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(batch, device=drafts.device)
    p_next = target[rows, accepted]  # [B, V]
    q_next = draft[rows, accepted.clamp(max=k - 1)] * (accepted < k).unsqueeze(1)  # 0 for the bonus token
    residual = (p_next - q_next).clamp_min(0)
    # p == q in floating point can leave nothing (rejection is then impossible anyway): fall back to p.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    return accepted, race_draw(residual, generator)


def speculative_decode(worker, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator):
    """Decode with drafts at `params.speculative.draft_depth` verified at `worker.depth`.

    Same contract as TorchRolloutWorker._decode (prefill and the first token as in plain decoding);
    returns (tokens, logprobs, lengths, stopped, stats) with python lists per sample row (prompt-major)
    and stats: `accept_rate` (accepted / drafted tokens), `tokens_per_verify` (tokens emitted per
    row per verification pass, 1..k+1), `verify_passes` (batched rounds), `verify_rows` (row-rounds),
    `drafted`, `accepted`.
    """
    spec = params.speculative
    step = worker._fast
    draft_depth, k, depth = spec.draft_depth, spec.num_draft, worker.depth
    device = worker._device()
    n, max_new = params.n, params.max_new_tokens
    temperature, top_k, top_p = params.temperature, params.top_k, params.top_p
    greedy = params.greedy
    batch = len(prompts) * n
    # k spare columns: a round may draft past max_new_tokens (those tokens are dropped).
    cache, logits, mask, prompt_lens, width, _ = worker._prefill(prompts, n, max_new + k, device)
    step.refresh()
    step.bind(cache)
    embed, rotary, lm_head = step.backbone.embed_tokens, step.backbone.rotary_emb, worker.model.lm_head

    stop_ids = params.stop_ids(worker.eos_token_ids)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    can_compact = callable(getattr(cache, "reorder_cache", None))

    out_tokens = torch.full((batch, max_new + k + 1), worker.pad_token_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, max_new + k + 1), dtype=torch.float32, device=device)
    lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)  # original row of each computed row
    emitted = torch.zeros(batch, dtype=torch.long, device=device)  # tokens emitted per computed row
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    offsets = torch.arange(k + 1, device=device)

    def commit(block: torch.Tensor, block_logprobs: torch.Tensor, count: torch.Tensor) -> None:
        """Append the first `count` tokens of each row's block; record the first stop / max_new_tokens."""
        nonlocal done
        cols = emitted.unsqueeze(1) + offsets[: block.shape[1]]
        # Finished rows still in the batch write past their length; clamping keeps those writes in bounds.
        at = (rows.unsqueeze(1), cols.clamp(max=out_tokens.shape[1] - 1))
        out_tokens[at] = block
        out_logprobs[at] = block_logprobs
        if stop is not None:
            valid = (offsets[: block.shape[1]] < count.unsqueeze(1)) & (cols < max_new)
            hits = torch.isin(block, stop) & valid
            hit = hits.any(dim=1)
            first = hits.long().argmax(dim=1)
            lengths[rows] = torch.where(hit, emitted + first + 1, lengths[rows])
            stopped[rows] |= hit
            done = done | hit
        emitted.add_(count)
        done = done | (emitted >= max_new)

    token, logprob = sample_next(logits, temperature, top_k, top_p, generator)
    commit(token.unsqueeze(1), logprob.unsqueeze(1), torch.ones_like(emitted))
    rounds = verify_rows = 0
    accepted_total = torch.zeros((), dtype=torch.long, device=device)  # on device: no extra host sync per round
    while True:
        live = int((~done).sum())
        if live == 0:
            break
        if can_compact and live <= worker.compact_below * done.numel():
            keep = (~done).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            step.bind(cache)
            rows, emitted, token, done = rows[keep], emitted[keep], token[keep], done[keep]
            mask, prompt_lens = mask[keep], prompt_lens[keep]
        # Finished rows that were not compacted away keep computing (harmlessly) at clamped columns.
        start = emitted.clamp(max=max_new) - 1
        cols = (width + start).unsqueeze(1) + offsets  # [B, k+1] cache columns of x0, y1..yk
        positions = (prompt_lens + start).unsqueeze(1) + offsets
        span = int(cols.max()) + 1
        allowed = mask[:, None, :span].bool() & (torch.arange(span, device=device) <= cols.unsqueeze(2))
        bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))  # [B, k+1, C]
        hidden = embed(token).unsqueeze(1)
        cos, sin = rotary(hidden, positions)  # [B, k+1, D], shared by the draft and the verify pass

        states, drafts, draft_probs = [], [], []
        for i in range(k + 1):
            state = step.run_loops(
                hidden, cos[:, i : i + 1], sin[:, i : i + 1], cols[:, i : i + 1], bias[:, i : i + 1],
                range(draft_depth),
            )
            states.append(state)
            if i == k:  # the last draft only needed its loops 1..d
                break
            scaled, log_norm = scale_logits(lm_head(state[:, 0]), temperature)
            if greedy:
                token = scaled.argmax(dim=-1)
            else:
                probs = sampling_probs(scaled, log_norm, top_k, top_p)
                token = race_draw(probs, generator)
                draft_probs.append(probs)
            drafts.append(token)
            hidden = embed(token).unsqueeze(1)

        deep = step.run_loops(torch.cat(states, dim=1), cos, sin, cols, bias, range(draft_depth, depth))
        scaled, log_norm = scale_logits(lm_head(deep), temperature)  # [B, k+1, V]
        drafted_tokens = torch.stack(drafts, dim=1)  # [B, k]
        if greedy:
            accepted, token = accept_greedy(scaled, drafted_tokens)
        else:
            target = sampling_probs(scaled, log_norm, top_k, top_p)
            accepted, token = accept_sampled(target, torch.stack(draft_probs, dim=1), drafted_tokens, generator)
        block = torch.cat([drafted_tokens, token.unsqueeze(1)], dim=1)
        block.scatter_(1, accepted.unsqueeze(1), token.unsqueeze(1))  # slot `accepted` holds the new token
        block_logprobs = (scaled.gather(-1, block.unsqueeze(-1)) - log_norm).squeeze(-1)
        count = torch.where(done, 0, accepted + 1)

        rounds += 1
        verify_rows += live
        accepted_total += accepted.masked_fill(done, 0).sum()
        commit(block, block_logprobs, count)

    step.release()
    del cache
    accepted_total, drafted = int(accepted_total), verify_rows * k
    stats = {
        "accept_rate": accepted_total / drafted if drafted else 0.0,
        "tokens_per_verify": (accepted_total + verify_rows) / verify_rows if verify_rows else 0.0,
        "verify_passes": float(rounds),
        "verify_rows": float(verify_rows),
        "drafted": float(drafted),
        "accepted": float(accepted_total),
    }
    lengths = lengths.tolist()
    return out_tokens[:, :max_new].tolist(), out_logprobs[:, :max_new].tolist(), lengths, stopped.tolist(), stats
