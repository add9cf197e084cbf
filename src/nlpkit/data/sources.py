"""Where rows come from: files, folders, catalog names (through the mirror) and hub ids, read into `Rows` that can
name the file and line of every row.

A data source is written as one string:
- a file (.csv .tsv .jsonl .json .parquet) or a folder holding `<split>.<ext>` files;
- a catalog name (`sst2`, `ag_news`, `dolly`, `gsm8k`, `hh_rlhf`, `ppo_prompts`, `mbpp`), read from the mirror folder
  (`data.mirror` or $NLPKIT_DATA_DIR) when one is set, else from its public hub copy (HUB_COPIES), mapped to the
  mirror's columns, labels and splits;
- a hub id `owner/name`.
Append `:split` to pick a split (`sst2:validation`); files and folders take the split from their own name.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from nlpkit.errors import NlpkitError

DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class CatalogEntry:
    folder: str  # folder under the mirror
    files: dict[str, str]  # split -> file in that folder
    eval_split: str | None  # the split a recipe evaluates on by default
    columns: dict[str, str] = field(default_factory=dict)  # role (text, text_pair, label) -> column
    label_names: dict[str, str] | None = None  # raw label -> name


CATALOG = {
    "sst2": CatalogEntry(
        "sst2", {"train": "train.tsv", "validation": "validation.tsv"}, "validation",
        {"text": "sentence", "label": "label"}, {"0": "negative", "1": "positive"},
    ),
    "ag_news": CatalogEntry(
        # The mirror keeps the original AG layout: labels 1-4, title and description in separate columns.
        "ag_news", {"train": "train.csv", "test": "test.csv"}, "test",
        {"text": "title", "text_pair": "description", "label": "label"},
        {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"},
    ),
    "dolly": CatalogEntry("dolly_open_qa", {"train": "train.jsonl", "test": "test.jsonl"}, "test"),
    "gsm8k": CatalogEntry("gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}, "test"),
    "hh_rlhf": CatalogEntry("hh_rlhf_harmless", {"train": "train.jsonl", "test": "test.jsonl"}, "test"),
    "ppo_prompts": CatalogEntry("ppo_prompts", {"train": "prompts.jsonl"}, None),
    # Code problems with unit tests (the authors' splits by task_id); rows render as code prompts (data/formats.py).
    "mbpp": CatalogEntry(
        "mbpp", {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl", "prompt": "prompt.jsonl"},
        "test"),
}


# ---------------------------------------------------------------------------------------------- hub copies
# Without a mirror, a catalog name loads its public hub copy and maps it to the mirror's layout, so recipes, label
# names and metrics are the same either way (docs/outside.md):
#
# | name        | hub copy (load_dataset arguments)               | mapped to the mirror's layout                      |
# |-------------|-------------------------------------------------|----------------------------------------------------|
# | sst2        | stanfordnlp/sst2                                | sentence, label 0/1 (idx dropped)                  |
# | ag_news     | fancyzhx/ag_news                                | label 0-3 -> 1-4 (World, Sports, Business,         |
# |             |                                                 | Sci/Tech); `text` is title and description joined  |
# | dolly       | databricks/databricks-dolly-15k (train only)    | open_qa only, instruction + response, duplicate    |
# |             |                                                 | instructions dropped, 200 seeded rows -> test      |
# | gsm8k       | openai/gsm8k, name="main"                       | question, answer (as is)                           |
# | hh_rlhf     | Anthropic/hh-rlhf, data_dir="harmless-base"     | split at the last "\n\nAssistant:": prompt,        |
# |             |                                                 | chosen, rejected, chosen_full, rejected_full       |
# | mbpp        | google-research-datasets/mbpp, name="full"      | as is (train, validation, test, prompt)            |
# | ppo_prompts | none (a mix made for the mirror): mirror only   |                                                    |


@dataclass(frozen=True)
class HubCopy:
    hub_id: str
    splits: dict[str, str]  # catalog split -> the hub split its rows come from
    options: dict = field(default_factory=dict)  # more load_dataset keywords (name=, data_dir=)
    to_mirror: Callable[[list[dict], str], list[dict]] | None = None  # hub rows of a split -> the mirror's rows
    columns: dict[str, str] | None = None  # role -> column where they differ from the mirror's (CatalogEntry)


def _keep(*names: str):
    return lambda rows, split: [{name: row[name] for name in names} for row in rows]


def _ag_news(rows: list[dict], split: str) -> list[dict]:
    # The hub numbers the labels 0-3; the mirror (and the catalog's label names) 1-4, as the original AG files.
    return [{"text": row["text"], "label": row["label"] + 1} for row in rows]


DOLLY_TEST_ROWS, DOLLY_SEED = 200, 11  # as the mirror's test split was drawn (its README)


def _dolly(rows: list[dict], split: str) -> list[dict]:
    """The open_qa category, duplicate instructions dropped, and a seeded 200-row test split: the hub has one split."""
    seen, kept = set(), []
    for row in rows:
        key = row["instruction"].strip().lower()
        if row["category"] == "open_qa" and key not in seen:
            seen.add(key)
            kept.append({"instruction": row["instruction"], "response": row["response"]})
    random.Random(DOLLY_SEED).shuffle(kept)
    return kept[:DOLLY_TEST_ROWS] if split == "test" else kept[DOLLY_TEST_ROWS:]


ASSISTANT = "\n\nAssistant:"


def _hh_rlhf(rows: list[dict], split: str) -> list[dict]:
    """Full transcripts -> the shared prompt and the two final replies; pairs whose prompts differ are dropped."""
    pairs = []
    for row in rows:
        chosen_cut = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
        rejected_cut = row["rejected"].rfind(ASSISTANT) + len(ASSISTANT)
        prompt = row["chosen"][:chosen_cut]
        if chosen_cut >= len(ASSISTANT) and prompt == row["rejected"][:rejected_cut]:
            pairs.append({"prompt": prompt, "chosen": row["chosen"][chosen_cut:],
                          "rejected": row["rejected"][rejected_cut:], "chosen_full": row["chosen"],
                          "rejected_full": row["rejected"]})
    return pairs


HUB_COPIES = {
    "sst2": HubCopy("stanfordnlp/sst2", {"train": "train", "validation": "validation"},
                    to_mirror=_keep("sentence", "label")),
    "ag_news": HubCopy("fancyzhx/ag_news", {"train": "train", "test": "test"}, to_mirror=_ag_news,
                       columns={"text": "text", "label": "label"}),
    "dolly": HubCopy("databricks/databricks-dolly-15k", {"train": "train", "test": "train"}, to_mirror=_dolly),
    "gsm8k": HubCopy("openai/gsm8k", {"train": "train", "test": "test"}, {"name": "main"},
                     to_mirror=_keep("question", "answer")),
    "hh_rlhf": HubCopy("Anthropic/hh-rlhf", {"train": "train", "test": "test"}, {"data_dir": "harmless-base"},
                       to_mirror=_hh_rlhf),
}
HUB_COPIES["mbpp"] = HubCopy("google-research-datasets/mbpp", {s: s for s in ("train", "validation", "test", "prompt")},
                             {"name": "full"})


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
    entry, hub = CATALOG[name], HUB_COPIES.get(name)
    if split not in entry.files:
        raise NlpkitError(f"{key} {name}:{split}: {name} has no split {split!r}; splits: {', '.join(entry.files)}")
    root = mirror_dir(mirror)
    if root is None and hub is None:
        raise NlpkitError(f"{key} {name}: has no public hub copy, it is read from a data mirror only; set "
                          f"NLPKIT_DATA_DIR (or data.mirror) to the folder that holds {entry.folder}/")
    if root is None:
        return _read_hub_copy(name, entry, hub, split, key)
    path = root / entry.folder / entry.files[split]
    if not path.is_file():
        raise NlpkitError(
            f"{key} {name}: {path} not found; the data mirror ({root}, from data.mirror or NLPKIT_DATA_DIR) "
            f"must hold {entry.folder}/{entry.files[split]}"
        )
    rows = read_file(path)
    rows.catalog = entry
    return rows


def _read_hub_copy(name: str, entry: CatalogEntry, hub: HubCopy, split: str, key: str) -> Rows:
    """No mirror: the public hub copy, mapped to the mirror's columns, labels and splits. Offline: one line naming
    both ways to get the data."""
    mirror_way = f"set NLPKIT_DATA_DIR (or data.mirror) to a data mirror holding {entry.folder}/{entry.files[split]}"
    rows = _read_hub(hub.hub_id, hub.splits[split], key, hub.options, fix=f"{mirror_way}, or connect to the hub")
    if hub.to_mirror is not None:
        rows.rows = hub.to_mirror(rows.rows, split)
    if not rows.rows:
        raise NlpkitError(f"{key} {name}:{split}: no rows left in the hub copy {hub.hub_id}; {mirror_way}")
    where = f"{hub.hub_id}:{split}" + "".join(f" {k}={v}" for k, v in hub.options.items())
    rows.name = rows.fingerprint = where
    rows.catalog = replace(entry, columns=hub.columns) if hub.columns else entry
    return rows


def _read_hub(hub_id: str, split: str, key: str, options: dict | None = None,
              fix: str = "offline, point NLPKIT_DATA_DIR at a data mirror or use a local file") -> Rows:
    import datasets

    unreachable = _hub_unreachable()
    if unreachable:
        raise NlpkitError(f"{key} {hub_id}:{split}: could not load it from the hub ({unreachable}); {fix}")
    try:
        dataset = datasets.load_dataset(hub_id, split=split, **(options or {}))
    except Exception as e:  # the hub client raises many types; offline machines land here
        raise NlpkitError(f"{key} {hub_id}:{split}: could not load it from the hub ({type(e).__name__}); "
                          f"{fix}") from None
    if len(dataset) == 0:
        raise NlpkitError(f"{key} {hub_id}:{split}: no rows; a dataset must hold at least one example")
    return Rows(dataset.to_list(), f"{hub_id}:{split}", None, f"{hub_id}:{split}")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, found in 3 s at most: load_dataset would retry for ~25 s, with a warning a
    retry, before failing. None where it answers, or in offline mode (HF_HUB_OFFLINE: load_dataset reads its cache)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return f"{url.hostname} unreachable"
    return None


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


def subsample(columns: dict[str, list], limit: int | None, seed: int) -> dict[str, list]:
    """A seeded random subset (in original order), so quick runs still see every label."""
    size = len(next(iter(columns.values())))
    if limit is None or limit >= size:
        return columns
    keep = sorted(random.Random(seed).sample(range(size), limit))
    return {name: [values[i] for i in keep] for name, values in columns.items()}
