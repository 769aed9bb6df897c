"""`looprl train`'s exit codes, one table (README "When things go wrong"); `Trainer.train()` returns them.

| code | meaning | what to do |
|---|---|---|
| 0 | finished: max_steps reached, checkpoint and final/ written | nothing |
| 1 | stopped by an error while training (non-finite losses, a reward function, a write) | fix it; `--resume` continues from the newest checkpoint |
| 2 | bad input, refused before training (config, data, model, output_dir in use, a changed `--resume`) | fix the input |
| 3 | interrupted (SIGINT/SIGTERM): checkpoint of the last finished step written | `--resume` continues exactly there |
| 128+N | stopped at once by a second signal N (130: Ctrl-C twice) | `--resume` continues from the newest checkpoint |

Why 3 and not 128+signum for a clean interruption: shells and schedulers report 128+N for a process
*killed* by signal N, kill -9 and the OOM killer included, where no checkpoint of the last step exists.
A scheduler can requeue on 3 knowing the checkpoint is at the last finished step; 0 always means done.
"""

FINISHED = 0
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 3
SIGNAL_BASE = 128  # + the signal's number: stopped at once, no fresh checkpoint
