"""Fixed-depth rollout workers (torch engine, vLLM engine). Never imports the trainer (`rl`).

`from rollout.vllm_worker import VLLMRolloutWorker` for the optional vLLM engine.
"""

from rollout.base import Rollout, RolloutWorker, SamplingParams, SpecConfig

__all__ = ["Rollout", "RolloutWorker", "SamplingParams", "SpecConfig", "TorchRolloutWorker"]


def __getattr__(name: str):
    # Lazy so that `from rollout.base import ...` (e.g. the vLLM engine) never pays for torch imports twice.
    if name == "TorchRolloutWorker":
        from rollout.torch_worker import TorchRolloutWorker

        return TorchRolloutWorker
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
