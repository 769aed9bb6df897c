"""Rollout engines by name: one `make_worker(engine, ...)` for the trainer and `looprl eval`.

An engine registers a builder with `@register_engine("name", exact_logprobs=...)`:
`exact_logprobs=True` declares that its logprobs are what the trainer recomputes (same model object, same
fp32 math), so no importance correction is needed; False turns truncated IS on under `tis_mode: auto`.
Builders import their engine lazily, so `import rollout` never imports vLLM.

Adding an engine: a class implementing rollout.base.RolloutWorker, plus a builder registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rollout.base import RolloutWorker

Builder = Callable[..., RolloutWorker]


@dataclass(frozen=True)
class Engine:
    name: str
    build: Builder  # build(model=..., model_path=..., depth=..., eos_token_id=..., pad_token_id=..., **options)
    exact_logprobs: bool
    requires: str | None = None  # the module the engine imports (checked before anything is loaded)
    install: str = ""  # how to install it, for the one-line error


ENGINES: dict[str, Engine] = {}


def register_engine(name: str, *, exact_logprobs: bool, requires: str | None = None,
                    install: str = "") -> Callable[[Builder], Builder]:
    def wrap(build: Builder) -> Builder:
        ENGINES[name] = Engine(name, build, exact_logprobs, requires, install)
        return build

    return wrap


def check_installed(name: str) -> None:
    """ValueError (one line: how to install it) when the engine's package is missing, so that a run
    without vLLM stops before loading anything instead of in an import traceback."""
    import importlib.util

    engine = get_engine(name)
    if engine.requires and importlib.util.find_spec(engine.requires) is None:
        raise ValueError(f"rollout engine {name!r} needs {engine.requires}, which is not installed; "
                         f"install it: {engine.install}")


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"config key 'engine': unknown rollout engine {name!r} "
                         f"(registered: {', '.join(ENGINES)})") from None


def make_worker(engine: str, *, depth: int, model: Any = None, model_path: str | None = None,
                eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                **options: Any) -> RolloutWorker:
    """A worker of `engine` at `depth`: around the module `model` (torch) or loading `model_path` (vllm)."""
    return get_engine(engine).build(model=model, model_path=model_path, depth=depth, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, **options)


@register_engine("torch", exact_logprobs=True)
def _torch(*, model: Any, model_path: str | None, depth: int, eos_token_id: Any, pad_token_id: int | None,
           **options: Any) -> RolloutWorker:
    from rollout.torch_worker import TorchRolloutWorker

    if model is None:
        raise ValueError("the torch rollout engine needs the model object (make_worker(..., model=...))")
    return TorchRolloutWorker(model, depth, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **options)


@register_engine("vllm", exact_logprobs=False, requires="vllm",
                 install="pip install 'looprl[vllm]' (in a checkout: pip install -e '.[vllm]'; "
                         "CPU: tools/vllm_cpu_env.sh)")
def _vllm(*, model: Any, model_path: str | None, depth: int, eos_token_id: Any, pad_token_id: int | None,
          **options: Any) -> RolloutWorker:
    from rollout.vllm_worker import VLLMRolloutWorker

    if model_path is None:
        raise ValueError("the vllm rollout engine loads its own copy: make_worker(..., model_path=...)")
    return VLLMRolloutWorker(model_path, depth, eos_token_id=eos_token_id, **options)
