"""A reward model from preference pairs, with trl's RewardTrainer: a sequence classifier with one output (num_labels=1).

    nlpkit finetune reward-hh
    nlpkit eval runs/reward-hh --data hh_rlhf:test --json        # pair accuracy and mean margin on any preference file

Rows are explicit (prompt, chosen, rejected) or implicit (chosen, rejected: full texts sharing a prefix). The loss is
-log sigmoid(r_chosen - r_rejected), with r read at the last real token. Every text gets the EOS appended (as trl
would), so the score is read AT the EOS: `nlpkit rlhf` scores policy responses the same way. Pad is never the EOS
(docs/ppo-checklist.md item 1): the classifier finds the last real token by the first pad, and a pad equal to EOS
would hide the token it scores.
"""

from __future__ import annotations

import time
from pathlib import Path

from nlpkit import report, training
from nlpkit.adapters import apply_peft
from nlpkit.config import Recipe
from nlpkit.data import default_eval_source, open_source, pair_ids, preference_columns, subsample
from nlpkit.models import bf16_is_fast, distinct_pad, load_model, load_tokenizer
from nlpkit.scoring import pair_metrics

def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    set_seed(cfg.train.seed)  # before the model exists: the new score head's init is part of the run
    tokenizer = distinct_pad(load_tokenizer(cfg.model), "model.name")
    train_rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    train_pairs = subsample(preference_columns(train_rows), cfg.data.max_train_samples, cfg.train.seed)
    eval_spec = cfg.data.eval or default_eval_source(cfg.data.train)
    eval_rows = open_source(eval_spec, "test", "data.eval", cfg.data.mirror) if eval_spec else None
    eval_pairs = subsample(preference_columns(eval_rows), cfg.data.max_eval_samples, cfg.train.seed) if eval_rows \
        else None

    model = load_model(AutoModelForSequenceClassification, cfg.model, frozen=cfg.peft is not None, num_labels=1,
                       pad_token_id=tokenizer.pad_token_id)
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft, task_type="SEQ_CLS")  # the score head trains in full and is saved
    else:
        report.print_parameters(model)
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    kwargs = training.trainer_kwargs(cfg.train, output_dir, bf16=bf16, has_eval=False)
    if kwargs["train_sampling_strategy"] == "group_by_length":
        # Length grouping reads an input_ids column; preference rows hold chosen_ids and rejected_ids instead.
        kwargs["train_sampling_strategy"] = "random"
    args = RewardConfig(**kwargs, max_length=cfg.data.max_length)
    # Tokenized here, as pair_metrics scores them: trl would drop every pair longer than max_length (a third of HH).
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_dict(pair_ids(tokenizer, train_pairs,
                                                                              cfg.data.max_length)),
                            callbacks=[training.jsonl_log_callback(output_dir / "train_log.jsonl"),
                                       *training.tracker_callbacks(cfg.train, output_dir)])
    metrics = {**training.fit(trainer, cfg, checkpoint), "train_pairs": len(trainer.train_dataset)}
    if eval_pairs is not None:
        metrics |= pair_metrics(trainer.model, tokenizer, eval_pairs, cfg.data.max_length,
                                cfg.train.per_device_eval_batch_size, bf16)
        report.info(f"pair accuracy {metrics['eval_pair_accuracy']:.3f} on {metrics['eval_pairs']} held-out pairs")
    trainer.save_model(str(output_dir))  # model (or adapter + score head) and tokenizer
    # An adapter save has no config.json: keep num_labels and the pad id, and say what the model is.
    if cfg.peft is not None and report.is_main_process():
        base = trainer.model.get_base_model()
        base.config.architectures = [type(base).__name__]  # else the base checkpoint's (a causal LM) stays
        base.config.save_pretrained(output_dir)
    task = {"max_length": cfg.data.max_length, "bf16": bf16, "eos_token": tokenizer.eos_token, "labels": None}
    report.write_run(output_dir, cfg, metrics, task=task, datasets=[train_rows] + ([eval_rows] if eval_rows else []),
                     started=started)
    return metrics

