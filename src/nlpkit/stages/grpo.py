"""RLHF with trl's GRPO or RLOO (`algo: grpo` / `algo: rloo` in a stage: rlhf recipe), with nlpkit's scoring.

    nlpkit rlhf rlhf-mbpp-grpo

The reward (a reward model, reward functions, or both) is the same Scorer that nlpkit's PPO uses, handed to trl as one
reward function, which avoids trl's traps on this stack (docs/stack-notes.md trap 7): the reward model is never given to
trl, so no hub lookup for its tokenizer, and every completion is scored with the EOS RewardTrainer trained with
appended (trl decodes completions without it), a completion cut at max_completion_length too: unlike our PPO there
is no missing-EOS penalty. beta > 0 keeps a KL to the reference; the policy is loaded from its path (a
model built in memory makes trl fail to rebuild the reference), and with LoRA the reference is the disabled adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

from nlpkit import report, runs, training
from nlpkit.adapters import peft_config
from nlpkit.config import GRPOSection, Recipe
from nlpkit.data import open_source, prompt_column, prompt_records
from nlpkit.distributed import process_device
from nlpkit.models import bf16_is_fast, distinct_pad, load_tokenizer, resolve_model
from nlpkit.scoring import Scorer


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    import datasets
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    set_seed(cfg.train.seed)
    grpo = cfg.grpo or GRPOSection()
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    tokenizer = distinct_pad(load_tokenizer(cfg.model), "model.name")
    tokenizer.padding_side = "left"
    rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    records = prompt_records(rows, prompt_column(rows, cfg.data.text_column))
    if cfg.data.max_train_samples:
        records = records[:cfg.data.max_train_samples]
    # Conversational prompts: trl renders them with the policy's chat template, as `nlpkit chat` does.
    dataset = datasets.Dataset.from_list([{**r, "prompt": [{"role": "user", "content": r["prompt"]}]}
                                          for r in records])
    scorer = Scorer(cfg.reward, bf16, process_device())  # where trl puts this process's policy

    def reward(prompts, completions, completion_ids, **columns):  # completion_ids: trl's, not a prompt column
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        batch = [{**{k: v[i] for k, v in columns.items() if isinstance(v, list)},
                  "prompt": p[-1]["content"] if isinstance(p, list) else p} for i, p in enumerate(prompts)]
        return scorer.score(batch, texts)

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if cfg.algo == "grpo" else (RLOOConfig, RLOOTrainer)
    kwargs = training.trainer_kwargs(cfg.train, output_dir, bf16=bf16, has_eval=False)
    kwargs["train_sampling_strategy"] = "random"  # group_by_length needs input_ids; prompts are messages here
    args = config_class(**kwargs, num_generations=grpo.num_generations, max_completion_length=grpo.max_completion_length,
                        temperature=grpo.temperature, beta=grpo.beta)
    trainer = trainer_class(
        model=resolve_model(cfg.model.name, cfg.model.allow_pickle), reward_funcs=[reward], args=args,
        train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config(cfg.peft, "CAUSAL_LM") if cfg.peft is not None else None,
        callbacks=[training.jsonl_log_callback(output_dir / "train_log.jsonl"),
                   *training.tracker_callbacks(cfg.train, output_dir)],
    )
    metrics = training.fit(trainer, cfg, checkpoint, supervised=False)
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    metrics |= {"reward_first_step": history[0]["reward"] if history else None,
                "reward_last_step": history[-1]["reward"] if history else None, "logged_steps": len(history)}
    runs.save_causal_lm(trainer, output_dir, adapter=cfg.peft is not None)  # nlpkit eval, merge, chat load it
    task = {"algo": cfg.algo, "bf16": bf16, "labels": None, "train_prompts": len(records)}
    report.write_run(output_dir, cfg, metrics, task=task, datasets=[rows], started=started)
    return metrics
