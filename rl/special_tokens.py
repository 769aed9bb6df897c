"""Special-token overrides for checkpoints whose files name the wrong ones.

Why: the published Ouro(-Thinking) files set bos/eos/pad to `<|endoftext|>` (id 0), while their
ChatML turns start with `<|im_start|>` (1) and end with `<|im_end|>` (2). A run that trusts the files
never sees a completion end (it stops only at max_new_tokens) and saves a model that inherits the
wrong ids. The job config names the right tokens (`special_tokens: {eos_token: "<|im_end|>"}`) and
this module applies them to the tokenizer and to the model's config and generation config, so the
rollout stop set, the saved `final/` and later `looprl eval` runs agree.
"""

from __future__ import annotations

from collections.abc import Mapping

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")


def apply_special_tokens(tokenizer, model, overrides: Mapping[str, str]) -> dict[str, int]:
    """Point the tokenizer's (and the model's) bos/eos/pad at the named tokens; returns {key: id}.

    Every token must already be in the tokenizer's vocabulary: this fixes which token plays a role,
    it never adds tokens (that would need new embedding rows).
    """
    applied: dict[str, int] = {}
    for key, token in overrides.items():
        if key not in SPECIAL_TOKEN_KEYS:
            raise ValueError(f"special_tokens: unknown key {key!r} (one of {', '.join(SPECIAL_TOKEN_KEYS)})")
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens.{key}: expected a token string, got {token!r}")
        token_id = tokenizer.convert_tokens_to_ids(token)
        unknown = token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token)
        if unknown:
            raise ValueError(f"special_tokens.{key}: {token!r} is not a token of this tokenizer")
        setattr(tokenizer, key, token)
        for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if config is not None:
                setattr(config, f"{key}_id", int(token_id))
        applied[key] = int(token_id)
    return applied
