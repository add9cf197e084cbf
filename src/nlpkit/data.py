"""Rows from files, folders, catalog names and hub ids; validation with file/line/column in every error; label maps.

A data source is written as one string:
- a file (.csv .tsv .jsonl .json .parquet) or a folder holding `<split>.<ext>` files;
- a catalog name (`sst2`, `ag_news`, `dolly`, `gsm8k`, `hh_rlhf`, `ppo_prompts`), read from the mirror folder
  (`data.mirror` or $NLPKIT_DATA_DIR) when one is set, else from its hub id;
- a hub id `owner/name`.
Append `:split` to pick a split (`sst2:validation`); files and folders take the split from their own name.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from nlpkit.errors import NlpkitError

DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class CatalogEntry:
    folder: str  # folder under the mirror
    files: dict[str, str]  # split -> file in that folder
    eval_split: str | None  # the split a recipe evaluates on by default
    hub_id: str | None  # only where the hub copy has the mirror's layout; None = mirror only
    columns: dict[str, str] = field(default_factory=dict)  # role (text, text_pair, label) -> column
    label_names: dict[str, str] | None = None  # raw label -> name


CATALOG = {
    "sst2": CatalogEntry(
        "sst2", {"train": "train.tsv", "validation": "validation.tsv"}, "validation", "stanfordnlp/sst2",
        {"text": "sentence", "label": "label"}, {"0": "negative", "1": "positive"},
    ),
    "ag_news": CatalogEntry(
        # The mirror keeps the original AG layout: labels 1-4, title and description in separate columns.
        "ag_news", {"train": "train.csv", "test": "test.csv"}, "test", None,
        {"text": "title", "text_pair": "description", "label": "label"},
        {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"},
    ),
    "dolly": CatalogEntry(
        "dolly_open_qa", {"train": "train.jsonl", "test": "test.jsonl"}, "test", "databricks/databricks-dolly-15k"
    ),
    "gsm8k": CatalogEntry("gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}, "test", None),
    "hh_rlhf": CatalogEntry("hh_rlhf_harmless", {"train": "train.jsonl", "test": "test.jsonl"}, "test", None),
    "ppo_prompts": CatalogEntry("ppo_prompts", {"train": "prompts.jsonl"}, None, None),
}


@dataclass
class Rows:
    """Rows of one split, and where they came from, so errors can point at a line."""

    rows: list[dict]
    name: str  # file path or hub id:split
    line_offset: int | None  # line of row 0 in a text file; None where rows have no line (parquet, hub)
    fingerprint: str  # sha256 of the file bytes, or the hub id and split
    catalog: CatalogEntry | None = None

    def where(self, index: int) -> str:
        if self.line_offset is None:
            return f"{self.name} row {index + 1}"
        return f"{self.name} line {index + self.line_offset}"


# ---------------------------------------------------------------------------------------------- sources


def open_source(spec: str, split: str, key: str, mirror: str | None = None) -> Rows:
    """Read one split of a data source. `key` names the setting in errors (data.train, --data, ...)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        return read_file(_split_file(path, split, key))
    name, _, chosen = spec.partition(":")
    split = chosen or split
    if name in CATALOG:
        return _read_catalog(name, split, key, mirror)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.suffix:
        return _read_hub(name, split, key)
    close = difflib.get_close_matches(name, list(CATALOG), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; catalog names: {', '.join(CATALOG)}"
    raise NlpkitError(f"{key} {spec!r}: no such file or folder, and not a catalog name or hub id{hint}")


def catalog_entry(spec: str) -> CatalogEntry | None:
    if Path(spec).expanduser().exists():
        return None
    return CATALOG.get(spec.partition(":")[0])


def default_eval_source(train_spec: str) -> str | None:
    """A catalog training set evaluates on the catalog's eval split unless the recipe says otherwise."""
    entry = catalog_entry(train_spec)
    if entry is None or entry.eval_split is None:
        return None
    return f"{train_spec.partition(':')[0]}:{entry.eval_split}"


def mirror_dir(setting: str | None) -> Path | None:
    value = setting or os.environ.get("NLPKIT_DATA_DIR")
    return Path(value).expanduser() if value else None


def _read_catalog(name: str, split: str, key: str, mirror: str | None) -> Rows:
    entry = CATALOG[name]
    root = mirror_dir(mirror)
    if root is None and entry.hub_id is None:
        raise NlpkitError(f"{key} {name}: read from a data mirror; set NLPKIT_DATA_DIR (or data.mirror) to the folder "
                          f"that holds {entry.folder}/")
    if root is None:
        rows = _read_hub(entry.hub_id, split, key)
        rows.catalog = entry
        return rows
    if split not in entry.files:
        raise NlpkitError(f"{key} {name}:{split}: {name} has no split {split!r}; splits: {', '.join(entry.files)}")
    path = root / entry.folder / entry.files[split]
    if not path.is_file():
        raise NlpkitError(
            f"{key} {name}: {path} not found; the data mirror ({root}, from data.mirror or NLPKIT_DATA_DIR) "
            f"must hold {entry.folder}/{entry.files[split]}"
        )
    rows = read_file(path)
    rows.catalog = entry
    return rows


def _read_hub(hub_id: str, split: str, key: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # the hub client raises many types; offline machines land here
        raise NlpkitError(
            f"{key} {hub_id}:{split}: could not load it from the hub ({type(e).__name__}); offline, point "
            "NLPKIT_DATA_DIR at a data mirror or use a local file"
        ) from None
    if len(dataset) == 0:
        raise NlpkitError(f"{key} {hub_id}:{split}: no rows; a dataset must hold at least one example")
    return Rows(dataset.to_list(), f"{hub_id}:{split}", None, f"{hub_id}:{split}")


def _split_file(folder: Path, split: str, key: str) -> Path:
    files = sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES)
    for path in files:
        if path.stem == split:
            return path
    if split == "train" and len(files) == 1:
        return files[0]
    names = ", ".join(p.name for p in files) or "none"
    raise NlpkitError(f"{key} {folder}: no {split}.<csv|tsv|jsonl|json|parquet> file in it (data files: {names})")


# ---------------------------------------------------------------------------------------------- files


def read_file(path: Path) -> Rows:
    rows = _read_any(path)
    if not rows.rows:
        raise NlpkitError(f"{path}: no rows; a dataset must hold at least one example")
    return rows


def _read_any(path: Path) -> Rows:
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise NlpkitError(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(DATA_SUFFIXES)}")
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if suffix == ".jsonl":
        return Rows(_read_jsonl(path), str(path), 1, fingerprint)
    if suffix == ".json":
        return Rows(_read_json(path), str(path), None, fingerprint)
    if suffix == ".parquet":
        import pandas as pd

        return Rows(pd.read_parquet(path).to_dict("records"), str(path), None, fingerprint)
    return Rows(_read_delimited(path), str(path), 2, fingerprint)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                raise NlpkitError(f"{path} line {number}: empty line; remove it (each line must be one JSON object)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NlpkitError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise NlpkitError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NlpkitError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise NlpkitError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
    return rows


def _read_delimited(path: Path) -> list[dict]:
    import pandas as pd

    tsv = path.suffix.lower() == ".tsv"
    try:
        # TSV files in NLP (GLUE) are unquoted: a '"' in a sentence is text, not a quote.
        frame = pd.read_csv(
            path, sep="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            keep_default_na=False, encoding="utf-8",
        )
    except pd.errors.ParserError as e:
        raise NlpkitError(f"{path}: {str(e).strip()}; check the delimiter and quoting on that line") from None
    except UnicodeDecodeError as e:
        raise NlpkitError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    return frame.to_dict("records")


# ---------------------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class LabelSpace:
    """What the classifier predicts. `names[i]` is label id i; empty for regression."""

    problem_type: str  # single_label_classification | multi_label_classification | regression
    names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.names) if self.names else 1


PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


def resolve_columns(rows: Rows, text: str | None, pair: str | None, label: str | None, key: str = "data"):
    """Explicit settings win, then the catalog's mapping, then common names. Checks they exist in the first row."""
    mapping = rows.catalog.columns if rows.catalog else {}
    text = text or mapping.get("text")
    pair = pair or mapping.get("text_pair")
    label = label or mapping.get("label")
    present = list(rows.rows[0]) if rows.rows else []
    text = text or next((c for c in TEXT_COLUMNS if c in present), None)
    label = label or next((c for c in LABEL_COLUMNS if c in present), None)
    for role, column in (("text_column", text), ("label_column", label)):
        if column is None:
            raise NlpkitError(f"{rows.name}: no {role.split('_')[0]} column found (columns: {', '.join(present)}); "
                              f"set {key}.{role}")
    for role, column in (("text_column", text), ("text_pair_column", pair), ("label_column", label)):
        if column is not None and present and column not in present:
            close = difflib.get_close_matches(column, present, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NlpkitError(f"{rows.name}: {key}.{role} {column!r} is not a column (columns: "
                              f"{', '.join(present)}){hint}")
    return text, pair, label


def label_key(value) -> str | None:
    """Raw label -> the string that names it: 1, 1.0 and "1" are the same label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    key = str(value).strip()
    return key or None


def infer_label_space(rows: Rows, label_col: str, problem_type: str, label_names: dict[str, str] | None) -> LabelSpace:
    values = [row.get(label_col) for row in rows.rows]
    if problem_type == "auto":
        if any(isinstance(v, list) for v in values):
            problem_type = "multi_label"
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and any(
            isinstance(v, float) and not v.is_integer() for v in values
        ):
            problem_type = "regression"
        else:
            problem_type = "single_label"
    if problem_type == "regression":
        return LabelSpace(PROBLEM_TYPES[problem_type], [])
    keys = set()
    for i, value in enumerate(values):
        for item in value if isinstance(value, list) else [value]:
            key = label_key(item)
            if key is not None:
                keys.add(key)
    ordered = sorted(keys, key=lambda k: (0, int(k), k) if k.lstrip("-").isdigit() else (1, 0, k))
    if label_names:
        unnamed = [k for k in ordered if k not in label_names]
        if unnamed:
            raise NlpkitError(f"{rows.name}: labels {unnamed} have no entry in data.label_names "
                              f"({', '.join(label_names)}); add them or fix the rows")
        ordered = [label_names[k] for k in ordered]
    if problem_type == "single_label" and len(ordered) < 2:
        raise NlpkitError(f"{rows.name}: column {label_col!r} has {len(ordered)} distinct label(s); a classifier "
                          "needs at least 2")
    return LabelSpace(PROBLEM_TYPES[problem_type], ordered)


def classification_examples(rows: Rows, text_col: str, pair_col: str | None, label_col: str, labels: LabelSpace,
                            label_names: dict[str, str] | None) -> dict[str, list]:
    """Validate every row and return columns text, [text_pair], label (id, multi-hot list, or float)."""
    label_id = {name: i for i, name in enumerate(labels.names)}
    texts, pairs, targets = [], [], []
    for i, row in enumerate(rows.rows):
        texts.append(_text(row, text_col, rows, i))
        if pair_col:
            pairs.append(_text(row, pair_col, rows, i))
        if label_col not in row:
            raise NlpkitError(f"{rows.where(i)}: missing column {label_col!r}; every row needs a label")
        value = row[label_col]
        if labels.problem_type == "regression":
            try:
                targets.append(float(value))
            except (TypeError, ValueError):
                raise NlpkitError(f"{rows.where(i)}: label {value!r} in {label_col!r} is not a number "
                                  "(regression needs numeric labels)") from None
            continue
        items = value if isinstance(value, list) else [value]
        if labels.problem_type == "single_label_classification" and isinstance(value, list):
            raise NlpkitError(f"{rows.where(i)}: label is a list; set data.problem_type=multi_label for multi-label data")
        ids = []
        for item in items:
            key = label_key(item)
            if key is None:
                raise NlpkitError(f"{rows.where(i)}: empty label in {label_col!r}; fill it or remove the row")
            name = label_names.get(key, key) if label_names else key
            if name not in label_id:
                raise NlpkitError(f"{rows.where(i)}: label {key!r} is not in the label set {labels.names}; fix the "
                                  "row or train on data that has this label")
            ids.append(label_id[name])
        if labels.problem_type == "multi_label_classification":
            targets.append([1.0 if j in ids else 0.0 for j in range(len(labels.names))])
        else:
            targets.append(ids[0])
    columns = {"text": texts, "label": targets}
    if pair_col:
        columns["text_pair"] = pairs
    return columns


def _text(row: dict, column: str, rows: Rows, i: int) -> str:
    if column not in row:
        raise NlpkitError(f"{rows.where(i)}: missing column {column!r}; add it or set data.text_column")
    value = row[column]
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if not text.strip():
        raise NlpkitError(f"{rows.where(i)}: column {column!r} is empty; fill it or remove the row")
    return text


def subsample(columns: dict[str, list], limit: int | None, seed: int) -> dict[str, list]:
    """A seeded random subset (in original order), so quick runs still see every label."""
    size = len(next(iter(columns.values())))
    if limit is None or limit >= size:
        return columns
    keep = sorted(random.Random(seed).sample(range(size), limit))
    return {name: [values[i] for i in keep] for name, values in columns.items()}


def tokenize_classification(columns: dict[str, list], tokenizer, max_length: int):
    """classification_examples' columns as a tokenized Dataset (text, optional pair), with lengths for grouping."""
    import datasets

    def encode(batch):
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    dataset = datasets.Dataset.from_dict(columns)
    return dataset.map(encode, batched=True, remove_columns=[c for c in ("text", "text_pair") if c in columns])


# ---------------------------------------------------------------------------------------------- instructions (sft)

PROMPT_FIELDS = ("instruction", "prompt", "question")  # alpaca / prompt_completion / gsm8k-style
ANSWER_FIELDS = ("output", "response", "completion", "answer")


def detect_sft_format(rows: Rows, requested: str) -> str:
    if requested != "auto":
        return requested
    columns = set(rows.rows[0])
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and columns & {"output", "response"}:
        return "alpaca"
    if columns & {"prompt", "question"} and columns & {"completion", "answer"}:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise NlpkitError(
        f"{rows.name}: cannot tell the format from the columns ({', '.join(sorted(columns))}); set data.format: alpaca "
        "(instruction, input?, output|response), messages, prompt_completion (prompt|question, completion|answer), text"
    )


def sft_example(row: dict, fmt: str, rows: Rows, i: int) -> dict:
    """One row as trl's conversational prompt-completion ({"prompt": [...], "completion": [...]}) or {"text": ...}."""
    if fmt == "text":
        return {"text": _field(row, ("text",), rows, i, fmt)}
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise NlpkitError(f"{rows.where(i)}: field 'messages' must be a non-empty list of {{role, content}}")
        for j, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise NlpkitError(f"{rows.where(i)}: messages[{j}] must be {{\"role\": str, \"content\": str}}")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise NlpkitError(f"{rows.where(i)}: the last message must be a non-empty assistant turn (what is trained)")
        # Earlier assistant turns are context; the last one is the answer trained on.
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    prompt = _field(row, PROMPT_FIELDS, rows, i, fmt)
    extra = row.get("input") or row.get("context")
    if fmt == "alpaca" and isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    answer = _field(row, ANSWER_FIELDS, rows, i, fmt)
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def _field(row: dict, names: tuple[str, ...], rows: Rows, i: int, fmt: str) -> str:
    name = next((n for n in names if n in row), None)
    if name is None:
        raise NlpkitError(f"{rows.where(i)}: no {' / '.join(repr(n) for n in names)} field; {fmt} rows need one "
                          f"(this row has {', '.join(row) or 'no fields'})")
    value = row[name]
    if not isinstance(value, str):
        raise NlpkitError(f"{rows.where(i)}: field {name!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise NlpkitError(f"{rows.where(i)}: field {name!r} is empty; fill it or remove the row")
    return value


def sft_dataset(rows: Rows, fmt: str, limit: int | None, seed: int):
    """Every row as trl's conversational prompt/completion (or text) example, in a Dataset (seeded subset)."""
    import datasets

    converted = [sft_example(row, fmt, rows, i) for i, row in enumerate(rows.rows)]
    columns = {key: [example[key] for example in converted] for key in converted[0]}
    return datasets.Dataset.from_dict(subsample(columns, limit, seed))


# ---------------------------------------------------------------------------------------------- preference rows (reward)


def preference_columns(rows: Rows) -> dict[str, list]:
    """Validate every row: prompt (optional, in every row or none), chosen, rejected as text.

    With an explicit prompt a reply may be blank (HH-RLHF prefers saying nothing in a few pairs: the score is then
    read at the EOS right after the prompt); a whole text never may.
    """
    explicit = "prompt" in rows.rows[0]
    needed = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    columns = {name: [] for name in needed}
    for i, row in enumerate(rows.rows):
        for name in needed:
            value = row.get(name)
            blank_allowed = explicit and name != "prompt"
            if not isinstance(value, str) or not (value.strip() or blank_allowed):
                what = "missing" if name not in row else "empty or not text"
                raise NlpkitError(f"{rows.where(i)}: {name!r} is {what}; preference rows need "
                                  f"{', '.join(needed)} (this row has {', '.join(row) or 'no fields'})")
            columns[name].append(value)
    return columns


def pair_ids(tokenizer, pairs: dict[str, list], max_length: int) -> dict[str, list]:
    """Token ids of prompt + chosen and prompt + rejected, each with the EOS the score is read at appended.

    Longer texts keep their end (left truncation): the replies and the EOS are what a pair is about, so no pair is
    dropped, only the oldest turns of a long conversation.
    """
    prompts = pairs.get("prompt") or [""] * len(pairs["chosen"])

    def encode(replies):
        return [tokenizer(p + r + tokenizer.eos_token)["input_ids"][-max_length:] for p, r in zip(prompts, replies)]

    return {"chosen_ids": encode(pairs["chosen"]), "rejected_ids": encode(pairs["rejected"])}


# ---------------------------------------------------------------------------------------------- prompt rows (rlhf)

PROMPT_COLUMNS = ("prompt", "question", "query", "instruction")


def prompt_column(rows: Rows, chosen: str | None) -> str:
    present = list(rows.rows[0])
    column = chosen or next((c for c in PROMPT_COLUMNS if c in present), None)
    if column is None or column not in present:
        raise NlpkitError(f"{rows.name}: no prompt column (columns: {', '.join(present)}); rlhf needs one of "
                          f"{', '.join(PROMPT_COLUMNS)}, or set data.text_column to the column that holds prompts")
    return column


def prompt_records(rows: Rows, column: str) -> list[dict]:
    """Each row as {"prompt": text, other columns...}; the other columns reach reward functions as keywords."""
    records, columns = [], set(rows.rows[0])
    for i, row in enumerate(rows.rows):
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            raise NlpkitError(f"{rows.where(i)}: prompt column {column!r} is missing or empty; fill it or remove "
                              "the row")
        if set(row) != columns:  # reward functions get every column as a list over the batch
            odd = sorted(set(row) ^ columns)
            raise NlpkitError(f"{rows.where(i)}: columns differ from the first row's ({', '.join(odd)}); give every "
                              "prompt row the same columns")
        records.append({**{k: v for k, v in row.items() if k != column}, "prompt": text})
    return records


def split_prompts(rows: Rows, column: str, held: int, seed: int, limit: int | None) -> tuple[list[dict], list[dict]]:
    """Hold out `held` prompts (ppo.eval_prompts; shuffled with the seed) that training never samples; the rest,
    at most `limit` of them (data.max_train_samples), are the training prompts."""
    records = prompt_records(rows, column)
    random.Random(seed).shuffle(records)
    if held >= len(records):
        raise NlpkitError(f"ppo.eval_prompts: {held} held-out prompts leave none of the {len(records)} in "
                          f"{rows.name} to train on; lower it or set data.eval")
    train = records[held:]
    if limit:
        train = train[:limit]
    return train, records[:held]
