"""The published Ouro-Thinking checkpoints' two quirks, handled by the job config and the data path:

1. their files name `<|endoftext|>` (id 0) as bos, eos and pad, while their ChatML turns start with
   `<|im_start|>` (1) and end with `<|im_end|>` (2): `special_tokens` in the job config fixes the
   tokenizer, the model config, the rollout stop set and the saved `final/`;
2. their chat template does not open the thinking block: `prompt_suffix: "<think>\\n"` adds it after
   the generation prompt.

Tested on a tiny random checkpoint built here with exactly those files (SmolLM2's id layout for the
special tokens, a character vocabulary after them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FIX = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def build_thinking_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["\n"] + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)  # whole tokens, never split into characters
    # As published: every special role is <|endoftext|>.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML,
                                   padding_side="left")


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory):
    from looped import OuroConfig, OuroForCausalLM

    tok = build_thinking_tokenizer()
    torch.manual_seed(0)
    config = OuroConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, total_ut_steps=2, max_position_embeddings=256,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    root = tmp_path_factory.mktemp("ouro-thinking-like")
    OuroForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)
    assert json.loads((root / "generation_config.json").read_text())["eos_token_id"] == 0
    return root


def test_the_files_are_wrong_and_special_tokens_fixes_tokenizer_and_model(thinking_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.special_tokens import apply_special_tokens

    tok = AutoTokenizer.from_pretrained(thinking_dir)
    model = AutoModelForCausalLM.from_pretrained(thinking_dir)
    assert (tok.bos_token_id, tok.eos_token_id, model.generation_config.eos_token_id) == (0, 0, 0)
    assert apply_special_tokens(tok, model, FIX) == {"bos_token": 1, "eos_token": 2}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)  # pad stays <|endoftext|>
    assert (model.config.eos_token_id, model.generation_config.eos_token_id, model.config.bos_token_id) == (2, 2, 1)
    with pytest.raises(ValueError, match=r"^special_tokens.eos_token: '<\|eot\|>' is not a token of this tokenizer$"):
        apply_special_tokens(tok, model, {"eos_token": "<|eot|>"})
    with pytest.raises(ValueError, match="unknown key 'sep_token'"):
        apply_special_tokens(tok, model, {"sep_token": "<|im_end|>"})


def test_prompt_suffix_opens_the_think_block_after_the_generation_prompt(thinking_dir):
    from transformers import AutoTokenizer

    from rl.prompts import encode_prompts

    tok = AutoTokenizer.from_pretrained(thinking_dir)
    plain = encode_prompts(tok, ["1+1=?"])[0]
    thinking = encode_prompts(tok, ["1+1=?"], "<think>\n")[0]
    assert tok.decode(plain).endswith("<|im_start|>assistant\n")
    assert thinking == plain + [SPECIALS.index("<think>"), tok.convert_tokens_to_ids("\n")]


def test_trainer_applies_both_from_the_job_config_and_saves_a_fixed_model(thinking_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from rl.config import ConfigError, load_config
    from rl.train import Trainer

    out = tmp_path / "run"
    argv = ["--model", str(thinking_dir), "--depth", "2", "--data", "arith", "--data_limit", "8",
            "--special_tokens", '{bos_token: "<|im_start|>", eos_token: "<|im_end|>"}', "--prompt_suffix", "<think>\n",
            "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "4", "--max_steps", "1",
            "--dynamic_sampling", "false", "--eval_every", "0", "--progress", "false", "--output_dir", str(out)]
    trainer = Trainer(load_config(argv))
    assert trainer.worker.eos_token_ids == [2]  # rollouts stop at <|im_end|>, not at the files' 0
    assert trainer.prompt_ids(0)[-2:] == [SPECIALS.index("<think>"), trainer.tokenizer.convert_tokens_to_ids("\n")]
    assert trainer.train() == 0
    saved = AutoConfig.from_pretrained(out / "final")
    assert (saved.eos_token_id, saved.bos_token_id) == (2, 1)
    assert json.loads((out / "final" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert AutoTokenizer.from_pretrained(out / "final").eos_token == "<|im_end|>"

    with pytest.raises(ConfigError, match="special_tokens"):
        load_config(argv[:8] + ["--special_tokens", "{eos: x}"])
    assert Path(out / "metrics.jsonl").is_file()


def test_load_tokenizer_applies_special_tokens_and_names_the_key_of_a_bad_one(thinking_dir):
    from rl.config import ConfigError
    from rl.model_io import load_tokenizer

    tok = load_tokenizer(str(thinking_dir), "config key 'model'", special_tokens={"eos_token": "<|im_end|>"})
    assert (tok.eos_token_id, tok.bos_token_id) == (2, 0)
    with pytest.raises(ConfigError, match=r"^config key 'special_tokens': special_tokens.eos_token: '<\|eot\|>' "
                                          r"is not a token of this tokenizer$"):
        load_tokenizer(str(thinking_dir), "config key 'model'", special_tokens={"eos_token": "<|eot|>"})
