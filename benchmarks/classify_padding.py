"""Classification throughput: nlpkit's default against run_glue-style fixed padding, same model, same SST-2 slice.

    NLPKIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/classify_padding.py [--samples 2048]

The peer is what transformers' run_glue.py does by default: pad every input to max_seq_length=128, fp32, random
batches. Ours: dynamic padding, length-grouped batches, bf16 autocast where the CPU runs it fast. Both train the
same embedded MiniLM-L6 for the same number of samples with the same Trainer; one run each, ratio printed.
"""

import argparse
import os
import tempfile
import time

from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments
from transformers import default_data_collator

from nlpkit.data import classification_examples, infer_label_space, open_source, resolve_columns, subsample
from nlpkit.models import bf16_is_fast, resolve_model
from nlpkit.stages.classify import tokenize


def samples_per_second(dataset, collator, *, bf16: bool, sampling: str, batch_size: int, model_dir: str) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 bf16=bf16, use_cpu=True, train_sampling_strategy=sampling, report_to="none",
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        return len(dataset) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048, help="SST-2 training rows, a seeded random slice")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not os.environ.get("NLPKIT_DATA_DIR"):
        raise SystemExit("set NLPKIT_DATA_DIR to the data mirror (../shared/data in this repository's checks)")

    from transformers import AutoTokenizer

    model_dir = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = open_source("sst2", "train", "benchmark")
    text, pair, label = resolve_columns(rows, None, None, None)
    labels = infer_label_space(rows, label, "auto", rows.catalog.label_names)
    columns = subsample(classification_examples(rows, text, pair, label, labels, rows.catalog.label_names),
                        args.samples, seed=0)

    dynamic = tokenize(columns, tokenizer, max_length=128)
    fixed = dynamic.map(lambda b: tokenizer.pad(b, padding="max_length", max_length=128), batched=True)
    mean_tokens = sum(dynamic["length"]) / len(dynamic)
    bf16 = bf16_is_fast()

    peer = samples_per_second(fixed.remove_columns("length"), default_data_collator, bf16=False, sampling="random",
                              batch_size=args.batch_size, model_dir=model_dir)
    ours = samples_per_second(dynamic, DataCollatorWithPadding(tokenizer), bf16=bf16, sampling="group_by_length",
                              batch_size=args.batch_size, model_dir=model_dir)
    print(f"SST-2 slice: {len(dynamic)} samples, mean {mean_tokens:.1f} tokens; model: minilm; batch {args.batch_size}")
    print(f"run_glue-style (pad to 128, fp32, random order): {peer:8.1f} samples/s")
    print(f"nlpkit default (dynamic, length-grouped, bf16={bf16}): {ours:8.1f} samples/s")
    print(f"ratio: {ours / peer:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
