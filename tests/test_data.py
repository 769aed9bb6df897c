"""Data loading (DAPO schema, de-duplication, errors), the arith task, and the embedded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl import arith
from rl.data import DAPO_PREFIX, DAPO_SUFFIX, EMBEDDED_MODEL, DataError, load_prompts

# DAPO-Math-17K's exact Arrow schema (verl RL parquet format).
DAPO_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.string())])),
    ]
)


def dapo_row(uid: str, problem: str, answer: str) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": uid},
    }


@pytest.fixture
def dapo_parquet(tmp_path: Path) -> Path:
    """3 distinct problems repeated (like the raw file's ~100x duplication): 3*4 + 1 rows."""
    base = [dapo_row(f"uuid-{k}", f"What is {k}+{k}?", str(2 * k)) for k in range(3)]
    rows = base * 4 + [dapo_row("uuid-1", "different text, same index", "0")]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=DAPO_SCHEMA), path)
    return path


def test_dapo_parquet_dedup_and_columns(dapo_parquet: Path, capsys):
    ds = load_prompts(str(dapo_parquet))
    out = capsys.readouterr().out
    # the last row shares uuid-1 with a different prompt: another problem, kept, with a warning
    assert "13 rows read, 4 unique" in out and "9 duplicates dropped" in out
    assert "warning: 1 extra_info.index values are shared by rows with different prompts" in out
    assert len(ds) == 4
    assert ds["index"] == ["uuid-0", "uuid-1", "uuid-2", "uuid-1"]
    assert ds["ground_truth"] == ["0", "2", "4", "0"]
    assert ds["problem"][1] == "What is 1+1?"  # template stripped; first occurrence kept
    assert ds[0]["prompt"] == [{"role": "user", "content": DAPO_PREFIX + "What is 0+0?" + DAPO_SUFFIX}]
    assert set(ds.column_names) >= {"prompt", "ground_truth", "data_source", "index"}
    assert load_prompts(str(dapo_parquet), limit=2)["index"] == ["uuid-0", "uuid-1"]


def test_dapo_eval_parquet_int_index_raw_problem(tmp_path: Path):
    """DAPO's AIME eval parquet: int index, raw_problem, every problem repeated (32x there)."""
    rows = [
        {**dapo_row("", f"P{k}", str(k)), "extra_info": {"index": k, "raw_problem": f"P{k}", "split": None}}
        for k in range(2)
    ] * 3
    path = tmp_path / "aime-2024.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_prompts(str(path))
    assert ds["index"] == ["0", "1"] and ds["problem"] == ["P0", "P1"] and ds["ground_truth"] == ["0", "1"]


def test_jsonl_json_and_problem_answer(tmp_path: Path):
    rows = [dapo_row("a", "1+1", "2"), dapo_row("b", "2+2", "4"), dapo_row("a", "1+1", "2")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_prompts(str(jsonl))
    assert ds["index"] == ["a", "b"] and ds["ground_truth"] == ["2", "4"]

    simple = [
        {"id": 7, "problem": "Find x if x+1=3.", "answer": 2},
        {"id": 8, "problem": "3*3?", "answer": "9"},
    ]
    js = tmp_path / "aime.json"
    js.write_text(json.dumps(simple))
    ds = load_prompts(str(js))
    assert ds["ground_truth"] == ["2", "9"] and ds["index"] == ["7", "8"]
    assert ds[0]["prompt"] == [{"role": "user", "content": DAPO_PREFIX + "Find x if x+1=3." + DAPO_SUFFIX}]
    assert ds["problem"][0] == "Find x if x+1=3."

    # An object holding one list (some eval dumps) reads the same.
    js.write_text(json.dumps({"data": simple}))
    assert len(load_prompts(str(js))) == 2


@pytest.mark.parametrize(
    "row, field",
    [
        (
            {"prompt": [{"role": "user", "content": "hi"}], "extra_info": {"index": "x"}},
            "reward_model.ground_truth",
        ),
        ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}, "prompt[0].content"),
        ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "prompt"),
        ({"prompt": "q", "reward_model": {"ground_truth": ""}}, "reward_model.ground_truth"),
        ({"problem": "1+1"}, "answer"),
        ({"problem": "", "answer": "1"}, "problem"),
        ({"problem": "1+1", "answer": [1]}, "answer"),
    ],
)
def test_schema_errors_name_file_row_field(tmp_path: Path, row: dict, field: str):
    good = dapo_row("ok", "1+1", "2")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and repr(field) in msg


def test_schema_error_in_parquet_and_unknown_layout(tmp_path: Path):
    path = tmp_path / "nogt.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "q"}], "x": 1}]), path)
    with pytest.raises(DataError, match=r"nogt\.parquet: row 0: field 'reward_model.ground_truth'"):
        load_prompts(str(path))
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"other\.jsonl: row 0: no field 'prompt'.*text"):
        load_prompts(str(path))
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"other\.jsonl: line 1: not valid JSON"):
        load_prompts(str(path))


def test_missing_file_and_unknown_source(tmp_path: Path):
    missing = tmp_path / "nope" / "data.parquet"
    with pytest.raises(DataError, match="not found: " + str(missing)):
        load_prompts(str(missing))
    with pytest.raises(DataError, match="unknown data source 'gsm9k'"):
        load_prompts("gsm9k")


def test_hub_unreachable_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_prompts("dapo-math-17k")
    msg = str(err.value)
    assert "BytedTsinghua-SIA/DAPO-Math-17k" in msg and "unreachable" in msg and "--data" in msg


def test_arith_deterministic_disjoint_and_checkable():
    cfg = arith.ArithConfig(n_train=3000, n_test=300)
    train, train2 = arith.generate("train", cfg), arith.generate("train", cfg)
    assert train == train2
    assert train != arith.generate("train", arith.ArithConfig(n_train=3000, seed=1))
    test = arith.generate("test", cfg)
    train_p = {r["extra_info"]["problem"] for r in train}
    test_p = {r["extra_info"]["problem"] for r in test}
    assert len(train_p) == 3000 and len(test_p) == 300 and not train_p & test_p
    # A different seed's train split still never contains a test problem.
    assert (
        not {r["extra_info"]["problem"] for r in arith.generate("train", arith.ArithConfig(seed=5))} & test_p
    )
    for r in train[:200]:
        assert r["reward_model"]["ground_truth"] == str(eval(r["extra_info"]["problem"]))  # noqa: S307
        assert set(r) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}


def test_arith_difficulty_knob_and_loader():
    cfg = arith.ArithConfig.from_spec("digits=3,operands=4,ops=+-*,seed=2")
    rows = arith.generate("test", cfg, n=50)
    for r in rows:
        p = r["extra_info"]["problem"]
        assert len([c for c in p if c in "+-*"]) == 3
        assert max(len(x) for x in p.replace("-", "+").replace("*", "+").split("+")) <= 3
        assert r["reward_model"]["ground_truth"] == str(eval(p))  # noqa: S307
    ds = load_prompts("arith:digits=3,operands=4,ops=+-*,seed=2", split="test", limit=50)
    assert ds["problem"] == [r["extra_info"]["problem"] for r in rows]
    assert ds[0]["prompt"] == [
        {"role": "user", "content": arith.PROMPT_TEMPLATE.format(problem=ds["problem"][0])}
    ]
    with pytest.raises(ValueError, match="digits"):
        arith.ArithConfig.from_spec("digits=0")
    with pytest.raises(ValueError, match="bad option"):
        load_prompts("arith:depth=3")
    with pytest.raises(ValueError, match="distinct"):
        arith.generate("test", arith.ArithConfig(digits=1, operands=2), n=1000)


@pytest.mark.skipif(not os.path.isdir(EMBEDDED_MODEL), reason="embedded model not built yet")
def test_embedded_model_and_tokenizer_load():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import looped  # noqa: F401  (registers the Ouro classes with the Auto classes)

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL)
    assert type(model).__name__ == "OuroForCausalLM" and model.config.total_ut_steps == 4
    assert (
        tok.eos_token_id is not None and tok.pad_token_id is not None and tok.eos_token_id != tok.pad_token_id
    )
    prompt = load_prompts("arith", split="test", limit=1)[0]["prompt"]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids) == tok.bos_token + prompt[0]["content"] + "\n"
    target = arith.completion("123")
    assert tok.decode(tok(target)["input_ids"]) == target
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert total < 10 * 2**20
    with torch.no_grad():
        out = model(torch.tensor([ids]), depth=2)
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)


def test_make_tiny_smoke(tmp_path: Path):
    """The rebuild command end to end at toy size: trains, measures every depth, saves a loadable dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl import make_tiny

    out = tmp_path / "tiny"
    sizes = (
        "--hidden_size 16 --intermediate_size 32 --total_ut_steps 2 --batch_size 8 --val_size 8 --test_size 8"
    )
    argv = ["--out", str(out), *sizes.split(), "--max_steps", "3", "--eval_every", "2"]
    assert make_tiny.main(argv) == 0
    info = json.loads((out / "make_tiny.json").read_text())
    assert info["steps"] == 3 and set(info["test_accuracy_by_depth"]) == {"d1", "d2"}
    assert AutoModelForCausalLM.from_pretrained(out).config.total_ut_steps == 2
    assert AutoTokenizer.from_pretrained(out).chat_template == make_tiny.CHAT_TEMPLATE
    with pytest.raises(ValueError, match="exit_weighting"):
        make_tiny.main(["--out", str(out), "--exit_weighting", "deepest"])
