"""`looprl make-tiny`: rebuild the embedded tiny looped model (rl/assets/tiny-ouro) from a seed.

The embedded default job (`looprl train` with no arguments) needs a policy that already solves part
of the `arith` task, so that RL has both signal and room: a small Ouro-architecture model (2 shared
layers run T = 4 times) with a character-level tokenizer, warm-started by supervised training on
`arith` train. Supervision is on every loop's exit (weighted toward the last), so depth t < T gives
a real but weaker answer: accuracy grows with depth, which is the effect looped-LM RL studies.

Training stops early once greedy accuracy at full depth on a held-out slice of the train split
reaches `--target_acc`, which lands the shipped model in the intended 20-60 % band on `arith` test
whatever the speed of the machine; the stopping rule only looks at steps, so a seed rebuilds the
same model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from looped import OuroConfig, OuroForCausalLM
from rl import arith
from rl.prompts import encode_prompts

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
# bos, then each message's text: user/system lines end with a newline, assistant turns with eos.
# The generation prompt adds nothing: the model answers right after the user's line.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
)


@dataclass
class TinyConfig:
    """Everything that determines the shipped model (saved next to it as make_tiny.json)."""

    seed: int = 0
    # Not the shipped model by default: a pip-installed package must not be rewritten by a rebuild;
    # rebuilding the shipped one is explicit (`--out rl/assets/tiny-ouro` in a checkout).
    out: str = "tiny-ouro"
    data: str = "arith"  # task spec, e.g. "arith:digits=2,operands=3"
    # model
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    total_ut_steps: int = 4
    # training
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    exit_weighting: str = "linear"  # loss weight of exit t: "linear" (prop. to t), "uniform", "last"
    # early stopping on a held-out slice of the train split
    val_size: int = 256
    eval_every: int = 25
    target_acc: float = 0.4
    max_minutes: float = 9.0
    # final measurement on arith test
    test_size: int = 500


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one id per printable ASCII char, <unk> for anything else."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=256,
    )


def build_model(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> OuroForCausalLM:
    config = OuroConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        total_ut_steps=cfg.total_ut_steps,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    return OuroForCausalLM(config)


def encode_examples(tokenizer, dataset) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids incl. eos) for each row."""
    eos = tokenizer.eos_token_id
    prompts = encode_prompts(tokenizer, dataset["prompt"])
    return [
        (prompt, tokenizer(arith.completion(gold))["input_ids"] + [eos])
        for prompt, gold in zip(prompts, dataset["ground_truth"])
    ]


def collate(
    batch: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 outside the completion)."""
    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(batch):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return ids, mask, labels


def exit_weights(kind: str, depth: int) -> list[float]:
    raw = {
        "linear": [t + 1.0 for t in range(depth)],
        "uniform": [1.0] * depth,
        "last": [0.0] * (depth - 1) + [1.0],
    }
    if kind not in raw:
        raise ValueError(f"exit_weighting must be one of {', '.join(raw)}, got {kind!r}")
    return [w / sum(raw[kind]) for w in raw[kind]]


def sft_loss(model, ids, mask, labels, weights: list[float]) -> torch.Tensor:
    """Weighted next-token cross-entropy of every loop's exit on the completion tokens."""
    out = model(input_ids=ids, attention_mask=mask, depth=len(weights), output_exits=True, use_cache=False)
    targets = labels[:, 1:]
    loss = torch.zeros(())
    for w, hidden in zip(weights, out.exit_hidden_states):
        if w == 0:
            continue
        logits = model.lm_head(hidden[:, :-1])
        loss = loss + w * F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return loss


@torch.no_grad()
def decode(
    model,
    tokenizer,
    prompts: list[list[int]],
    depth: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
) -> list[str]:
    """Completions (text) at a fixed depth, greedy when temperature is 0; a plain full-forward loop
    without a cache (sequences are a dozen tokens), so it depends on nothing but the forward."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        done = torch.zeros(len(chunk), dtype=torch.bool)
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = (
                model(input_ids=ids, attention_mask=mask, depth=depth, use_cache=False).logits[:, -1].float()
            )
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                picked = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:
                picked = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), picked)
            new.append(nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done | (nxt == eos))[:, None].long()], 1)
            if done.all():
                break
        for row in torch.stack(new, 1).tolist():
            row = row[: row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row))
    return texts


def is_correct(completion: str, ground_truth: str) -> bool:
    """Exact integer match of the last number in the completion (the task's answers are integers)."""
    numbers = re.findall(r"-?\d+", completion)
    return bool(numbers) and int(numbers[-1]) == int(ground_truth)


def accuracy_by_depth(model, tokenizer, dataset, depths, max_new_tokens: int) -> dict[int, float]:
    prompts = encode_prompts(tokenizer, dataset["prompt"])
    golds = dataset["ground_truth"]
    result = {}
    for depth in depths:
        texts = decode(model, tokenizer, prompts, depth, max_new_tokens)
        result[depth] = sum(is_correct(t, g) for t, g in zip(texts, golds)) / len(golds)
    return result


def sampled_accuracy(model, tokenizer, dataset, depth: int, max_new_tokens: int, n: int = 8, seed: int = 0):
    """(mean accuracy, pass@n) of n temperature-1 samples per prompt: what RL starts from."""
    prompts = encode_prompts(tokenizer, dataset["prompt"])
    golds = dataset["ground_truth"]
    hits = torch.zeros(len(prompts), n)
    for k in range(n):
        texts = decode(model, tokenizer, prompts, depth, max_new_tokens, temperature=1.0, seed=seed + k)
        hits[:, k] = torch.tensor([float(is_correct(t, g)) for t, g in zip(texts, golds)])
    return hits.mean().item(), hits.amax(1).mean().item()


def train(cfg: TinyConfig) -> dict:
    from rl.data import load_prompts

    t0 = time.time()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention (10x slower on a shared CPU)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    train_rows = load_prompts(cfg.data, split="train")
    val_rows = train_rows.select(range(len(train_rows) - cfg.val_size, len(train_rows)))
    train_examples = encode_examples(tokenizer, train_rows.select(range(len(train_rows) - cfg.val_size)))
    max_new = max(len(c) for _, c in train_examples) + 2
    weights = exit_weights(cfg.exit_weighting, cfg.total_ut_steps)
    print(f"make-tiny: {n_params:,} parameters, {len(train_examples)} train examples, exit weights {weights}")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    step, stop_reason = 0, "max_steps"
    while step < cfg.max_steps:
        model.train()
        idx = torch.randint(len(train_examples), (cfg.batch_size,), generator=gen).tolist()
        ids, mask, labels = collate([train_examples[i] for i in idx], tokenizer.pad_token_id)
        loss = sft_loss(model, ids, mask, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc = accuracy_by_depth(model, tokenizer, val_rows, [cfg.total_ut_steps], max_new)[
                cfg.total_ut_steps
            ]
            elapsed = time.time() - t0
            history.append(
                {"step": step, "loss": round(loss.item(), 4), "val_acc": acc, "seconds": round(elapsed)}
            )
            print(
                f"make-tiny: step {step} loss {loss.item():.3f} val acc d{cfg.total_ut_steps} {acc:.3f} ({elapsed:.0f}s)"
            )
            if acc >= cfg.target_acc:
                stop_reason = f"val acc {acc:.3f} >= target {cfg.target_acc}"
                break
            if elapsed > cfg.max_minutes * 60:
                stop_reason = f"time budget {cfg.max_minutes} min"
                break

    test_rows = load_prompts(cfg.data, split="test", limit=cfg.test_size)
    depths = list(range(1, cfg.total_ut_steps + 1))
    test_acc = accuracy_by_depth(model, tokenizer, test_rows, depths, max_new)
    sampled_mean, pass_at_8 = sampled_accuracy(model, tokenizer, test_rows, cfg.total_ut_steps, max_new, n=8)
    info = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},  # where it was written is not a recipe
        "parameters": n_params,
        "steps": step,
        "stop_reason": stop_reason,
        "max_completion_tokens": max_new - 2,
        "test_accuracy_by_depth": {f"d{d}": a for d, a in test_acc.items()},
        "test_sampled_t1": {"mean_accuracy": sampled_mean, "pass@8": pass_at_8, "depth": cfg.total_ut_steps},
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    save(model, tokenizer, Path(cfg.out), info)
    return info


def save(model, tokenizer, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "make_tiny.json").write_text(json.dumps(info, indent=1) + "\n")


def parse_args(argv: list[str]) -> TinyConfig:
    parser = argparse.ArgumentParser(prog="looprl make-tiny", description=__doc__.split("\n\n")[0])
    defaults = TinyConfig()
    for f in fields(TinyConfig):
        default = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name}", type=type(default), default=default, help=f"(default: {default})")
    return TinyConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    exit_weights(cfg.exit_weighting, cfg.total_ut_steps)  # validate before any compute
    info = train(cfg)
    accs = ", ".join(f"{k} {v:.3f}" for k, v in info["test_accuracy_by_depth"].items())
    print(
        f"make-tiny: saved {cfg.out} after {info['steps']} steps ({info['stop_reason']}), {info['seconds']}s"
    )
    print(f"make-tiny: greedy accuracy on {cfg.data} test by depth: {accs}")
    sampled = info["test_sampled_t1"]
    print(
        f"make-tiny: temperature-1 samples at depth {sampled['depth']}: mean accuracy {sampled['mean_accuracy']:.3f}, "
        f"pass@8 {sampled['pass@8']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
