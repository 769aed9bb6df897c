"""Fixed-depth rollout workers (torch engine, vLLM engine). Never imports the trainer (`rl`).

`make_worker(engine, depth=..., model=... | model_path=...)` builds one by name (rollout/engines.py);
`from rollout.vllm_worker import VLLMRolloutWorker` for the optional vLLM engine itself.
"""

from rollout.base import ExitRule, Rollout, RolloutWorker, SamplingParams, SpecConfig
from rollout.engines import ENGINES, get_engine, make_worker, register_engine

__all__ = ["ENGINES", "ExitRule", "Rollout", "RolloutWorker", "SamplingParams", "SpecConfig", "TorchRolloutWorker", "get_engine",
           "make_worker", "register_engine"]


def __getattr__(name: str):
    # Lazy so that `from rollout.base import ...` (e.g. the vLLM engine) never pays for torch imports twice.
    if name == "TorchRolloutWorker":
        from rollout.torch_worker import TorchRolloutWorker

        return TorchRolloutWorker
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
