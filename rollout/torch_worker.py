"""TorchRolloutWorker: our own batched decode loop at a fixed depth (CPU and GPU).

Why not `model.generate`: the update must score the very policy that sampled, so every token is
produced with exactly `depth` loops and its fp32 logprob is returned; and rollouts dominate RL wall
time, so the loop avoids generate's per-step machinery (logits processors, stopping criteria,
growing caches).

One generate() call:
  1. prefill each distinct prompt once (left-padded batch, explicit position ids, last-position
     logits only) into a preallocated static KV cache (one slot per loop and layer for looped
     models via `model.make_static_cache`, transformers' StaticCache otherwise);
  2. fan the cache out to the n samples of each prompt (prompt-major) with `reorder_cache`;
  3. decode one token per step for all live rows; rows stop on their own stop token; when enough
     rows have finished, the cache and the row state are compacted so finished rows cost nothing.
     For Ouro-layout models each step is the fused OuroDecodeStep (looped/fast_decode.py, checked
     against the model's forward on first use, and on every call for a model with LoRA adapters,
     whose fused weights include the adapter's delta); otherwise the model's own forward with
     `depth=`, the 2-D mask, explicit position ids and `logits_to_keep=1`.
The cache is allocated once per generate() call (never per step); sampling uses the worker's own
torch.Generator seeded from SamplingParams.seed.
Logprob convention: see rollout/sampling.py (untruncated log softmax(logits / T), fp32).

`SamplingParams(speculative=SpecConfig(draft_depth=d, num_draft=k))` switches step 3 to self-speculative
decoding (rollout/speculative.py): same prefill and first token, then rounds of k drafts at depth d
verified at the worker's depth; same output distribution and logprobs, different speed.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch

from looped.adapters import is_adapter_layer
from looped.facts import is_looped, max_depth
from looped.fast_decode import OuroDecodeStep
from looped.hf_compat import StaticCache
from rollout.base import ExitRule, Rollout, SamplingParams, as_id_list, checkpoint_name
from rollout.exit_rules import ExitDecider, decide_from_exits, project_skipped_kv
from rollout.sampling import sample_next
from rollout.speculative import speculative_decode


class TorchRolloutWorker:
    """Fixed-depth sampler over a model object (an Ouro looped LM or any HF causal LM at depth 1).

    Args:
        model: the rollout model. Looped models (looped.facts.is_looped) build per-loop caches and take `depth=`.
        depth: loops per token; None means the model's T (looped.facts.max_depth; 1 if not looped).
        eos_token_id: stop token(s) used when `SamplingParams.stop_token_ids` is None; defaults to
            the model's generation_config / config EOS.
        pad_token_id: filler for left padding; defaults to the model's pad, else the first EOS, else 0.
        fast_decode: use the fused Ouro decode step when the model has the Ouro layout (same outputs,
            fewer ops); False always decodes through the model's own forward.
    """

    # Compact the batch when live rows fall to this fraction of the rows being computed. The copy
    # costs about one decode step's KV read, so it pays after a few steps.
    compact_below: float = 0.75

    def __init__(
        self, model, depth: int | None = None, eos_token_id=None, pad_token_id=None, fast_decode: bool = True
    ):
        self.model = model
        self.looped = is_looped(model)
        config = model.config
        if depth is None:
            depth = max_depth(model)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"TorchRolloutWorker: depth must be an integer >= 1, got {depth!r}")
        if not self.looped and depth != 1:
            raise ValueError(
                f"TorchRolloutWorker: depth={depth} but {type(model).__name__} is not a looped model "
                "(looped.facts.is_looped); use depth=1"
            )
        self.depth = depth
        gen_config = getattr(model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(gen_config, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = getattr(config, "eos_token_id", None)
        self.eos_token_ids = as_id_list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(gen_config, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(config, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(as_id_list(pad_token_id)[0])
        self.vocab_size = model.get_input_embeddings().num_embeddings
        forward_params = inspect.signature(model.forward).parameters
        # Older HF architectures lack `logits_to_keep`; then the full logits are computed and sliced.
        self._keep_last = "logits_to_keep" in forward_params
        # transformers >= 5.24 calls the KV cache argument `cache`; earlier releases (and remote code written
        # for them) call it `past_key_values`. Ask the model which one its forward takes.
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # Fused decode step for Ouro-layout models; verified against the model's forward on first use.
        self._fast = OuroDecodeStep(model, depth) if fast_decode and OuroDecodeStep.supports(model) else None
        self._fast_verified = False
        # LoRA adapters (peft) change the fused weights at every update: check the step on every call
        self._reverify = any(is_adapter_layer(m) for m in model.modules())

    @property
    def uses_fast_decode(self) -> bool:
        return self._fast is not None

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Copy `model`'s parameters and buffers into the rollout model in place (no reallocation).

        Accepts a model wrapped by DDP / torch.compile / checkpointing (wrapper name parts are ignored).
        """
        if model is self.model:
            return
        targets = dict(self.model.named_parameters())
        targets.update(dict(self.model.named_buffers()))
        seen = set()
        sources = list(model.named_parameters()) + list(model.named_buffers())
        for name, tensor in sources:
            clean = checkpoint_name(name)
            target = targets.get(clean)
            if target is None:
                raise ValueError(f"sync_weights: source tensor {name!r} has no counterpart in the rollout model")
            if target.shape != tensor.shape:
                raise ValueError(
                    f"sync_weights: shape mismatch for {clean!r}: rollout {tuple(target.shape)} "
                    f"vs source {tuple(tensor.shape)}"
                )
            target.copy_(tensor.detach())
            seen.add(clean)
        missing = [name for name, _ in self.model.named_parameters() if name not in seen]
        if missing:
            raise ValueError(f"sync_weights: source model lacks parameters {missing[:5]} (of {len(missing)})")

    # ------------------------------------------------------------------ lifecycle
    def sleep(self, level: int = 1) -> None:
        """Nothing to release: the worker holds no memory between generate() calls (the model is the trainer's)."""

    def wake_up(self) -> None:
        """Nothing to restore (see sleep)."""

    def close(self) -> None:
        """Nothing to shut down (no engine of its own)."""

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        prompts = self._check_prompts(prompt_ids)
        if params.adaptive:
            self._check_adaptive(params)
        if params.speculative is not None:
            self._check_speculative(params)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if self._fast is not None and (self._reverify or not self._fast_verified):
                    self._verify_fast_decode()
                stats: dict[str, float] = {}
                depths = None
                if params.speculative is None:
                    tokens, logprobs, lengths, stopped, depths = self._decode(prompts, params)
                else:
                    if self._fast is None:
                        raise ValueError("speculative decoding needs the fused Ouro decode step, which failed "
                                         "its check against this model's forward")
                    generator = self._generator(params.seed)
                    tokens, logprobs, lengths, stopped, stats = speculative_decode(self, prompts, params, generator)
        finally:
            self.model.train(was_training)
        n = params.n
        rollout = Rollout(depth=self.depth, stats=stats, token_depths=[] if params.adaptive else None)
        for row, (toks, lps, length, hit) in enumerate(zip(tokens, logprobs, lengths, stopped)):
            if params.adaptive:
                rollout.token_depths.append(depths[row][:length])
            rollout.prompt_ids.append(list(prompts[row // n]))
            rollout.completion_ids.append(toks[:length])
            rollout.logprobs.append(lps[:length])
            rollout.finish_reasons.append("stop" if hit else "length")
        return rollout

    def _check_adaptive(self, params: SamplingParams) -> None:
        if not self.looped:
            raise ValueError(f"SamplingParams.exit_rule {params.exit_rule.kind!r} needs a looped model; "
                             f"{type(self.model).__name__} has one exit")
        if params.speculative is not None:
            raise ValueError("SamplingParams: an adaptive exit_rule and speculative decoding cannot be combined "
                             "(speculative decoding verifies at the fixed depth)")
        if params.exit_rule.min_depth > self.depth:
            raise ValueError(f"ExitRule.min_depth {params.exit_rule.min_depth} exceeds the rollout depth {self.depth}")

    def _decider(self, rule: ExitRule, temperature: float, batch: int, device: torch.device) -> ExitDecider:
        backbone = self.model.model
        return ExitDecider(rule, self.depth, temperature, self.model.lm_head,
                           lambda h: backbone.exit_gate_logits((h,)).squeeze(-1), batch, device)

    def _kv_lists(self, cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        slots = self.depth * self.model.config.num_hidden_layers
        return [cache.layers[s].keys for s in range(slots)], [cache.layers[s].values for s in range(slots)]

    def _adaptive_readout(self, exits: list[torch.Tensor], cache, column: int, position: torch.Tensor,
                          params: SamplingParams):
        """The rule over exits already computed (prefill's last position, the plain decode path): the chosen
        exits' logits and depths; the skipped loops' K/V at `column` follow the K/V rule (rollout/exit_rules.py)."""
        decider = self._decider(params.exit_rule, params.temperature, exits[0].shape[0], exits[0].device)
        decide_from_exits(decider, exits)
        keys, values = self._kv_lists(cache)
        project_skipped_kv(self.model, keys, values, decider.depth, decider.states, column, position)
        return decider.logits, decider.depth

    def _check_speculative(self, params: SamplingParams) -> None:
        spec = params.speculative
        if self._fast is None:
            raise ValueError(
                "SamplingParams.speculative needs an Ouro-layout looped model and fast_decode=True "
                f"(the drafts and the verify pass run through looped/fast_decode.py); got {type(self.model).__name__}"
            )
        if not spec.draft_depth < self.depth:
            raise ValueError(
                f"SpecConfig.draft_depth={spec.draft_depth} must be below the rollout depth {self.depth}"
            )

    def _generator(self, seed: int | None) -> torch.Generator:
        """The worker's own RNG: seeded from SamplingParams.seed, fresh entropy when None."""
        generator = torch.Generator(device=self._device())
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        return generator

    def _check_prompts(self, prompt_ids) -> list[list[int]]:
        if isinstance(prompt_ids, torch.Tensor) or not isinstance(prompt_ids, Sequence) or not prompt_ids:
            raise ValueError("generate: prompt_ids must be a non-empty list of token-id lists")
        prompts = []
        for i, prompt in enumerate(prompt_ids):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0:
                raise ValueError(f"generate: prompt_ids[{i}] must be a non-empty list of token ids")
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"generate: prompt_ids[{i}] has token id {bad[0]} outside [0, {self.vocab_size})")
            prompts.append(ids)
        return prompts

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _new_cache(self, batch_size: int, max_len: int, device: torch.device):
        if self.looped:
            return self.model.make_static_cache(batch_size, max_len, depth=self.depth, device=device)
        return StaticCache(config=self.model.config, max_cache_len=max_len)

    def _forward(self, input_ids, attention_mask, position_ids, cache, start: int, exits: bool = False):
        """Last-position logits [B, V]; with `exits`, every loop's normed state at the last position instead."""
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        if self.looped:
            kwargs["depth"] = self.depth
            kwargs["cache_position"] = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            if exits:
                kwargs["output_exits"] = True
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_arg: cache},
            **kwargs,
        )
        if exits:
            return [h[:, -1] for h in out.exit_hidden_states]
        return out.logits[:, -1]

    def _verify_fast_decode(self) -> None:
        """Compare one fused decode step with the model's own cached forward (left-padded batch of 2);
        on disagreement warn and use the model's forward from now on."""
        device = self._device()
        fast = self._fast
        fast.refresh()
        ids = torch.tensor([[1, 2, 3], [self.pad_token_id, 4, 5]], device=device) % self.vocab_size
        mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], device=device)
        positions = torch.tensor([[0, 1, 2], [0, 0, 1]], device=device)
        caches = [self._new_cache(2, 4, device) for _ in range(2)]
        token = self._forward(ids, mask[:, :3], positions, caches[0], start=0).argmax(-1)
        self._forward(ids, mask[:, :3], positions, caches[1], start=0)
        next_pos = torch.tensor([3, 2], device=device)
        expected = self._forward(token[:, None], mask, next_pos[:, None], caches[0], start=3).float()
        fast.bind(caches[1])
        bias = torch.zeros(mask.shape, device=device).masked_fill(mask == 0, float("-inf"))
        got = fast(token, next_pos, 3, bias).float()
        fast.release()
        tol = (1e-3 if self.model.dtype == torch.float32 else 5e-2) * (1 + expected.abs().max())
        if not (got - expected).abs().max() <= tol:
            warnings.warn(
                f"TorchRolloutWorker: the fused Ouro decode step disagrees with {type(self.model).__name__}'s "
                "forward; falling back to the model's forward for decoding",
                stacklevel=3,
            )
            self._fast = None
        self._fast_verified = True

    def _prefill(self, prompts: list[list[int]], n: int, max_new: int, device: torch.device,
                 params: SamplingParams | None = None):
        """Prefill each distinct prompt once (left-padded) and fan the cache out to its n samples.

        Returns (cache, last-position logits [B, V], mask [B, width + max_new], prompt lengths [B], width,
        depth [B] of those logits or None) with rows in prompt-major order. The mask is 1 on real prompt tokens
        and on every future column. Every prompt position runs all T loops; with an adaptive exit rule the
        first token's logits are the exit the rule picks at the last prompt position (its recorded depth),
        and that position's deeper K/V follow the K/V rule (rollout/exit_rules.py).
        """
        adaptive = params is not None and params.adaptive
        num_prompts = len(prompts)
        prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
        width = int(max(len(p) for p in prompts))
        max_len = width + max_new
        input_ids = torch.tensor(
            [[self.pad_token_id] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device
        )
        columns = torch.arange(max_len, device=device)
        pad_cols = (width - prompt_lens).unsqueeze(1)
        mask = (columns.unsqueeze(0) >= pad_cols).long()
        position_ids = (columns[:width].unsqueeze(0) - pad_cols).clamp_min(0)
        expand = torch.arange(num_prompts, device=device).repeat_interleave(n)

        cache = self._new_cache(num_prompts, max_len, device)
        can_fan_out = callable(getattr(cache, "reorder_cache", None))
        if n > 1 and not can_fan_out:  # a cache without row selection: prefill every sample row
            cache = self._new_cache(len(expand), max_len, device)
            input_ids, mask, position_ids = input_ids[expand], mask[expand], position_ids[expand]
        out = self._forward(input_ids, mask[:, :width], position_ids, cache, start=0, exits=adaptive)
        logits, depth = self._adaptive_readout(out, cache, width - 1, prompt_lens - 1, params) if adaptive \
            else (out, None)
        if n > 1 and can_fan_out:
            cache.reorder_cache(expand)
            logits, mask = logits[expand], mask[expand]
            depth = depth[expand] if depth is not None else None
        return cache, logits, mask, prompt_lens[expand], width, depth

    def _decode(self, prompts: list[list[int]], params: SamplingParams):
        """Prefill, then sample one token per step for every live row until max_new_tokens or all stopped.

        Returns python lists (tokens, logprobs, lengths, stopped) per sample row (prompt-major)."""
        device = self._device()
        n, max_new = params.n, params.max_new_tokens
        batch = len(prompts) * n
        cache, logits, mask, next_pos, width, depth = self._prefill(prompts, n, max_new, device, params)
        adaptive = depth is not None
        fast = self._fast
        if fast is not None:
            fast.refresh()
            fast.bind(cache)
            bias = torch.zeros(mask.shape, device=device).masked_fill(mask == 0, float("-inf"))

        generator = self._generator(params.seed)

        stop_ids = params.stop_ids(self.eos_token_ids)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
        can_compact = callable(getattr(cache, "reorder_cache", None))
        sync_every = 1 if device.type == "cpu" else 8  # host syncs stall GPU kernel queues; CPU has none

        out_tokens = torch.full((batch, max_new), self.pad_token_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
        out_depths = torch.full((batch, max_new), self.depth, dtype=torch.long, device=device)
        lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)  # original row of each computed row
        done = torch.zeros(batch, dtype=torch.bool, device=device)  # per computed row
        compacted = False

        for step in range(max_new):
            token, logprob = sample_next(logits, params.temperature, params.top_k, params.top_p, generator)
            if compacted:
                out_tokens[rows, step] = token
                out_logprobs[rows, step] = logprob
                if adaptive:
                    out_depths[rows, step] = depth
            else:
                out_tokens[:, step] = token
                out_logprobs[:, step] = logprob
                if adaptive:
                    out_depths[:, step] = depth
            if step == max_new - 1:
                break
            if stop is not None:
                first = torch.isin(token, stop) & ~done
                lengths[rows] = torch.where(first, step + 1, lengths[rows])
                stopped[rows] |= first
                done |= first
                if step % sync_every == 0:
                    live = int((~done).sum())
                    if live == 0:
                        break
                    if can_compact and live <= self.compact_below * done.numel():
                        keep = (~done).nonzero().squeeze(1)
                        cache.reorder_cache(keep)
                        rows, mask, next_pos = rows[keep], mask[keep], next_pos[keep]
                        token, done = token[keep], done[keep]
                        compacted = True
                        if fast is not None:
                            fast.bind(cache)
                            bias = bias[keep]
            # Feed the token just drawn: cache index width + step, sequence position prompt_len + step.
            if adaptive:
                logits, depth = self._adaptive_step(fast, cache, token, mask, next_pos + step, width + step,
                                                    bias if fast is not None else None, params)
            elif fast is not None:
                logits = fast(token, next_pos + step, width + step, bias)
            else:
                logits = self._forward(
                    token.unsqueeze(1), mask[:, : width + step + 1], (next_pos + step).unsqueeze(1), cache,
                    start=width + step,
                )
        if stop is not None and max_new >= 1:
            # A stop token drawn at the very last step still counts as "stop".
            last = torch.isin(out_tokens[:, max_new - 1], stop) & ~stopped & (lengths == max_new)
            stopped |= last
        if fast is not None:
            fast.release()
        del cache
        depths = out_depths.tolist() if adaptive else None
        return out_tokens.tolist(), out_logprobs.tolist(), lengths.tolist(), stopped.tolist(), depths

    def _adaptive_step(self, fast, cache, token, mask, position, column: int, bias, params: SamplingParams):
        """One decode step under the exit rule: (logits [B, V] of each row's chosen exit, depth [B]).
        Fused: rows stop running at their exit (the saving); plain: the model's forward runs every loop and the
        rule reads its exits (same tokens, no saving). Both apply the K/V rule at `column`."""
        if fast is None:
            exits = self._forward(token.unsqueeze(1), mask[:, : column + 1], position.unsqueeze(1), cache,
                                  start=column, exits=True)
            return self._adaptive_readout(exits, cache, column, position, params)
        decider = self._decider(params.exit_rule, params.temperature, token.shape[0], token.device)
        fast.adaptive(token, position, column, bias, decider.after_loop)
        project_skipped_kv(self.model, fast.keys, fast.values, decider.depth, decider.states, column, position)
        return decider.logits, decider.depth
