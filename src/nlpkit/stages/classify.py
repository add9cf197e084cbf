"""BERT-style [CLS] sequence classification: binary, multi-class, multi-label and regression; texts or text pairs.

    nlpkit finetune recipes/classify-sst2.yaml            # full fine-tuning
    nlpkit finetune recipes/classify-sst2-lora.yaml       # LoRA adapters + the head; add --bits 4 for QLoRA
    nlpkit eval runs/classify-sst2 --data sst2:validation --json

Fast on CPU by construction: dynamic padding with length-grouped batches (most SST-2 inputs are far shorter than a
fixed 128-token pad), and bf16 autocast where the hardware runs it fast (`train.bf16: auto`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nlpkit import report, training
from nlpkit.adapters import apply_peft, load_adapter_run
from nlpkit.config import ModelSection, Recipe, validate_recipe
from nlpkit.data import (
    LabelSpace,
    classification_examples,
    default_eval_source,
    infer_label_space,
    open_source,
    resolve_columns,
    subsample,
)
from nlpkit.models import autocast, bf16_is_fast, load_model, load_tokenizer

MODEL_CLASS = "AutoModelForSequenceClassification"  # what `nlpkit merge` and `nlpkit eval` load a run with
SAMPLE_TEXTS = [  # inputs for merge's logits check: varied lengths, a pair-free sentence each
    "a gripping, beautifully acted film.",
    "the plot is thin and the jokes fall flat.",
    "Stocks rallied after the central bank held rates steady.",
    "The team clinched the title with a late goal in extra time.",
]


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
    train_set = tokenize(train_columns, tokenizer, max_length)
    eval_set = tokenize(eval_columns, tokenizer, max_length) if eval_rows is not None else None

    names = {"id2label": dict(enumerate(labels.names)), "label2id": {n: i for i, n in enumerate(labels.names)}}
    model = load_model(AutoModelForSequenceClassification, cfg.model, quant=cfg.quant, num_labels=labels.num_labels,
                       problem_type=labels.problem_type, **(names if labels.names else {}))
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft, task_type="SEQ_CLS")  # the classifier head trains in full and is saved
    else:
        report.print_parameters(model)
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    args = training_arguments(cfg, output_dir, bf16=bf16, has_eval=eval_set is not None)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: classification_metrics(p.predictions, p.label_ids, labels, full=False),
        callbacks=[report.jsonl_log_callback(output_dir / "train_log.jsonl"), report.tensorboard_callback(output_dir)],
    )
    metrics = training.fit(trainer, cfg, checkpoint)
    if eval_set is not None:
        prediction = trainer.predict(eval_set)
        metrics |= {"eval_loss": prediction.metrics["test_loss"],
                    **_prefixed(classification_metrics(prediction.predictions, prediction.label_ids, labels))}
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


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_run(run_dir: Path, data_spec: str, text_column: str | None, text_pair_column: str | None,
                 label_column: str | None, mirror: str | None, model=None) -> dict:
    """Metrics of a saved classifier on any labeled file, with the same keys as its metrics.json.

    Uses Trainer.predict with the run's eval batch size and bf16 setting: the same batches as the end of training,
    so the same file gives the same numbers. `model` replaces the run's own model (`nlpkit quantize` passes a
    quantized copy).
    """
    import tempfile

    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    manifest = report.read_manifest(run_dir)
    task = manifest["task"]
    rows = open_source(data_spec, "validation", "--data", mirror)
    text_col, pair_col, label_col = resolve_columns(
        rows, text_column or task["text_column"], text_pair_column or task["text_pair_column"],
        label_column or task["label_column"], key="--",
    )
    labels = LabelSpace(task["problem_type"], task["labels"])
    columns = classification_examples(rows, text_col, pair_col, label_col, labels, task["label_names"])
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = model or load_classifier(run_dir)
    dataset = tokenize(columns, tokenizer, task["max_length"])
    cfg = validate_recipe(manifest["config"], source=f"{run_dir}/{report.MANIFEST}")
    if getattr(model, "is_quantized", False) and not (run_dir / "adapter_config.json").is_file():
        # Trainer refuses purely quantized models: a plain loop, logits only.
        logits = predict_logits(model, dataset, DataCollatorWithPadding(tokenizer), task["bf16"],
                                cfg.train.per_device_eval_batch_size)
        return {**_prefixed(classification_metrics(logits, np.array(columns["label"]), labels)),
                "eval_samples": len(dataset)}
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(cfg, Path(scratch), bf16=task["bf16"], has_eval=False)
        trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        prediction = trainer.predict(dataset)
    return {"eval_loss": prediction.metrics["test_loss"],
            **_prefixed(classification_metrics(prediction.predictions, prediction.label_ids, labels)),
            "eval_samples": len(dataset)}


def predict_logits(model, dataset, collate, bf16: bool, batch_size: int) -> np.ndarray:
    import torch

    features = dataset.remove_columns([c for c in ("label", "length") if c in dataset.column_names]).to_list()
    outputs = []
    with torch.inference_mode(), autocast(bf16, model.device):
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size])
            outputs.append(model.eval()(**batch).logits.float().numpy())
    return np.concatenate(outputs)


def load_classifier(run_dir: Path, quant=None):
    """A run's classifier: its base (quantized as in training) with the run's adapter, or the saved model (quantized
    on load when `quant` is given, for `nlpkit quantize`)."""
    from transformers import AutoModelForSequenceClassification

    if (run_dir / "adapter_config.json").is_file():
        return load_adapter_run(run_dir, AutoModelForSequenceClassification)
    return load_model(AutoModelForSequenceClassification, ModelSection(name=str(run_dir)), quant=quant)


# ---------------------------------------------------------------------------------------------- helpers


def tokenize(columns: dict[str, list], tokenizer, max_length: int):
    import datasets

    def encode(batch):
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    dataset = datasets.Dataset.from_dict(columns)
    return dataset.map(encode, batched=True, remove_columns=[c for c in ("text", "text_pair") if c in columns])


def _max_length(requested: int, tokenizer) -> int:
    limit = tokenizer.model_max_length
    if limit and limit < requested:
        report.warn(f"data.max_length={requested} is above the model's limit {limit}; using {limit}")
        return limit
    return requested


def training_arguments(cfg: Recipe, output_dir: Path, *, bf16: bool, has_eval: bool):
    from transformers import TrainingArguments

    # Sequence-classification loss ignores num_items_in_batch: averaging tokens across devices would multiply
    # loss and gradients by the world size under DDP (STACK.md trap 5).
    return TrainingArguments(**cfg.train.trainer_kwargs(output_dir, bf16=bf16, has_eval=has_eval),
                             average_tokens_across_devices=False)


def classification_metrics(predictions, targets, labels: LabelSpace, full: bool = True) -> dict:
    """Scalar metrics for the training log; with full=True also per-class scores and the confusion matrix."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    logits = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions, dtype=np.float64)
    targets = np.asarray(targets)
    if labels.problem_type == "regression":
        scores, truth = logits.reshape(-1), targets.reshape(-1).astype(np.float64)
        constant = np.std(scores) == 0 or np.std(truth) == 0  # correlation is undefined, not zero
        return {
            "mse": float(np.mean((scores - truth) ** 2)),
            "pearson": None if constant else float(pearsonr(scores, truth)[0]),
            "spearman": None if constant else float(spearmanr(scores, truth)[0]),
        }
    ids = list(range(len(labels.names)))
    if labels.problem_type == "multi_label_classification":
        predicted, truth = (logits > 0).astype(int), targets.astype(int)  # sigmoid(x) > 0.5
        metrics = {
            "accuracy": float(accuracy_score(truth, predicted)),  # exact match of the whole label set
            "f1_micro": float(f1_score(truth, predicted, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        }
    else:
        predicted, truth = logits.argmax(-1), targets.astype(int)
        metrics = {
            "accuracy": float(accuracy_score(truth, predicted)),
            "f1_macro": float(f1_score(truth, predicted, labels=ids, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(truth, predicted, labels=ids, average="weighted", zero_division=0)),
        }
    if full:
        precision, recall, f1, support = precision_recall_fscore_support(
            truth, predicted, labels=None if labels.problem_type.startswith("multi") else ids, zero_division=0
        )
        metrics["per_class"] = {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(labels.names, precision, recall, f1, support)
        }
        if labels.problem_type == "single_label_classification":
            metrics["confusion_matrix"] = {
                "labels": labels.names,  # rows: true label, columns: predicted label
                "matrix": confusion_matrix(truth, predicted, labels=ids).tolist(),
            }
    return metrics


def _prefixed(metrics: dict) -> dict:
    return {f"eval_{k}": v for k, v in metrics.items()}
