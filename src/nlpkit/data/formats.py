"""What rows mean, by shape: classification (text, optional pair, label), instructions (alpaca, messages,
prompt/completion, text, code) for SFT, prompt rows for RL, and code problems with unit tests (MBPP: text, test_list,
test_setup_code, code); preference pairs have their own module (preference.py). Every row is validated as it is
converted; a bad one is reported with its file, line and field.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass

from nlpkit.data.sources import LABEL_COLUMNS, TEXT_COLUMNS, Rows, subsample
from nlpkit.errors import NlpkitError


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
    if is_code_set(rows):
        return "code"
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
        return {"text": row_field(row, ("text",), rows, i, fmt)}
    if fmt == "code":  # the reference solution, fenced as the prompt's reader (and extract_code) expect it
        solution = row_field(row, ("code",), rows, i, fmt).strip()
        return {"prompt": [{"role": "user", "content": code_prompt(row, rows, i)}],
                "completion": [{"role": "assistant", "content": f"```python\n{solution}\n```"}]}
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
    prompt = row_field(row, PROMPT_FIELDS, rows, i, fmt)
    extra = row.get("input") or row.get("context")
    if fmt == "alpaca" and isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    answer = row_field(row, ANSWER_FIELDS, rows, i, fmt)
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def row_field(row: dict, names: tuple[str, ...], rows: Rows, i: int, fmt: str) -> str:
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


# ---------------------------------------------------------------------------------------------- prompt rows (rlhf)

PROMPT_COLUMNS = ("prompt", "question", "query", "instruction")


def prompt_column(rows: Rows, chosen: str | None) -> str:
    if is_code_set(rows) and chosen is None:
        return "text"  # the problem; prompt_records renders it with one of its asserts
    present = list(rows.rows[0])
    column = chosen or next((c for c in PROMPT_COLUMNS if c in present), None)
    if column is None or column not in present:
        raise NlpkitError(f"{rows.name}: no prompt column (columns: {', '.join(present)}); rlhf needs one of "
                          f"{', '.join(PROMPT_COLUMNS)}, or set data.text_column to the column that holds prompts")
    return column


def prompt_records(rows: Rows, column: str) -> list[dict]:
    """Each row as {"prompt": text, other columns...}; the other columns reach reward functions as keywords.
    A code set's rows: the rendered code prompt, with test_list and test_setup_code for the unit-test rewards."""
    if is_code_set(rows):
        return code_records(rows, column)
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


# ---------------------------------------------------------------------------------------------- code problems (mbpp)

# The problem plus ONE of its asserts: MBPP's text never names the function, the asserts do. The other asserts stay
# hidden, so passing them is evidence the code is right and not fitted to the example.
CODE_PROMPT = "{text}\nYour code should pass this test:\n{test}"


def is_code_set(rows: Rows) -> bool:
    """Rows of code problems with unit tests (MBPP's columns): any row with a test_list makes it one."""
    return any("test_list" in row for row in rows.rows)


def code_tests(row: dict, rows: Rows, i: int) -> list[str]:
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise NlpkitError(f"{rows.where(i)}: no tests in 'test_list' (got {tests!r}); every code problem needs a "
                          "list of assert statements that call its function; add them or remove the row")
    setup = row.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise NlpkitError(f"{rows.where(i)}: 'test_setup_code' must be text, got {type(setup).__name__}")
    return tests


def code_prompt(row: dict, rows: Rows, i: int, column: str = "text") -> str:
    """The user turn for a code problem (the chat template is applied where the model reads it)."""
    tests = code_tests(row, rows, i)
    return CODE_PROMPT.format(text=row_field(row, (column,), rows, i, "code").strip(), test=tests[0].strip())


def code_records(rows: Rows, column: str = "text") -> list[dict]:
    """Each code problem as {"prompt", "test_list", "test_setup_code"}: the rewards run the code, the setup and every
    assert of test_list (nlpkit/rewards.py)."""
    return [{"prompt": code_prompt(row, rows, i, column), "test_list": list(row["test_list"]),
             "test_setup_code": row.get("test_setup_code") or ""} for i, row in enumerate(rows.rows)]
