"""Instruction SFT of a causal LM with trl's SFTTrainer: loss on the answer and its EOS, nothing else by default.

    nlpkit finetune recipes/sft-dolly-lora.yaml
    nlpkit chat runs/sft-dolly-lora --prompt "What is the capital of France?"
    nlpkit eval runs/sft-dolly-lora --data ../shared/data/dolly_open_qa/test.jsonl --json

Every format (alpaca, messages, prompt/completion, text) becomes trl's conversational prompt-completion rows, so the
model's chat template renders training exactly as `nlpkit chat` renders a question, and trl masks the prompt. The
tokenizer (with its chat template) and generation config are saved with the run and used by every later command.
Loud where toolkits fail quietly: a dataset with no trained-on token is an error, pad is never the EOS (a masked EOS
is never learned, and the model never stops), and the run reports how many held prompts stop at EOS.
"""

from __future__ import annotations

import time
from pathlib import Path

from nlpkit import report, training
from nlpkit.adapters import apply_peft, load_adapter_run
from nlpkit.config import ModelSection, Recipe, TrainSection, validate_recipe
from nlpkit.data import (
    Rows,
    default_eval_source,
    detect_sft_format,
    open_source,
    sft_example,
    subsample,
)
from nlpkit.errors import NlpkitError
from nlpkit.models import (
    autocast,
    bf16_is_fast,
    distinct_pad,
    load_model,
    load_tokenizer,
)
from nlpkit.rewards import final_number, gsm8k_exact_match

MODEL_CLASS = "AutoModelForCausalLM"
SAMPLE_TEXTS = ["What is the capital of France?", "Give me three tips for staying healthy."]


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    set_seed(cfg.train.seed)
    tokenizer = prepare_tokenizer(load_tokenizer(cfg.model), cfg.data.chat_template)
    train_rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    fmt = detect_sft_format(train_rows, cfg.data.format)
    train_set = examples(train_rows, fmt, cfg.data.max_train_samples, cfg.train.seed)
    eval_spec = cfg.data.eval or default_eval_source(cfg.data.train)
    eval_rows = open_source(eval_spec, "test", "data.eval", cfg.data.mirror) if eval_spec else None
    eval_set = examples(eval_rows, fmt, cfg.data.max_eval_samples, cfg.train.seed) if eval_rows else None

    model = load_model(AutoModelForCausalLM, cfg.model, quant=cfg.quant)
    model.generation_config.no_repeat_ngram_size = cfg.generation.no_repeat_ngram_size  # saved with the run
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft, task_type="CAUSAL_LM")
    else:
        report.print_parameters(model)
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    # The base model's eval loss is taken inside train() (eval_on_start), never by an evaluate() before it: under
    # DDP, transformers 5.23 then leaves the model unwrapped and each process trains alone on its own gradients.
    args = sft_config(cfg, output_dir, bf16=bf16, has_eval=eval_set is not None)
    args.eval_on_start = eval_set is not None and checkpoint is None  # a resumed run has it in its restored log
    trainer = SFTTrainer(
        model=model, args=args,
        train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        callbacks=[report.jsonl_log_callback(output_dir / "train_log.jsonl"), report.tensorboard_callback(output_dir)],
    )
    check_trained_tokens(trainer.train_dataset, len(train_set), train_rows.name, cfg.data.max_length)

    metrics = {}
    exact_match_rows = cfg.generation.exact_match_prompts
    if exact_match_rows and eval_set is not None and report.is_main_process():  # before training: the base model
        metrics["exact_match_base"] = exact_match(model, tokenizer, eval_set, exact_match_rows, cfg, bf16)
    metrics |= training.fit(trainer, cfg, checkpoint)
    if eval_set is not None:  # step 0: LoRA starts with B = 0, so the model was still the base model
        metrics["eval_loss_base"] = next(e["eval_loss"] for e in trainer.state.log_history
                                         if "eval_loss" in e and e["step"] == 0)
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        prompts = [row["prompt"] for row in eval_set.select(range(min(len(eval_set), cfg.generation.eos_check_prompts)))
                   if "prompt" in row]
        if "exact_match_base" in metrics:
            metrics["exact_match"] = exact_match(trainer.model, tokenizer, eval_set, exact_match_rows, cfg, bf16)
            metrics["exact_match_prompts"] = min(len(eval_set), exact_match_rows)
            report.info(f"exact match {metrics['exact_match_base']:.3f} -> {metrics['exact_match']:.3f}")
        if prompts and report.is_main_process():  # generation is not sharded: one process measures it
            answers, stopped = generate(trainer.model, tokenizer, prompts, cfg.generation.max_new_tokens, bf16)
            metrics["eos_stop_rate"] = sum(stopped) / len(stopped)
            metrics["eos_check_prompts"] = len(stopped)
            metrics["sample"] = {"prompt": prompts[0][-1]["content"], "answer": answers[0]}
            report.info(f"sample\n  prompt: {prompts[0][-1]['content']}\n  answer: {answers[0]}")

    trainer.save_model(str(output_dir))  # model or adapter, tokenizer with its chat template
    unwrapped = trainer.model.get_base_model() if cfg.peft is not None else trainer.model
    if report.is_main_process():
        unwrapped.generation_config.save_pretrained(output_dir)
        if cfg.peft is not None:  # an adapter save has no config.json; load_adapter_run reads it
            unwrapped.config.save_pretrained(output_dir)
    task = {"format": fmt, "max_length": cfg.data.max_length, "bf16": bf16, "labels": None}
    datasets_used = [train_rows] + ([eval_rows] if eval_rows else [])
    report.write_run(output_dir, cfg, metrics, task=task, datasets=datasets_used, started=started)
    return metrics


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_lm(model_ref: str, data_spec: str, mirror: str | None) -> dict:
    """Loss and perplexity on the trained-on tokens of an instruction file, for a run or any causal LM.

    The same SFTTrainer processing as training (template, masking, max_length), so a run evaluated on its own eval
    file reproduces its metrics.json, and a base model compares with it on equal terms.
    """
    import math
    import tempfile

    from trl import SFTTrainer

    run_dir = Path(model_ref)
    manifest = report.read_manifest(run_dir) if (run_dir / report.MANIFEST).is_file() else None
    cfg = validate_recipe(manifest["config"], source=f"{run_dir}/{report.MANIFEST}") if manifest else None
    rows = open_source(data_spec, "test", "--data", mirror)  # a wrong path answers before a model loads
    model, tokenizer = load_lm(model_ref)
    dataset = examples(rows, detect_sft_format(rows, "auto"), None, 0)
    bf16 = manifest["task"]["bf16"] if manifest else bf16_is_fast()
    with tempfile.TemporaryDirectory() as scratch:
        args = sft_config(cfg, Path(scratch), bf16=bf16, has_eval=True)
        # SFTTrainer insists on a train set even to evaluate: one row, never trained on.
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.select(range(1)), eval_dataset=dataset,
                             processing_class=tokenizer)
        loss = trainer.evaluate()["eval_loss"]
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss), "eval_samples": len(dataset)}


def load_lm(model_ref: str):
    """A causal LM and its tokenizer: an sft run (adapter or full), or any model reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_ref)
    if (path / report.MANIFEST).is_file():
        stage = report.read_manifest(path)["stage"]
        if stage not in ("sft", "rlhf"):  # an rlhf run saves its policy: a causal LM like an sft run's
            raise NlpkitError(f"{model_ref}: a {stage} run, not a causal LM (sft or rlhf) run")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / "adapter_config.json").is_file():
            return load_adapter_run(path, AutoModelForCausalLM), tokenizer
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval(), tokenizer
    model_cfg = ModelSection(name=model_ref)
    return load_model(AutoModelForCausalLM, model_cfg).eval(), prepare_tokenizer(load_tokenizer(model_cfg), None)


def data_check(source: str, fmt: str, model_ref: str, max_length: int, mirror: str | None = None) -> dict:
    """The dataset doctor: format, every row validated, one rendered example with the trained-on span marked,
    token lengths, and how many rows max_length would truncate or leave with nothing to train on."""
    rows = open_source(source, "train", "FILE_OR_NAME", mirror)
    fmt = detect_sft_format(rows, fmt)
    converted = [sft_example(row, fmt, rows, i) for i, row in enumerate(rows.rows)]  # raises at the first bad row
    tokenizer = prepare_tokenizer(load_tokenizer(ModelSection(name=model_ref)), None)
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


# ---------------------------------------------------------------------------------------------- helpers


def prepare_tokenizer(tokenizer, chat_template: str | None):
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text() if path.is_file() else chat_template
    if tokenizer.chat_template is None:
        raise NlpkitError("data.chat_template: the model has no chat template; set one (Jinja text or a file)")
    # A pad equal to EOS gets the EOS masked out of the labels with the padding: the model never learns to stop.
    return distinct_pad(tokenizer, "model.name")


def examples(rows: Rows, fmt: str, limit: int | None, seed: int):
    import datasets

    converted = [sft_example(row, fmt, rows, i) for i, row in enumerate(rows.rows)]
    columns = {key: [example[key] for example in converted] for key in converted[0]}
    return datasets.Dataset.from_dict(subsample(columns, limit, seed))


def check_trained_tokens(processed, rows: int, name: str, max_length: int) -> None:
    """trl masks the prompt (-100 labels), truncates to max_length and drops rows left with no trained-on token.
    A dataset left empty would train on nothing at loss 0: make it an error, and say what was dropped."""
    if len(processed) == 0 or all(t == -100 for labels in processed["labels"] for t in labels):
        raise NlpkitError(f"{name}: no row has a trained-on token within data.max_length={max_length} (every "
                          "answer is masked or truncated away); raise data.max_length or check the answer field")
    if len(processed) < rows:
        report.warn(f"{name}: {rows - len(processed)} of {rows} rows dropped: no answer token within "
                    f"data.max_length={max_length}")


def sft_config(cfg: Recipe | None, output_dir: Path, *, bf16: bool, has_eval: bool):
    from trl import SFTConfig

    if cfg is None:
        # Evaluating a plain model: batched as the shipped sft recipes batch their eval set (8 rows, length-grouped
        # with the default seed). Trainer's eval loss is a mean of per-batch means, so other batches give another
        # number (2.91 instead of 3.17 for smollm2-135m on dolly test), and this one reproduces a run's eval_loss_base.
        kwargs = TrainSection(per_device_eval_batch_size=8).trainer_kwargs(output_dir, bf16=bf16, has_eval=True)
        return SFTConfig(**kwargs, max_length=384)
    return SFTConfig(**cfg.train.trainer_kwargs(output_dir, bf16=bf16, has_eval=has_eval),
                     max_length=cfg.data.max_length, completion_only_loss=cfg.train.completion_only,
                     packing=cfg.train.packing)


def exact_match(model, tokenizer, eval_set, count: int, cfg: Recipe, bf16: bool) -> float:
    """Share of the first `count` eval questions answered with the reference's number after `####` (GSM8K)."""
    rows = eval_set.select(range(min(len(eval_set), count)))
    references = [row["completion"][-1]["content"] if row.get("completion") else "" for row in rows]
    if not any(final_number(reference) for reference in references):
        raise NlpkitError(f"generation.exact_match_prompts: no eval answer ends in '#### <number>' (GSM8K style); "
                          f"set generation.exact_match_prompts=0 for data.eval {cfg.data.eval or cfg.data.train}")
    answers, _ = generate(model, tokenizer, [row["prompt"] for row in rows], cfg.generation.max_new_tokens, bf16)
    scores = gsm8k_exact_match([], answers, answer=references)
    return sum(scores) / len(scores)


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, bf16: bool, batch_size: int = 16):
    """Greedy answers to chat prompts, batched with left padding. Returns the answers and whether each hit EOS."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers, stopped = [], []
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode(), autocast(bf16, model.device):
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1]:]:
                ids = row.tolist()
                stopped.append(tokenizer.eos_token_id in ids)
                end = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
                answers.append(tokenizer.decode(ids[:end], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return answers, stopped
