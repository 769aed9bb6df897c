"""`looprl export`: a training checkpoint (runs/x/checkpoints/step-N) as a model directory.

A run writes `final/` only when it finishes; a run stopped early, or a better step than the last, is
only a checkpoint, which holds the optimizer and RNG states but not the model's config, tokenizer or
code. Export puts the checkpoint's weights into the run's model (rl/model_io.py load_checkpoint_model)
and writes it the way `final/` is written (save_portable: model code and auto_map, the run's
special_tokens; atomic, so a failure leaves no half directory). A checkpoint holding non-finite weights
is refused: it would load and generate garbage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="looprl export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint directory: runs/x/checkpoints/step-N")
    p.add_argument("--out", required=True, help="the model directory to write (loads with from_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def export(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the checkpoint's model to `out`; ConfigError (one line) for anything that cannot be done."""
    import torch

    from rl.model_io import (
        checkpoint_source,
        count_nonfinite,
        is_checkpoint_dir,
        load_checkpoint_model,
        load_tokenizer,
        save_portable,
    )
    from rl.run_dir import RunWriteError, atomic_dir

    where, out = "--checkpoint", Path(out)
    if not is_checkpoint_dir(checkpoint):
        raise ConfigError(f"{where} {checkpoint}: not a training checkpoint (a directory with trainer_state.json, "
                          "like runs/x/checkpoints/step-N)")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: already exists; add --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    source = checkpoint_source(checkpoint, where)
    dtype = getattr(torch, source.dtype, torch.float32)
    model = load_checkpoint_model(source, where, dtype=dtype)
    bad = count_nonfinite(model.parameters())
    if bad:
        raise ConfigError(f"{where} {checkpoint}: {bad} weights are inf/NaN; not exported (an older checkpoint "
                          "of the run may be sound)")
    tokenizer = load_tokenizer(source.model_path, where, chat_template=False)  # copied, not used
    try:
        with atomic_dir(out) as tmp:
            save_portable(model, tokenizer, tmp, special_tokens=source.special_tokens)
    except RunWriteError as e:
        raise ConfigError(str(e)) from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"looprl export: {e}", file=sys.stderr)
        return 2
    print(f"looprl export: wrote {out} (weights of {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
