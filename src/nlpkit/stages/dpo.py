"""Preference optimization on trl's trainers, from the same pairs as a reward model but with no reward model and no
sampling: DPO (and its loss variants: IPO, hinge, robust, ...), KTO, ORPO and SimPO. One stage each, one file.

    nlpkit finetune recipes/dpo-hh.yaml                   # stage: dpo   (trl's DPOTrainer)
    nlpkit finetune recipes/kto-hh.yaml                   # stage: kto   (KTOTrainer: good/bad rows; pairs split)
    nlpkit finetune recipes/orpo-hh.yaml                  # stage: orpo  (trl.experimental's ORPOTrainer)
    nlpkit finetune recipes/dpo-hh.yaml stage=simpo       # stage: simpo (trl.experimental's CPOTrainer, loss simpo)
    nlpkit eval runs/dpo-hh --data hh_rlhf:test --json    # implicit-reward pair accuracy and mean margin
    nlpkit chat runs/dpo-hh --prompt "How do I stay safe online?"

Rows are rendered with the model's chat template as SFT renders them (data.preference_chats: HH transcripts become
turns), so `nlpkit chat` asks the tuned model exactly as training showed it. The reference (dpo, kto): with LoRA the
policy with its adapter disabled (trl's own way: one base in memory); without, a frozen copy of the starting model,
or its log-probs computed once before training (dpo.precompute_ref_log_probs). ORPO and SimPO have no reference.
model.name may be an sft run: its adapter is merged into its base first (runs.load_start), so the reference is the
sft model itself and the new adapter trains on top; continuing the sft adapter instead would make the disabled
adapter, hence the reference, the model before sft. The model is saved before the end-of-run evaluation, so a
failure there never loses it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import time
from pathlib import Path

from nlpkit import heldout, report, runs, training
from nlpkit.adapters import apply_peft
from nlpkit.config import DPOSection, Recipe
from nlpkit.data import (chat_prompt_ids, default_eval_source, kto_chats, open_source, preference_chats, prompt_column,
                         split_prompts, subsample)
from nlpkit.errors import NlpkitError
from nlpkit.models import bf16_is_fast, chat_tokenizer, distinct_pad, load_tokenizer
from nlpkit.scoring import Scorer, check_reward_model, preference_metrics

# stage -> trl module, trainer, config. trl marks ORPO and CPO (SimPO) experimental.
TRAINERS = {"dpo": ("trl", "DPOTrainer", "DPOConfig"), "kto": ("trl", "KTOTrainer", "KTOConfig"),
            "orpo": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
            "simpo": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig")}
REFERENCED = ("dpo", "kto")  # the stages whose loss compares the policy with a reference


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, set_seed

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    set_seed(cfg.train.seed)
    dpo = cfg.dpo or DPOSection()
    if dpo.score_with and dpo.score_with.model:  # read only at the end: a wrong path fails now, not after training
        check_reward_model(dpo.score_with.model, "dpo.score_with")
    tokenizer = chat_tokenizer(load_tokenizer(cfg.model), cfg.data.chat_template)
    train_rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    if cfg.stage == "kto":  # shuffled once here: trl's KTO reads rows in order (its KL term pairs neighbours)
        train_set = datasets.Dataset.from_dict(subsample(kto_chats(train_rows), cfg.data.max_train_samples,
                                                         cfg.train.seed)).shuffle(seed=cfg.train.seed)
    else:
        pairs, same = preference_chats(train_rows)
        if same:
            report.warn(f"{train_rows.name}: {same} pair(s) whose chosen and rejected are the same text left out")
        train_set = datasets.Dataset.from_dict(subsample(pairs, cfg.data.max_train_samples, cfg.train.seed))
    train_set = drop_filled_prompts(train_set, tokenizer, cfg.data.max_length, train_rows.name)
    eval_spec = cfg.data.eval or default_eval_source(cfg.data.train)
    eval_rows = open_source(eval_spec, "test", "data.eval", cfg.data.mirror) if eval_spec else None
    # Pair accuracy needs pairs: a kto eval file of unpaired rows has none.
    eval_pairs = subsample(preference_chats(eval_rows)[0], cfg.data.max_eval_samples, cfg.train.seed) \
        if eval_rows and "chosen" in eval_rows.rows[0] else None

    model = runs.load_start(cfg.model, AutoModelForCausalLM, quant=cfg.quant, frozen=cfg.peft is not None)
    model.generation_config.no_repeat_ngram_size = cfg.generation.no_repeat_ngram_size  # saved with the run
    reference = None
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft, task_type="CAUSAL_LM")  # reference: this model, adapter disabled
    else:
        report.print_parameters(model)
        if cfg.stage in REFERENCED and not dpo.precompute_ref_log_probs:
            # Built here, not by trl: trl would reload the policy from its path, which a model built in memory or
            # merged from an sft run does not have.
            reference = copy.deepcopy(model).requires_grad_(False).eval()
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    module, trainer_name, config_name = TRAINERS[cfg.stage]
    trl_module = importlib.import_module(module)
    args = getattr(trl_module, config_name)(**trainer_arguments(cfg, dpo, output_dir, bf16))
    trainer = getattr(trl_module, trainer_name)(
        model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
        callbacks=[training.jsonl_log_callback(output_dir / "train_log.jsonl"),
                   *training.tracker_callbacks(cfg.train, output_dir)],
        **({"ref_model": reference} if cfg.stage in REFERENCED else {}),
    )

    metrics = {**training.fit(trainer, cfg, checkpoint), "train_rows": len(trainer.train_dataset)}
    runs.save_causal_lm(trainer, output_dir, adapter=cfg.peft is not None)  # first: before the evaluation
    if eval_pairs is not None:
        if cfg.stage in REFERENCED and cfg.peft is None and reference is None:  # precomputed: load it for the eval
            reference = runs.load_start(cfg.model, AutoModelForCausalLM, frozen=True).to(trainer.model.device)
        metrics |= preference_metrics(trainer.model, tokenizer, eval_pairs, stage=cfg.stage, beta=dpo.beta,
                                      max_length=cfg.data.max_length, batch_size=cfg.train.per_device_eval_batch_size,
                                      bf16=bf16, reference=reference)
        report.info(f"implicit-reward pair accuracy {metrics['eval_pair_accuracy']:.3f}, mean margin "
                    f"{metrics['eval_mean_margin']:.3f} on {metrics['eval_pairs']} held-out pairs")
    if dpo.eval_prompts:
        metrics |= heldout_answers(cfg, dpo, trainer.model, reference, bf16, output_dir)
    task = {"format": "kto" if cfg.stage == "kto" else "preference", "max_length": cfg.data.max_length, "bf16": bf16,
            "labels": None}
    report.write_run(output_dir, cfg, metrics, task=task, datasets=[train_rows] + ([eval_rows] if eval_rows else []),
                     started=started)
    return metrics


# ---------------------------------------------------------------------------------------------- helpers


def heldout_answers(cfg: Recipe, dpo: DPOSection, policy, reference, bf16: bool, output_dir: Path) -> dict:
    """dpo.eval_prompts: the start model's and the trained model's greedy answers to the prompts an rlhf recipe on
    dpo.prompts with the same seed holds out, scored by dpo.score_with, with the KL to the start model. With LoRA
    the start model is the policy with its adapter disabled; without, the reference (orpo/simpo: loaded again)."""
    from transformers import AutoModelForCausalLM

    rows = open_source(dpo.prompts, "train", "dpo.prompts", cfg.data.mirror)
    _, prompts = split_prompts(rows, prompt_column(rows, None), held=dpo.eval_prompts, seed=cfg.train.seed, limit=None)
    tokenizer = distinct_pad(chat_tokenizer(load_tokenizer(cfg.model), cfg.data.chat_template), "model.name")
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    device = policy.device
    scorer = Scorer(dpo.score_with, bf16, device) if dpo.score_with else None
    if cfg.peft is None and reference is None:
        reference = runs.load_start(cfg.model, AutoModelForCausalLM, frozen=True).to(device)
    answer = functools.partial(heldout.answer, tokenizer=tokenizer, prompts=prompts, max_new_tokens=dpo.response_length,
                               stop_ids=[tokenizer.eos_token_id], bf16=bf16, device=device, scorer=scorer)
    with policy.disable_adapter() if cfg.peft is not None else contextlib.nullcontext():
        before = answer(policy if cfg.peft is not None else reference)
    metrics = heldout.before_after(before, answer(policy, kl_to=reference or "adapter"), output_dir)
    report.info(heldout.describe(metrics))
    return metrics


def trainer_arguments(cfg: Recipe, dpo: DPOSection, output_dir: Path, bf16: bool) -> dict:
    """The train: and dpo: sections as keywords of the stage's trl config; train.extra wins (fields we do not model,
    such as label_smoothing, loss_weights, desirable_weight or simpo_gamma)."""
    kwargs = training.trainer_kwargs(cfg.train, output_dir, bf16=bf16, has_eval=False)
    # Length grouping reads an input_ids column, which preference rows do not have; KTO needs its rows in order.
    kwargs["train_sampling_strategy"] = "sequential" if cfg.stage == "kto" else (
        "random" if kwargs["train_sampling_strategy"] == "group_by_length" else kwargs["train_sampling_strategy"])
    fields = {"beta": dpo.beta, "max_length": cfg.data.max_length}
    if cfg.stage in REFERENCED:
        fields["precompute_ref_log_probs"] = dpo.precompute_ref_log_probs
    if dpo.loss_type is not None:
        fields["loss_type"] = dpo.loss_type
    if cfg.stage == "simpo":  # SimPO is CPO's simpo loss without CPO's added NLL term (trl's docs)
        fields |= {"loss_type": "simpo", "cpo_alpha": 0.0}
    return fields | kwargs


def drop_filled_prompts(rows, tokenizer, max_length: int, name: str):
    """Rows whose chat-rendered prompt alone fills max_length leave no reply to train on. trl's DPO and KTO drop them;
    its ORPO and CPO (SimPO) keep them with an empty reply, whose mean log-prob is 0/0: a nan gradient at step 1 on
    hh_rlhf. So they are dropped here for every stage, the count said, and none left is an error."""
    kept = [i for i, prompt in enumerate(rows["prompt"]) if len(chat_prompt_ids(tokenizer, prompt)) < max_length]
    if not kept:
        raise NlpkitError(f"{name}: every row's prompt fills data.max_length={max_length} tokens (after the chat "
                          "template), so no reply is left to train on; raise data.max_length")
    if len(kept) < len(rows):
        report.warn(f"{name}: {len(rows) - len(kept)} of {len(rows)} rows dropped: their prompt fills "
                    f"data.max_length={max_length}")
    return rows.select(kept)
