"""BERT-style [CLS] sequence classification: binary, multi-class, multi-label and regression; texts or text pairs.

    nlpkit finetune classify-sst2            # full fine-tuning
    nlpkit finetune classify-sst2-lora       # LoRA adapters + the head; add --bits 4 for QLoRA
    nlpkit eval runs/classify-sst2 --data sst2:validation --json       # nlpkit/evaluate.py

Fast on CPU by construction: dynamic padding with length-grouped batches (most SST-2 inputs are far shorter than a
fixed 128-token pad), and bf16 autocast where the hardware runs it fast (`train.bf16: auto`).
"""

from __future__ import annotations

import time
from pathlib import Path


from nlpkit import report, training
from nlpkit.adapters import apply_peft
from nlpkit.config import Recipe
from nlpkit.data import (
    classification_examples,
    default_eval_source,
    infer_label_space,
    open_source,
    resolve_columns,
    subsample,
    tokenize_classification,
)
from nlpkit.evaluate import classification_scores, prefixed
from nlpkit.models import bf16_is_fast, load_model, load_tokenizer


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    """Fine-tune, evaluate, save model + tokenizer + manifest + metrics into output_dir. Returns the final metrics."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    set_seed(cfg.train.seed)  # before the model exists: the new head's random init is part of the run
    data = cfg.data
    train_rows = open_source(data.train, "train", "data.train", data.mirror)
    text_col, pair_col, label_col = resolve_columns(train_rows, data.text_column, data.text_pair_column,
                                                    data.label_column)
    label_names = data.label_names or (train_rows.catalog.label_names if train_rows.catalog else None)
    labels = infer_label_space(train_rows, label_col, data.problem_type, label_names)
    train_columns = classification_examples(train_rows, text_col, pair_col, label_col, labels, label_names)
    train_columns = subsample(train_columns, data.max_train_samples, cfg.train.seed)

    eval_spec = data.eval or default_eval_source(data.train)
    eval_rows = open_source(eval_spec, "validation", "data.eval", data.mirror) if eval_spec else None
    if eval_rows is not None:
        eval_columns = classification_examples(eval_rows, text_col, pair_col, label_col, labels, label_names)
        eval_columns = subsample(eval_columns, data.max_eval_samples, cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    max_length = _max_length(data.max_length, tokenizer)
    train_set = tokenize_classification(train_columns, tokenizer, max_length)
    eval_set = tokenize_classification(eval_columns, tokenizer, max_length) if eval_rows is not None else None

    names = {"id2label": dict(enumerate(labels.names)), "label2id": {n: i for i, n in enumerate(labels.names)}}
    model = load_model(AutoModelForSequenceClassification, cfg.model, quant=cfg.quant, frozen=cfg.peft is not None,
                       num_labels=labels.num_labels,
                       problem_type=labels.problem_type, **(names if labels.names else {}))
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft, task_type="SEQ_CLS")  # the classifier head trains in full and is saved
    else:
        report.print_parameters(model)
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    args = training.classifier_arguments(cfg, output_dir, bf16=bf16, has_eval=eval_set is not None)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: classification_scores(p.predictions, p.label_ids, labels, full=False),
        callbacks=[training.jsonl_log_callback(output_dir / "train_log.jsonl"),
                   *training.tracker_callbacks(cfg.train, output_dir)],
    )
    metrics = training.fit(trainer, cfg, checkpoint)
    if eval_set is not None:
        prediction = trainer.predict(eval_set)
        metrics |= {"eval_loss": prediction.metrics["test_loss"],
                    **prefixed(classification_scores(prediction.predictions, prediction.label_ids, labels))}
    trainer.save_model(str(output_dir))  # the model (or adapter + head) and the tokenizer
    if cfg.peft is not None and report.is_main_process():
        model.config.save_pretrained(output_dir)  # an adapter save has no config.json: keep id2label/label2id
    task = {
        "text_column": text_col, "text_pair_column": pair_col, "label_column": label_col,
        "label_names": label_names, "problem_type": labels.problem_type, "labels": labels.names,
        "max_length": max_length, "bf16": bf16,
    }
    datasets_used = [train_rows] + ([eval_rows] if eval_rows is not None else [])
    report.write_run(output_dir, cfg, metrics, task=task, datasets=datasets_used, started=started)
    return metrics


# ---------------------------------------------------------------------------------------------- helpers


def _max_length(requested: int, tokenizer) -> int:
    limit = tokenizer.model_max_length
    if limit and limit < requested:
        report.warn(f"data.max_length={requested} is above the model's limit {limit}; using {limit}")
        return limit
    return requested


