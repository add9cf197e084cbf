"""`nlpkit eval`: a run (or any causal LM) on a data file, with the same metric keys as the run's metrics.json.

    nlpkit eval runs/classify-sst2 --data sst2:validation --json     # accuracy, F1, per-class, confusion matrix
    nlpkit eval runs/sft-dolly-lora --data dolly:test --json         # loss and perplexity on the answer tokens
    nlpkit eval smollm2-135m --data dolly:test --json                # the same for a base model, to compare
    nlpkit eval runs/reward-hh --data hh_rlhf:test --json            # pair accuracy and mean margin
    nlpkit eval runs/dpo-hh --data hh_rlhf:test --json               # the same, by implicit reward (dpo/kto/orpo/simpo)
    nlpkit eval smollm2-135m --data mbpp:test --num-samples 10 --json # code: pass@1 greedy, pass@10 sampled

Each evaluation processes the file exactly as training processed its eval split (tokenization, template, masking,
batches), so a run evaluated on its own eval file reproduces its metrics. The training stages call these functions
for their end-of-run metrics.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from nlpkit import runs, training
from nlpkit.config import PREFERENCE_STAGES
from nlpkit.data import (
    LabelSpace,
    classification_examples,
    code_records,
    detect_sft_format,
    is_code_set,
    open_source,
    resolve_columns,
    sft_dataset,
    tokenize_classification,
)
from nlpkit.errors import NlpkitError
from nlpkit.models import autocast, bf16_is_fast


def evaluate(ref: str, data_spec: str, text_column: str | None = None, text_pair_column: str | None = None,
             label_column: str | None = None, num_samples: int | None = None, limit: int | None = None,
             temperature: float = 0.8, max_new_tokens: int | None = None) -> dict:
    """A run of any stage, or a plain causal LM (anything that is not a run directory). A causal LM on a code set
    (rows with test_list: MBPP) is scored by its unit tests; num_samples and limit are for that case only."""
    run = runs.open_run(ref) if runs.is_run(ref) else None
    mirror = run.recipe.data.mirror if run else None
    if run is None or run.is_causal_lm:
        rows = open_source(data_spec, "test", "--data", mirror)  # a wrong path answers before a model loads
        if is_code_set(rows):
            return code_metrics(ref, rows, run, num_samples, limit, temperature, max_new_tokens)
    if num_samples is not None or limit is not None or max_new_tokens is not None:
        raise NlpkitError(f"--num-samples/--limit/--max-new-tokens: only for a causal LM on a code set (rows with "
                          f"test_list, such as mbpp:test); {data_spec} is not one")
    if run is None:
        return lm_metrics(ref, data_spec)
    if run.stage in PREFERENCE_STAGES:
        from nlpkit.scoring import preference_run_metrics

        return preference_run_metrics(run, data_spec, mirror)
    if run.is_causal_lm:
        return lm_metrics(ref, data_spec, run)
    if run.stage == "reward":
        from nlpkit.scoring import reward_run_metrics

        return reward_run_metrics(run, data_spec, mirror)
    return classifier_metrics(run, data_spec, text_column, text_pair_column, label_column, mirror)


# ---------------------------------------------------------------------------------------------- classifiers


def classifier_metrics(run: runs.Run, data_spec: str, text_column: str | None, text_pair_column: str | None,
                       label_column: str | None, mirror: str | None, model=None) -> dict:
    """A classify run on any labeled file: Trainer.predict with the run's eval batch size and bf16 setting, the same
    batches as the end of training. `model` replaces the run's own (`nlpkit quantize` passes a quantized copy)."""
    from transformers import DataCollatorWithPadding, Trainer

    task = run.task
    rows = open_source(data_spec, "validation", "--data", mirror)
    text_col, pair_col, label_col = resolve_columns(
        rows, text_column or task["text_column"], text_pair_column or task["text_pair_column"],
        label_column or task["label_column"], key="--",
    )
    labels = LabelSpace(task["problem_type"], task["labels"])
    columns = classification_examples(rows, text_col, pair_col, label_col, labels, task["label_names"])
    tokenizer = runs.load_tokenizer(run)
    model = model or runs.load_model(run)
    dataset = tokenize_classification(columns, tokenizer, task["max_length"])
    if getattr(model, "is_quantized", False) and not run.has_adapter:
        # Trainer refuses purely quantized models: a plain loop, logits only.
        logits = predict_logits(model, dataset, DataCollatorWithPadding(tokenizer), task["bf16"],
                                run.recipe.train.per_device_eval_batch_size)
        return {**prefixed(classification_scores(logits, np.array(columns["label"]), labels)),
                "eval_samples": len(dataset)}
    with tempfile.TemporaryDirectory() as scratch:
        args = training.classifier_arguments(run.recipe, Path(scratch), bf16=task["bf16"], has_eval=False)
        trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        prediction = trainer.predict(dataset)
    return {"eval_loss": prediction.metrics["test_loss"],
            **prefixed(classification_scores(prediction.predictions, prediction.label_ids, labels)),
            "eval_samples": len(dataset)}


def predict_logits(model, dataset, collate, bf16: bool, batch_size: int) -> np.ndarray:
    import torch

    features = dataset.remove_columns([c for c in ("label", "length") if c in dataset.column_names]).to_list()
    outputs = []
    model.eval()
    with torch.inference_mode(), autocast(bf16, model.device):
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size]).to(model.device)
            outputs.append(model(**batch).logits.float().cpu().numpy())
    return np.concatenate(outputs)


def classification_scores(predictions, targets, labels: LabelSpace, full: bool = True) -> dict:
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


def prefixed(metrics: dict) -> dict:
    return {f"eval_{k}": v for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- causal LMs


def lm_metrics(model_ref: str, data_spec: str, run: runs.Run | None = None) -> dict:
    """Loss and perplexity on the trained-on tokens of an instruction file, for a causal-LM run (`run`, opened) or
    any causal LM (`model_ref`).

    The same SFTTrainer processing as training (template, masking, max_length), so a run evaluated on its own eval
    file reproduces its metrics.json, and a base model compares with it on equal terms.
    """
    from trl import SFTTrainer

    mirror = run.recipe.data.mirror if run else None
    rows = open_source(data_spec, "test", "--data", mirror)  # a wrong path answers before a model loads
    model, tokenizer = (runs.load_model(run), runs.load_tokenizer(run)) if run else runs.load_causal_lm(model_ref)
    dataset = sft_dataset(rows, detect_sft_format(rows, "auto"), None, 0)
    bf16 = run.task["bf16"] if run else bf16_is_fast()
    with tempfile.TemporaryDirectory() as scratch:
        args = training.sft_config(run.recipe if run else None, Path(scratch), bf16=bf16, has_eval=True)
        # SFTTrainer insists on a train set even to evaluate: one row, never trained on.
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.select(range(1)), eval_dataset=dataset,
                             processing_class=tokenizer)
        loss = trainer.evaluate()["eval_loss"]
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss), "eval_samples": len(dataset)}


# ---------------------------------------------------------------------------------------------- code (unit tests)


def code_metrics(model_ref: str, rows, run: runs.Run | None, num_samples: int | None, limit: int | None,
                 temperature: float, max_new_tokens: int | None = None) -> dict:
    """pass@1 of greedy answers on a code set, run against every assert of each problem in the sandbox; with
    num_samples, also pass@1 and pass@num_samples of that many sampled answers (the unbiased estimator)."""
    from nlpkit.rewards import unit_test_pass
    from nlpkit.sample import check_num_samples, generate, pass_rates

    if num_samples is not None:
        check_num_samples(num_samples)
    if limit is not None and limit < 1:
        raise NlpkitError(f"--limit {limit}: give at least 1 problem, or leave it out for all")
    records = code_records(rows)[:limit]
    model, tokenizer = runs.load_causal_lm(model_ref)
    max_new_tokens = max_new_tokens or (run.recipe.generation.max_new_tokens if run else 256)
    bf16 = run.task["bf16"] if run else bf16_is_fast()
    prompts = [r["prompt"] for r in records]
    columns = {key: [r[key] for r in records] for key in ("test_list", "test_setup_code")}

    def passing(groups: list[list[str]]) -> list[int]:
        n = len(groups[0])
        flat = [c for group in groups for c in group]
        scores = unit_test_pass([], flat, **{k: [v for v in values for _ in range(n)] for k, values in columns.items()})
        return [int(sum(scores[i:i + n])) for i in range(0, len(scores), n)]

    greedy = passing(generate(model, tokenizer, prompts, 1, max_new_tokens, 0.0, bf16))
    metrics = {"eval_pass@1": sum(greedy) / len(greedy), "eval_problems": len(records)}
    if num_samples is not None and num_samples > 1:
        import torch

        torch.manual_seed(0)
        sampled = pass_rates(passing(generate(model, tokenizer, prompts, num_samples, max_new_tokens, temperature,
                                              bf16)), num_samples)
        metrics |= {"eval_pass@1_sampled": sampled["pass@1"],
                    f"eval_pass@{num_samples}": sampled[f"pass@{num_samples}"],
                    "eval_samples_per_problem": num_samples, "eval_temperature": temperature}
    return metrics
