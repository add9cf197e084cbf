"""Instruction SFT of a causal LM with trl's SFTTrainer: loss on the answer and its EOS, nothing else by default.

    nlpkit finetune sft-dolly-lora
    nlpkit chat runs/sft-dolly-lora --prompt "What is the capital of France?"
    nlpkit eval runs/sft-dolly-lora --data dolly:test --json         # nlpkit/evaluate.py

Every format (alpaca, messages, prompt/completion, text) becomes trl's conversational prompt-completion rows, so the
model's chat template renders training exactly as `nlpkit chat` renders a question, and trl masks the prompt. The
tokenizer (with its chat template) and generation config are saved with the run and used by every later command.
Loud where toolkits fail quietly: a dataset with no trained-on token is an error, pad is never the EOS (a masked EOS
is never learned, and the model never stops), and the run reports how many held prompts stop at EOS.
"""

from __future__ import annotations

import time
from pathlib import Path

from nlpkit import report, runs, training
from nlpkit.adapters import apply_peft
from nlpkit.config import Recipe
from nlpkit.data import default_eval_source, detect_sft_format, open_source, sft_dataset
from nlpkit.errors import NlpkitError
from nlpkit.models import autocast, bf16_is_fast, chat_tokenizer, load_model, load_tokenizer
from nlpkit.rewards import final_number, gsm8k_exact_match


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    set_seed(cfg.train.seed)
    tokenizer = chat_tokenizer(load_tokenizer(cfg.model), cfg.data.chat_template)
    train_rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    fmt = detect_sft_format(train_rows, cfg.data.format)
    train_set = sft_dataset(train_rows, fmt, cfg.data.max_train_samples, cfg.train.seed)
    eval_spec = cfg.data.eval or default_eval_source(cfg.data.train)
    eval_rows = open_source(eval_spec, "test", "data.eval", cfg.data.mirror) if eval_spec else None
    eval_set = sft_dataset(eval_rows, fmt, cfg.data.max_eval_samples, cfg.train.seed) if eval_rows else None

    model = load_model(AutoModelForCausalLM, cfg.model, quant=cfg.quant, frozen=cfg.peft is not None)
    model.generation_config.no_repeat_ngram_size = cfg.generation.no_repeat_ngram_size  # saved with the run
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft, task_type="CAUSAL_LM")
    else:
        report.print_parameters(model)
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    # The base model's eval loss is taken inside train() (eval_on_start), never by an evaluate() before it: under
    # DDP, transformers 5.23 then leaves the model unwrapped and each process trains alone on its own gradients.
    args = training.sft_config(cfg, output_dir, bf16=bf16, has_eval=eval_set is not None)
    args.eval_on_start = eval_set is not None and checkpoint is None  # a resumed run has it in its restored log
    trainer = SFTTrainer(
        model=model, args=args,
        train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        callbacks=[training.jsonl_log_callback(output_dir / "train_log.jsonl"),
                   *training.tracker_callbacks(cfg.train, output_dir)],
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

    runs.save_causal_lm(trainer, output_dir, adapter=cfg.peft is not None)  # tokenizer with its chat template
    task = {"format": fmt, "max_length": cfg.data.max_length, "bf16": bf16, "labels": None}
    datasets_used = [train_rows] + ([eval_rows] if eval_rows else [])
    report.write_run(output_dir, cfg, metrics, task=task, datasets=datasets_used, started=started)
    return metrics


# ---------------------------------------------------------------------------------------------- helpers


def check_trained_tokens(processed, rows: int, name: str, max_length: int) -> None:
    """trl masks the prompt (-100 labels), truncates to max_length and drops rows left with no trained-on token.
    A dataset left empty would train on nothing at loss 0: make it an error, and say what was dropped."""
    if len(processed) == 0 or all(t == -100 for labels in processed["labels"] for t in labels):
        raise NlpkitError(f"{name}: no row has a trained-on token within data.max_length={max_length} (every "
                          "answer is masked or truncated away); raise data.max_length or check the answer field")
    if len(processed) < rows:
        report.warn(f"{name}: {rows - len(processed)} of {rows} rows dropped: no answer token within "
                    f"data.max_length={max_length}")


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
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            # no_grad, not inference_mode: FSDP2 cannot unshard a model's parameters under inference mode.
            with torch.no_grad(), autocast(bf16, model.device):
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
