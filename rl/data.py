"""Prompt data for training and evaluation: one loader, one output shape, one column contract.

`load_prompts(source)` returns a `datasets.Dataset` with the columns the trainer and evaluator use:
`prompt` (chat messages, DAPO-Math-17K's schema, or plain strings when the source's prompts are strings:
TRL's standard format, whose completions reach reward functions as strings), `ground_truth` (str),
`data_source`, `index` and `problem` (the bare problem text, for logs; a source's own column of one of these
names is kept as it is), plus every other column of the source, unchanged.
`source` is a registered name (the hub datasets of the reference job, or the embedded `arith` task), a
local .parquet / .jsonl / .json file, or a Hugging Face hub dataset id (`owner/name`), in DAPO's schema
(`prompt` + `reward_model.ground_truth`) or with a `problem` (or `question`) column wrapped in DAPO's
prompt template.

The column contract (TRL's convention), in one place:
- reward functions get every column except `prompt` by name, as keyword lists (`reward_columns`);
- the gold answer, stored as `ground_truth`, is taken by `rewards.gold.gold_answer`: from the first present
  of `reward_model.ground_truth`, `ground_truth`, `answer`, `solution`; a GSM8K `#### 42` or a `\\boxed{}`
  in it marks the answer, a worked solution without either is refused with the file, row and field. The
  column used is printed at load;
- a column named like a keyword the trainer passes itself (`RESERVED_COLUMNS`) is refused, not shadowed.

Rows are de-duplicated on `extra_info.index` (DAPO-Math-17K's raw file repeats every problem ~100x)
together with the prompt, and the counts are printed, so nobody trains on 1.79M rows believing they are
17k distinct ones; copies of one problem with different gold answers are refused (`_dedup`).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import datasets

from rewards.gold import GoldError, gold_answer
from rewards.scoring import RESERVED_COLUMNS
from rl import arith
from rl.jsonl import iter_jsonl

EMBEDDED_MODEL = str(Path(__file__).resolve().parent / "assets" / "tiny-ouro")

# DAPO-Math-17K's user-message template (problem inserted between the two fixed parts).
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")
OUTPUT_COLUMNS = ("prompt", "ground_truth", "data_source", "index", "problem")  # the loader's own columns
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


class DataError(ValueError):
    """A user-facing problem with a data source: names the file/dataset, row and field."""


@dataclass(frozen=True)
class HubSource:
    hub_id: str
    split: str  # the hub split to read (eval sets have one)
    config: str | None = None


REGISTERED: dict[str, HubSource] = {
    "dapo-math-17k": HubSource("BytedTsinghua-SIA/DAPO-Math-17k", "train"),
    "aime24": HubSource("HuggingFaceH4/aime_2024", "train"),
    "aime25": HubSource("yentinglin/aime_2025", "train"),
    "math500": HubSource("HuggingFaceH4/MATH-500", "test"),
}


def dapo_prompt(problem: str) -> list[dict[str, str]]:
    """Wrap a bare problem in DAPO-Math-17K's prompt template, as one user message."""
    return [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}]


def load_prompts(source: str, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Load prompts + gold answers from a registered name, `arith[:key=value,...]`, a local file or a hub id.

    `split` selects the `arith` split and a hub id's split; registered eval sets have a single split that is
    always used, and local files are read whole. `limit` keeps the first rows after de-duplication.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 or None, got {limit!r}")
    source = str(source)
    name, _, spec = source.partition(":")
    if name == "arith":
        try:
            rows = arith.generate(split, arith.ArithConfig.from_spec(spec), n=limit)
        except ValueError as e:
            raise DataError(f"{source}: {e}") from None
        return _to_dataset([_normalize(r, i, "arith") for i, r in enumerate(rows)], "arith")
    if source in REGISTERED:
        table, where = _read_hub(source, REGISTERED[source]), f"{source} ({REGISTERED[source].hub_id})"
    elif Path(source).exists() or source.endswith(LOCAL_SUFFIXES):
        table, where = _read_local(Path(source)), source
    elif _HUB_ID.fullmatch(source):  # not a local path: a hub dataset id
        try:
            table, where = _read_hub(source, HubSource(source, split)), source
        except DataError as e:
            raise DataError(f"no local file or directory {source!r}, and as a hub dataset id: {e}") from None
    elif os.sep in source:
        table, where = _read_local(Path(source)), source
    else:
        names = ", ".join([*REGISTERED, "arith"])
        raise DataError(f"unknown data source {source!r}: use one of {names}, a .parquet/.jsonl/.json file "
                        "or a hub dataset id (owner/name)")
    rows = _dedup(table, where, limit)
    return _to_dataset([_normalize(row, i, where) for i, row in rows], where)


def reward_columns(dataset: datasets.Dataset) -> list[str]:
    """The columns every reward function gets by name (TRL's convention: all but the prompt)."""
    return [c for c in dataset.column_names if c != "prompt"]


# --- reading -------------------------------------------------------------------------------------


def _read_hub(name: str, hub: HubSource) -> datasets.Dataset:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    instead = (f"Download it where the hub is reachable and pass the local file instead, e.g. --data "
               f"/path/to/{hub.hub_id.split('/')[-1]}.parquet (DAPO schema or problem+answer columns; .parquet, "
               ".jsonl or .json)")
    where = f"cannot load {name!r} from the Hugging Face hub ({hub.hub_id}, split {hub.split})"
    if not offline and (why := _no_hub_connection()):  # fail in a second, not after datasets' retries
        raise DataError(f"{where}: the hub is unreachable ({why}); set HF_HUB_OFFLINE=1 to use a copy in the "
                        f"local cache. {instead}")
    try:
        return datasets.load_dataset(hub.hub_id, hub.config, split=hub.split)
    except Exception as e:  # offline mode, no network, missing repo: all mean "get the file yourself"
        state = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache, "
                 "so the hub is unreachable" if offline else "the hub is unreachable or the dataset is unavailable")
        raise DataError(f"{where}: {state} ({type(e).__name__}: {str(e)[:200]}). {instead}") from e


def _no_hub_connection() -> str | None:
    """Why the hub cannot be reached (no connection to its host), or None. Behind a proxy: not checked."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return f"no connection to {host}: {e.strerror or e}"
    return None


def _read_local(path: Path) -> datasets.Dataset | list[dict]:
    """A parquet file as an Arrow-backed Dataset (lazy rows), json/jsonl as a list of dicts."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)
        holds = f" (it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''})" if inside else ""
        raise DataError(f"data {path} is a directory; give one file: .parquet, .jsonl or .json{holds}")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return datasets.Dataset(pq.read_table(path))
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    if suffix == ".jsonl":
        return [row for _, row in iter_jsonl(path, DataError)]
    if suffix == ".json":
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        except UnicodeDecodeError as e:  # a binary file under a .json name, or another encoding
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}: line {line}: not UTF-8 text (byte {e.start}); is it really JSON?") from None
        if isinstance(data, dict):  # {"data": [...]} or any single list-valued key
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .parquet, .jsonl or .json")


def _dedup_keys(table: datasets.Dataset | list[dict]) -> tuple[list, str]:
    """One key per row and what it is: extra_info.index when present, else an id column, else the
    prompt/problem text (rows without any of these are never dropped)."""
    if isinstance(table, datasets.Dataset):
        cols = table.column_names
        id_col = next((c for c in ("index", "id", "unique_id") if c in cols), None)
        if "extra_info" in cols:
            keys, what = _struct_field(table, "extra_info", "index"), "extra_info.index"
        elif id_col:
            keys, what = list(table[id_col]), id_col
        else:
            keys, what = [None] * len(table), "prompt text"
        if any(k is None for k in keys):
            text_col = next((c for c in ("prompt", "problem", "question") if c in cols), None)
            texts = table[text_col] if text_col else [None] * len(table)
            keys = [k if k is not None else _text_key(t) for k, t in zip(keys, texts)]
        return keys, what
    keys, kinds = [], set()
    for row in table:
        key, kind = None, "prompt text"
        if isinstance(row, dict):
            extra = row.get("extra_info")
            if isinstance(extra, dict) and extra.get("index") is not None:
                key, kind = extra["index"], "extra_info.index"
            for col in ("index", "id", "unique_id"):
                if key is None and row.get(col) is not None:
                    key, kind = row[col], col
            if key is None:
                key = _text_key(row.get("prompt", row.get("problem", row.get("question"))))
        keys.append(key)
        kinds.add(kind)
    return keys, " / ".join(sorted(kinds))


def _struct_field(table: datasets.Dataset, column: str, field: str) -> list:
    """One field of a struct column straight from Arrow (fast even for DAPO's 1.79M raw rows)."""
    import pyarrow as pa

    col = table.data.table.column(column).combine_chunks()
    if pa.types.is_struct(col.type):
        if col.type.get_field_index(field) < 0:
            return [None] * len(table)
        valid = col.is_valid().to_pylist()
        return [v if ok else None for v, ok in zip(col.field(field).to_pylist(), valid)]
    return [e.get(field) if isinstance(e, dict) else None for e in col.to_pylist()]


_CHECKED_ROWS = 200_000  # larger tables (DAPO-Math-17K's raw 1.79M rows) are de-duplicated on the id alone


def _row_text(row):
    return row.get("prompt", row.get("problem", row.get("question"))) if isinstance(row, dict) else None


def _same_gold(rows: list, first: int, i: int, where: str) -> None:
    """Refuse two copies of one problem whose gold answers differ (which one would train is arbitrary)."""
    golds = []
    for j in (first, i):
        try:
            gold = gold_answer(rows[j]) if isinstance(rows[j], dict) else None
        except GoldError:
            gold = None  # validation names that row
        golds.append(None if gold is None else str(gold[0]).strip())
    if None not in golds and golds[0] != golds[1]:
        raise DataError(f"{where}: rows {first} and {i} have the same prompt but different gold answers "
                        f"({golds[0]!r} vs {golds[1]!r}); fix or remove one of them")


def _text_key(value) -> str | None:
    return None if value is None else "text:" + json.dumps(value, sort_keys=True, ensure_ascii=False)


def _dedup(table: datasets.Dataset | list[dict], where: str, limit: int | None) -> list[tuple[int, dict]]:
    """(original row number, row) of the first occurrence of each key, at most `limit` of them;
    prints the counts.

    Where the rows can be read whole (a json/jsonl file, a parquet / hub table up to `_CHECKED_ROWS` rows),
    the key is the id together with the prompt: rows sharing an id but not the prompt are different
    problems, both kept, with a warning; rows with the same key and different gold answers are refused."""
    if len(table) == 0:
        raise DataError(f"{where}: no rows")
    keys, what = _dedup_keys(table)
    rows = table if isinstance(table, list) else table.to_list() if len(table) <= _CHECKED_ROWS else None
    first: dict = {}
    by_id: dict = {}  # id -> its first row
    split: dict = {}  # id -> first row whose prompt differs from the id's first row
    for i, key in enumerate(keys):
        hashable = key if isinstance(key, (str, int, float)) or key is None else json.dumps(key, default=str)
        if hashable is None:  # unreadable row: keep it so that validation names it
            hashable = ("row", i)
        if rows is not None:
            text = _text_key(_row_text(rows[i]))
            j = by_id.setdefault(hashable, i)
            if text != _text_key(_row_text(rows[j])):
                split.setdefault(hashable, i)
            hashable = (hashable, text)
            if hashable in first:
                _same_gold(rows, first[hashable], i, where)
        first.setdefault(hashable, i)
    if split:
        key, i = next(iter(split.items()))
        print(f"{where}: warning: {len(split)} {what} values are shared by rows with different prompts (e.g. "
              f"{what} {key!r}: rows {by_id[key]} and {i}); kept as different problems (de-duplicated on "
              f"{what} + prompt)")
    keep = sorted(first.values())
    dropped = len(keys) - len(keep)
    print(f"{where}: {len(keys)} rows read, {len(keep)} unique (on {what}), {dropped} duplicates dropped")
    keep = keep[:limit] if limit is not None else keep
    if isinstance(table, datasets.Dataset):
        subset = table.select(keep) if len(keep) < len(table) else table
        return list(zip(keep, subset))
    return [(i, table[i]) for i in keep]


# --- validation / normalisation ------------------------------------------------------------------


def _normalize(row, i: int, where: str) -> dict:
    """One raw row (DAPO schema or problem+answer) -> the loader's output columns plus the row's other
    columns (under `extra`), or a DataError naming the file, row and field."""

    def fail(field: str, problem: str) -> DataError:
        return DataError(f"{where}: row {i}: field {field!r} {problem}")

    if not isinstance(row, dict):
        raise DataError(f"{where}: row {i}: expected an object with fields, got {type(row).__name__}")
    try:
        gold = gold_answer(row)  # the gold-answer rule: rewards/gold.py
    except GoldError as e:
        raise DataError(f"{where}: row {i}: {e}") from None
    if "prompt" in row:
        prompt = _validate_prompt(row["prompt"], fail)
        if gold is None:
            reward_model = row.get("reward_model")
            raise fail("reward_model.ground_truth", "is missing (no reward_model column)" if reward_model is None
                       else f"is missing; reward_model is {_show(reward_model)}")
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        problem = extra.get("problem") or extra.get("raw_problem") or _problem_text(prompt)
    elif "problem" in row or "question" in row:
        text_field = "problem" if "problem" in row else "question"
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            raise fail(text_field, f"must be a non-empty string, got {_show(text)}")
        if gold is None:
            raise fail("answer", "is missing (a problem+answer file needs both columns; 'ground_truth' or a "
                                 "'solution' with a \\boxed{} answer also work)")
        prompt, problem = dapo_prompt(text.strip()), text.strip()
    else:
        raise DataError(
            f"{where}: row {i}: no field 'prompt' (DAPO schema) and no 'problem' + 'answer' fields; "
            f"fields present: {', '.join(map(str, row)) or 'none'}"
        )
    ground_truth, gt_field = gold
    raw = row["reward_model"]["ground_truth"] if gt_field == "reward_model.ground_truth" else row[gt_field]
    extracted = isinstance(raw, str) and raw.strip() != str(ground_truth).strip()  # from a \boxed{} / '#### '
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise fail(gt_field, f"must be a string or number, got {_show(ground_truth)}")
    if isinstance(ground_truth, float) and not math.isfinite(ground_truth):
        raise fail(gt_field, f"is {ground_truth!r}, which is no gold answer")
    ground_truth = str(ground_truth).strip()
    if not ground_truth:
        raise fail(gt_field, "is empty")
    extra = row.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    for col in ("index", "id", "unique_id"):
        index = row.get(col) if index is None else index
    reserved = [c for c in row if c in RESERVED_COLUMNS]
    if reserved:
        raise DataError(f"{where}: row {i}: column {reserved[0]!r} has the name of a keyword the trainer passes "
                        f"to reward functions itself ({', '.join(RESERVED_COLUMNS)}); rename the column")
    return {
        "prompt": prompt,
        "ground_truth": ground_truth,
        "data_source": str(row.get("data_source") or where),
        "index": str(index if index is not None else i),
        "problem": problem,
        "gold_field": (gt_field, extracted),
        # the row's own columns, with their values and types: a user's `problem` / `index` / `data_source`
        # replaces the loader's default one (_to_dataset)
        "extra": {k: v for k, v in row.items() if k not in ("prompt", "ground_truth")},
    }


def _validate_prompt(prompt, fail) -> str | list[dict[str, str]]:
    """A chat prompt's messages, or a plain-text prompt as it is: TRL's standard format, whose completions
    reach reward functions as plain strings (the chat template still wraps it as one user message)."""
    if isinstance(prompt, str):  # some mirrors store the templated text directly
        if not prompt.strip():
            raise fail("prompt", "is an empty string")
        return prompt
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise fail("prompt", f"must be a non-empty list of {{role, content}} messages, got {_show(prompt)}")
    messages = []
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise fail(f"prompt[{j}]", f"must be a {{role, content}} message, got {_show(msg)}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise fail(f"prompt[{j}].{key}", f"must be a string, got {_show(msg.get(key))}")
        messages.append({"role": msg["role"], "content": msg["content"]})
    return messages


def _problem_text(prompt: str | list[dict[str, str]]) -> str:
    """The last user message, without DAPO's fixed template parts when they are present."""
    text = prompt if isinstance(prompt, str) else \
        next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])
    if text.startswith(DAPO_PREFIX):
        text = text[len(DAPO_PREFIX) :]
    if text.endswith(DAPO_SUFFIX):
        text = text[: -len(DAPO_SUFFIX)]
    return text


def _show(value) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 63 else text


def _to_dataset(rows: list[dict], where: str) -> datasets.Dataset:
    """The loader's columns with their fixed types, then every other column of the source (None in rows
    that lack it); prints where the gold answers came from."""
    text_prompts = [isinstance(row["prompt"], str) for row in rows]
    if any(text_prompts) and not all(text_prompts):  # completions would reach rewards in two shapes
        kind = "a plain string" if text_prompts[0] else "chat messages"
        other = text_prompts.index(not text_prompts[0])
        raise DataError(f"{where}: row {other}: field 'prompt' is {'chat messages' if text_prompts[0] else 'a string'}"
                        f", but row 0's is {kind}; give every prompt in one form")
    features = datasets.Features(
        {
            "prompt": datasets.Value("string") if all(text_prompts) else
            [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "ground_truth": datasets.Value("string"),
            "data_source": datasets.Value("string"),
            "index": datasets.Value("string"),
            "problem": datasets.Value("string"),
        }
    )
    if where != "arith":
        fields = Counter(field for field, _ in (row["gold_field"] for row in rows))
        extracted = sum(extracted for _, extracted in (row["gold_field"] for row in rows))
        note = f"; {extracted} of them the \\boxed{{}} / '#### ' answer of a longer text" if extracted else ""
        print(f"{where}: gold answers from {', '.join(f'{f!r} ({n} rows)' for f, n in fields.items())}{note} "
              "(rule: rewards/gold.py)")
    names = list(dict.fromkeys(k for row in rows for k in row["extra"]))
    base = ("prompt", "ground_truth")
    table = datasets.Dataset.from_list([{k: row[k] for k in base} for row in rows],
                                       features=datasets.Features({k: features[k] for k in base}))
    for name in OUTPUT_COLUMNS[len(base):]:  # a source's own problem / index / data_source wins, as it is
        if name not in names:
            table = table.add_column(name, [row[name] for row in rows])
            continue
        values = [row["extra"].get(name) for row in rows]  # rows without it get the loader's value
        table = _add_column(table, name, [row[name] if v is None else v for v, row in zip(values, rows)], where)
    for name in names:
        if name not in OUTPUT_COLUMNS:
            table = _add_column(table, name, [row["extra"].get(name) for row in rows], where)
    return table


def _add_column(table: datasets.Dataset, name: str, values: list, where: str) -> datasets.Dataset:
    """One passed-through column. Numbers mixed with strings (`answer: 2` next to `answer: "9"`) become
    strings, said on stdout; other mixtures are refused, since reward functions get one typed list."""
    try:
        return table.add_column(name, values)
    except Exception as e:  # pyarrow's ArrowInvalid / ArrowTypeError: values of several types
        kinds = list(dict.fromkeys(type(v).__name__ for v in values if v is not None))
        if all(isinstance(v, (str, int, float, bool)) for v in values if v is not None):
            print(f"{where}: column {name!r} mixes {', '.join(kinds)} values; reward functions get it as strings")
            return table.add_column(name, [None if v is None else str(v) for v in values])
        raise DataError(f"{where}: column {name!r} holds values of several types ({', '.join(kinds)}); reward "
                        f"functions get each column as one list, so give it one type "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
