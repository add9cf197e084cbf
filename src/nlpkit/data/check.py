"""`nlpkit data check`: the dataset doctor for instruction data, before any training.

    nlpkit data check dolly --model smollm2-135m
    nlpkit data check my_rows.jsonl --format alpaca --max-length 512 --json

Detects the format, validates every row (the first bad one is named by file, line and field), renders one example
through the model's chat template with the trained-on span marked, and counts token lengths: how many rows
max_length would truncate, and how many it would leave with no trained-on token.
"""

from __future__ import annotations

from nlpkit.config import ModelSection
from nlpkit.data.formats import detect_sft_format, sft_example
from nlpkit.data.sources import open_source
from nlpkit.errors import NlpkitError
from nlpkit.models import chat_tokenizer, load_tokenizer


def data_check(source: str, fmt: str, model_ref: str, max_length: int, mirror: str | None = None) -> dict:
    """The dataset doctor: format, every row validated, one rendered example with the trained-on span marked,
    token lengths, and how many rows max_length would truncate or leave with nothing to train on."""
    formats = ("auto", "alpaca", "messages", "prompt_completion", "text")
    if fmt not in formats:
        raise NlpkitError(f"--format {fmt!r}: use one of {', '.join(formats)}")
    rows = open_source(source, "train", "FILE_OR_NAME", mirror)
    fmt = detect_sft_format(rows, fmt)
    converted = [sft_example(row, fmt, rows, i) for i, row in enumerate(rows.rows)]  # raises at the first bad row
    tokenizer = chat_tokenizer(load_tokenizer(ModelSection(name=model_ref)), None)
    lengths, prompt_lengths = [], []
    for example in converted:
        head, full = render(tokenizer, example)
        prompt_lengths.append(len(tokenizer(head, add_special_tokens=False)["input_ids"]))
        lengths.append(len(tokenizer(full, add_special_tokens=False)["input_ids"]))
    empty = sum(1 for p in prompt_lengths if p >= max_length)
    head, full = render(tokenizer, converted[0])
    ordered = sorted(lengths)
    result = {
        "source": rows.name, "format": fmt, "rows": len(rows.rows), "model": model_ref, "max_length": max_length,
        "tokens": {"mean": sum(lengths) / len(lengths), "p50": ordered[len(ordered) // 2],
                   "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]},
        "truncated_rows": sum(1 for n in lengths if n > max_length),
        "rows_without_trained_tokens": empty,
        # «...» marks what the loss is computed on: the answer and its EOS (everything, for plain text).
        "example": f"{head}«{full[len(head):]}»",
    }
    if empty == len(rows.rows):
        raise NlpkitError(f"{rows.name}: no row has a trained-on token within max_length={max_length} "
                          f"(prompts alone fill it); raise --max-length or shorten the prompts")
    return result


def render(tokenizer, example: dict) -> tuple[str, str]:
    """(prompt text, full text) as training renders them; the trained-on span is what follows the prompt."""
    if "text" in example:
        return "", example["text"]
    head = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    return head, full
