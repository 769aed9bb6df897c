"""Prompts on their way to the rollout: which ones this step takes (PromptSampler) and their token ids.

`encode_prompts` is the one chat-template encoding used by the trainer, `looprl eval` and make-tiny, so a
prompt is the same token sequence wherever it is generated from.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rl.config import prompt_room  # the trainer's rule (rl/evaluate.py imports it from here too)


def encode_prompts(tokenizer, prompts: Sequence[Any], suffix: str = "") -> list[list[int]]:
    """Chat-template token ids of each prompt (messages list or a plain string), generation prompt added.

    `suffix` is text placed right after the template's generation prompt (e.g. Ouro-Thinking's
    "<think>\n", which its template does not write); the whole text is then tokenized at once, as if
    the template had written it.
    """
    ids = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if suffix:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids.append([int(t) for t in tokenizer(text + suffix, add_special_tokens=False)["input_ids"]])
            continue
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(out, Mapping):  # older/newer transformers may return a BatchEncoding
            out = out["input_ids"]
        ids.append([int(t) for t in out])
    return ids


def fit_prompts(prompt_ids: Sequence[list[int]], max_positions: int | None, max_new_tokens: int, *,
                who: str = "looprl eval", key: str = "--max_new_tokens") -> list[list[int]]:
    """Prompts left-truncated to `prompt_room` (their last tokens kept, as in training), said once on stderr:
    beyond the position table a learned table is indexed out of range and RoPE runs at untrained positions,
    and the cache of a huge prompt can take tens of GB."""
    room = prompt_room(max_positions, max_new_tokens, key)
    if room is None:
        return list(prompt_ids)
    long = [i for i, ids in enumerate(prompt_ids) if len(ids) > room]
    if long:
        print(f"{who}: WARNING: {len(long)} prompt(s) longer than the {room} tokens the model's "
              f"max_position_embeddings {max_positions} leaves after max_new_tokens {max_new_tokens} (prompt "
              f"{long[0]} has {len(prompt_ids[long[0]])}); keeping the last {room} tokens of each",
              file=sys.stderr, flush=True)
    return [ids[-room:] for ids in prompt_ids]


class PromptSampler:
    """Epoch-wise shuffled prompt indices; its whole state is (epoch, index), so resuming is exact."""

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError("the training dataset is empty")
        self.size, self.seed = size, seed
        self.epoch, self.index = 0, 0
        self._perm: list[int] | None = None

    def _order(self) -> list[int]:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            self._perm = torch.randperm(self.size, generator=gen).tolist()
        return self._perm

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            grab = order[self.index:self.index + (k - len(out))]
            out += grab
            self.index += len(grab)
            if self.index >= self.size:
                self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None


class PromptIds:
    """Token ids of dataset rows, encoded once and left-truncated to `max_length` (warned once)."""

    def __init__(self, tokenizer, dataset, max_length: int, suffix: str = "", why: str | None = None):
        self.tokenizer, self.dataset, self.max_length, self.suffix = tokenizer, dataset, max_length, suffix
        self.why = f" ({why})" if why else ""  # the limit was lowered to fit the model's positions
        self._cache: dict[int, list[int]] = {}
        self._warned = False

    def __call__(self, index: int) -> list[int]:
        if index not in self._cache:
            ids = encode_prompts(self.tokenizer, [self.dataset[index]["prompt"]], self.suffix)[0]
            if len(ids) > self.max_length:
                if not self._warned:
                    print(f"looprl train: WARNING: prompt {index} has {len(ids)} tokens > max_prompt_length "
                          f"{self.max_length}{self.why}; keeping the last ones (warned once)", file=sys.stderr, flush=True)
                    self._warned = True
                ids = ids[-self.max_length:]
            self._cache[index] = ids
        return self._cache[index]
