"""One `Policy.update` of the embedded model over hand-made samples whose completion lengths give the
processes different length-bucket counts (so one of them runs a zero-weight filler micro-batch).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/update_worker.py OUT_DIR

Each process writes OUT_DIR/rank<r>.pt: the gradient at every optimizer update (before clipping), the
updated weights, the optimizer's and the schedule's step counts. tests/test_update_processes.py
compares them with a brute-force single-process reference; it imports `config` and `samples` from here.
"""

from __future__ import annotations

import random
import sys

import torch

from rl.batch import Sample
from rl.config import TrainConfig
from rl.data import EMBEDDED_MODEL

MINI = 8  # rows per optimizer update: 2 updates per pass over the 16 rows, 4 rows per process each


def config() -> TrainConfig:
    return TrainConfig(model=EMBEDDED_MODEL, depth=4, prompts_per_step=4, num_generations=4, mini_batch_size=MINI,
                       micro_batch_size=2, num_iterations=2, loss_type="dapo", lr=3e-5, max_new_tokens=512)


def samples() -> list[Sample]:
    """16 rows, 2 mini-batches. In each, one process's rows are all short (2 buckets of 2) and the
    other's hold one ~400-token completion (worth a bucket of its own: 3 buckets); the roles swap in
    the second mini-batch, so each process pads once with a filler."""
    rng = random.Random(0)
    group_rng = random.Random(1)  # each group of 4 rows shares a prompt (2 rows on each process): the update
    prompts = [[group_rng.randrange(3, 100) for _ in range(group_rng.randint(3, 8))]  # runs it once per micro-batch
               for _ in range(2 * MINI // 4)]
    rows = []
    for i in range(2 * MINI):
        rank, mini = i % 2, i // MINI
        long = rank == mini and i % MINI == MINI - 2 + rank  # the last row of one process per mini-batch
        c_len = rng.randint(400, 450) if long else rng.randint(3, 20)
        prompt = prompts[i // 4]
        [rng.randrange(3, 100) for _ in range(rng.randint(3, 8))]  # the old per-row prompt's draws: same lengths
        rows.append(Sample(prompt_index=i // 4, prompt_ids=prompt,
                           completion_ids=[rng.randrange(3, 100) for _ in range(c_len)],
                           rollout_logprobs=[-rng.random() for _ in range(c_len)], truncated=False, reward=0.0,
                           fn_rewards={}, correct=None, text="", advantage=rng.gauss(0.0, 1.0)))
    return rows


def main(out_dir: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    import rl.policy
    from rl.policy import Policy
    from rl.self_distill import SelfDistillConfig

    shared_calls = []  # forwards that ran each group's prompt once: as many on every process (DDP syncs buffers)
    forward = rl.policy.update_forward

    def counted(model, ids, attn, p_len, rows=None, **kw):
        if rows is not None:
            shared_calls.append(1)
        return forward(model, ids, attn, p_len, rows, **kw)

    rl.policy.update_forward = counted
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    policy = Policy(config(), acc, EMBEDDED_MODEL, use_tis=False, self_distill=SelfDistillConfig(), pad_id=0)
    grads, step = [], policy._optimizer_step

    def recording_step(finite: bool, at: int):
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                for p in policy.module.parameters()]))
        return step(finite, at)

    policy._optimizer_step = recording_step
    metrics = policy.update(samples(), 0)
    adam = policy.optimizer.optimizer.state
    torch.save({"grads": torch.stack(grads),
                "weights": torch.cat([p.detach().reshape(-1) for p in policy.module.parameters()]),
                "adam_steps": sorted({int(s["step"]) for s in adam.values()}),
                "schedule_steps": policy.scheduler.last_epoch, "metrics": metrics,
                "shared_prompts": policy.share_prompts, "shared_calls": len(shared_calls)},
               f"{out_dir}/rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        torch.distributed.destroy_process_group()  # else gloo can abort the process at exit


if __name__ == "__main__":
    main(sys.argv[1])
