"""Loading and saving models with one-line errors, shared by `looprl train` and `looprl eval`.

Why: transformers reports a missing directory as "Repo id must be in the form ...", a corrupt
config.json or `hidden_size: "big"` as a traceback deep inside torch, and a truncated
model.safetensors as "invalid header length" without the file. Both commands load models the same
way here, so both say the same one line naming the path and the file.

`save_portable` writes a model directory that loads anywhere: for a model class that transformers
does not ship (our looped Ouro model), the modeling and configuration source files are copied next to
the weights and `auto_map` is set, as the published Ouro checkpoints do, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without looprl installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.config import ConfigError
from rl.special_tokens import apply_special_tokens

# Integer sizes a config.json must hold as positive integers (checked when present): a string here
# otherwise fails inside torch's tensor allocation with a message that names no key.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "total_ut_steps", "head_dim")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class ModelLoadError(ConfigError):
    """A model path that cannot be loaded; the message names the path (and the file) in one line."""


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _missing(path: str, where: str) -> ModelLoadError:
    # transformers' own words ("Repo id must be in the form ...") describe the hub lookup, not the mistake
    return ModelLoadError(f"{where}: no such model directory or hub id: {path}")


def load_model_config(path: str, where: str):
    """AutoConfig of `path` (a directory or a hub id); checks config.json and its size keys first."""
    from transformers import AutoConfig

    import looped  # noqa: F401  (registers the looped architecture with the Auto classes)

    local = Path(path)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            run = " (a looprl run: use its final/ or a checkpoints/step-N)" if (local / "config.yaml").is_file() \
                and (local / "checkpoints").is_dir() else ""
            raise ModelLoadError(f"{where}: {path} has no config.json (not a saved model directory){run}")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{where}: {config_file}: not valid JSON ({_short(e)})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{where}: {config_file}: expected a JSON object")
        check_sizes(raw, str(config_file), where)
    elif local.exists():
        raise ModelLoadError(f"{where}: {path} is a file, not a model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        if not local.exists():
            raise _missing(path, where) from None
        raise ModelLoadError(f"{where}: cannot load the config of {path} ({_short(e)})") from None
    check_sizes(config.to_dict(), f"{path} config", where)
    return config


def check_sizes(raw: dict[str, Any], source: str, where: str) -> None:
    for key in SIZE_KEYS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelLoadError(f"{where}: {source}: {key!r} must be a positive integer, got {value!r}")


def load_tokenizer(path: str, where: str, special_tokens: Mapping[str, str] | None = None, *,
                   chat_template: bool = True):
    """AutoTokenizer of `path`, with the job's bos/eos/pad overrides applied (rl/special_tokens.py; e.g.
    Ouro-Thinking's files name <|endoftext|> as eos while its turns end with <|im_end|>).

    chat_template: the caller encodes prompts (rl/prompts.py encode_prompts: every prompt, a plain string as
    one user message, through the template), so a tokenizer without one is refused here, in one line,
    instead of at the first prompt of a run."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers raise many types for a bad tokenizer.json
        if not Path(path).exists():
            raise _missing(path, where) from None
        raise ModelLoadError(f"{where}: cannot load the tokenizer of {path} ({_short(e)})") from None
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{where}: the tokenizer of {path} has no chat template, and looprl encodes every prompt "
                             "with it (a plain-string prompt as one user message): add one to the model's files "
                             "(`chat_template` in tokenizer_config.json, or chat_template.jinja)")
    if special_tokens:
        try:
            apply_special_tokens(tokenizer, None, special_tokens)
        except ValueError as e:
            raise ConfigError(f"config key 'special_tokens': {e}") from None
    return tokenizer


def _weight_files(path: str) -> list[str]:
    local = Path(path)
    return sorted(p.name for p in local.iterdir() if p.suffix in WEIGHT_SUFFIXES) if local.is_dir() else []


def load_model(path: str, where: str, **kwargs: Any):
    """AutoModelForCausalLM of `path`; a truncated or corrupt weights file is one line naming it."""
    from transformers import AutoModelForCausalLM

    import looped  # noqa: F401

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        if not Path(path).exists():
            raise _missing(path, where) from None
        files = _weight_files(path)
        named = f"{path}/{files[0]}" if len(files) == 1 else f"{path} ({', '.join(files) or 'no weights file'})"
        raise ModelLoadError(f"{where}: cannot load the weights {named}: {_short(e)} "
                             "(truncated or corrupt file?)") from None


# --------------------------------------------------------------------------- threads

# Below this many parameters, CPU matmuls are too small for intra-op threads to pay; on a busy
# machine the threads' spin-waits made a 120k-parameter step 10x slower (measured, docs/EXPERIMENTS.md)
# and a `looprl eval` of the embedded model 50x slower (30 s vs 0.6 s).
TINY_PARAMS = 5_000_000


def set_threads(model, device_type: str, requested: int = 0) -> int:
    """The thread rule of `looprl train` and `looprl eval`: `requested` threads if > 0, else 1 for a tiny
    model on CPU (else torch's default is kept). Returns the count set (0: unchanged)."""
    import torch

    threads = requested or (1 if device_type == "cpu" and model.num_parameters() < TINY_PARAMS else 0)
    if threads:
        torch.set_num_threads(threads)
    return threads


def count_nonfinite(tensors) -> int:
    """How many values of `tensors` (weights) are inf or NaN: a model holding any is broken, whatever its
    loss said (fp16 AdamW, an lr that overflows), and is never written as a model."""
    import torch

    with torch.no_grad():
        floats = [t for t in tensors if t.is_floating_point()]
        if not floats:
            return 0
        # a sum is finite only if every value is (inf + x = inf, inf - inf = nan): one pass, no mask; the
        # exact count runs only when a sum is not (a real inf/NaN, or a sum that overflowed)
        sums = torch.stack([t.sum(dtype=torch.float32) for t in floats])
        if bool(torch.isfinite(sums).all()):
            return 0
        return int(torch.stack([(~torch.isfinite(t)).sum() for t in floats]).sum())


# --------------------------------------------------------------------------- checkpoints as models

# A checkpoint's model weights (checkpoints/step-N/) are read by rl.checkpoint.load_checkpoint_weights:
# safetensors only (never unpickling code), FSDP2 shards joined; DeepSpeed checkpoints are refused.


def is_checkpoint_dir(path: str | Path) -> bool:
    """A training checkpoint (trainer_state.json, no config.json) rather than a model directory."""
    from rl.checkpoint import STATE_FILE

    p = Path(path)
    return p.is_dir() and (p / STATE_FILE).is_file() and not (p / "config.json").is_file()


@dataclass
class CheckpointSource:
    """What a checkpoint needs to become a model: its run's base model (architecture, tokenizer), the
    run's special_tokens and training dtype, read from the run's config.yaml (<run>/checkpoints/step-N)."""

    checkpoint: Path
    model_path: str
    special_tokens: dict[str, str]
    dtype: str


def checkpoint_source(path: str | Path, where: str) -> CheckpointSource:
    import yaml

    from rl.data import EMBEDDED_MODEL

    ckpt = Path(path)
    run_config = ckpt.resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ModelLoadError(f"{where}: checkpoint {ckpt}: its run's {run_config} is missing (it names the model "
                             "the checkpoint belongs to)")
    try:
        raw = yaml.safe_load(run_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelLoadError(f"{where}: checkpoint {ckpt}: cannot read its run's {run_config} (it names the "
                             f"model the checkpoint belongs to): {_short(e)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str):
        raise ModelLoadError(f"{where}: checkpoint {ckpt}: {run_config} names no 'model'")
    model = EMBEDDED_MODEL if raw["model"] == "embedded" else raw["model"]
    return CheckpointSource(ckpt, model, dict(raw.get("special_tokens") or {}), str(raw.get("dtype") or "float32"))


def checkpoint_weights(ckpt: str | Path, where: str) -> dict[str, Any]:
    """The model's state dict in a checkpoint directory, on the CPU: rl.checkpoint's one reader
    (safetensors only, FSDP2 shards joined), its errors as one line naming `where`."""
    from rl.checkpoint import load_checkpoint_weights

    try:
        return load_checkpoint_weights(ckpt)
    except Exception as e:  # safetensors/json raise many types for a truncated or foreign file
        raise ModelLoadError(f"{where}: cannot read the weights of checkpoint {ckpt}: {_short(e)}") from None


def load_checkpoint_model(src: CheckpointSource, where: str, **kwargs: Any):
    """The run's base model with the checkpoint's weights; every weight must come from the checkpoint
    (a tied copy counts), and the checkpoint may hold nothing the model lacks."""
    model = load_model(src.model_path, where, **kwargs)
    state = checkpoint_weights(src.checkpoint, where)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: another model's checkpoint
        raise ModelLoadError(f"{where}: checkpoint {src.checkpoint} does not fit {src.model_path}: "
                             f"{_short(e)}") from None
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    tied = {name for names in groups.values() if names & state.keys() for name in names}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        bad = missing[:3] or result.unexpected_keys[:3]
        what = "lacks" if missing else "has weights the model does not:"
        raise ModelLoadError(f"{where}: checkpoint {src.checkpoint} does not fit {src.model_path}: it {what} "
                             f"{', '.join(bad)}")
    return model


def save_portable(model, tokenizer, path: str | Path, special_tokens: Mapping[str, str] | None = None,
                  **save_kwargs: Any) -> None:
    """save_pretrained of model and tokenizer; a model class transformers does not ship gets its source
    files and `auto_map` (see the module docstring). The model's config keeps the auto_map.
    `special_tokens` (the job's bos/eos/pad overrides) are written into the model's config and generation
    config too, so the saved model agrees with its tokenizer."""
    if special_tokens:
        apply_special_tokens(tokenizer, model, special_tokens)
    import inspect
    import sys

    path = Path(path)
    cls = type(model)
    own_code = not cls.__module__.startswith("transformers.")
    if own_code:
        source = Path(inspect.getfile(cls)).parent
        module, stem = sys.modules[cls.__module__], Path(inspect.getfile(cls)).stem
        config_cls = type(model.config)
        auto_map = {"AutoConfig": f"{Path(inspect.getfile(config_cls)).stem}.{config_cls.__name__}",
                    "AutoModelForCausalLM": f"{stem}.{cls.__name__}"}
        base = cls.__name__.replace("ForCausalLM", "Model")
        if hasattr(module, base):
            auto_map["AutoModel"] = f"{stem}.{base}"
        model.config.auto_map = auto_map
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    if own_code:  # the modeling file, its config file and what they import relatively (hf_compat.py)
        for name in sorted(_code_files(source, [Path(inspect.getfile(cls)).name,
                                                Path(inspect.getfile(type(model.config))).name])):
            shutil.copy2(source / name, path / name)


def _code_files(package: Path, roots: list[str]) -> set[str]:
    """`roots` and the sibling modules they import with `from .x import`, transitively (not __init__.py:
    it registers with looprl's Auto classes, which a remote-code checkpoint does not want)."""
    import re

    found: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found or not (package / name).is_file():
            continue
        found.add(name)
        todo += [f"{m}.py" for m in re.findall(r"^from \.(\w+) import", (package / name).read_text(), re.M)]
    return found
