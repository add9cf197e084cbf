"""RLHF with nlpkit's own PPO loop (trl deleted its PPOTrainer): a policy, a frozen reference, a reward, a value model.

    nlpkit finetune recipes/reward-hh.yaml          # first: the reward model
    nlpkit rlhf recipes/rlhf-hh-ppo.yaml            # then: PPO against it
    nlpkit chat runs/rlhf-hh-ppo --prompt "How do I stay safe online?"

One update: sample `ppo.batch_size` prompts (split over the processes under --num-processes), generate responses
(left padding, sampling at temperature T), cut each after its first stop token, score it (reward model at the EOS,
plus reward functions, minus a penalty when no EOS came), shape per-token rewards with the KL to the reference,
compute GAE advantages from the value model, then `num_ppo_epochs` passes of `num_mini_batches` clipped policy +
value steps (gradients averaged over processes). The math lives in nlpkit/ppo/core.py as small tested functions; the
numbers in brackets are the items of the PPO checklist (docs/ppo-checklist.md).

With LoRA there is one base model in memory: the policy is the adapter, the reference is the adapter disabled [26].
The value model is initialised from the reward model [24]: a separate copy for a full-weight policy; with LoRA, an
adapter on the reward model itself (which scores with it disabled) and its own score head. Only the policy is saved.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from pathlib import Path

from nlpkit import report, training
from nlpkit.adapters import apply_peft, trainable_in_fp32
from nlpkit.config import PPOSection, Recipe
from nlpkit.data import open_source, prompt_column, prompt_records, split_prompts
from nlpkit.distributed import average_gradients, process_device, process_group
from nlpkit.errors import NlpkitError, TrainingStopped
from nlpkit.models import (
    autocast,
    bf16_is_fast,
    distinct_pad,
    load_model,
    load_tokenizer,
)
from nlpkit.ppo import core
from nlpkit.ppo.checkpoint import load_checkpoint, save_checkpoint
from nlpkit.scoring import Scorer, load_reward_model

MODEL_CLASS = "AutoModelForCausalLM"  # what `nlpkit merge` loads a run with
SAMPLE_TEXTS = ["What is the capital of France?", "Give me three tips for staying healthy."]


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    started = time.time()
    checkpoint = training.resume_point(output_dir, cfg, resume)
    # Not transformers.set_seed: its module imports peft, which imports bitsandbytes: ~50 MB of peak RSS that a
    # full-weight PPO run never uses (benchmarks/ppo_vs_trl.py). numpy draws nothing here.
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # every device
    ppo = cfg.ppo or PPOSection()
    rank, world, all_sum, gather = process_group()  # --num-processes: each process rolls out its own prompts
    per_process = ppo.episodes_per_process(world, cfg.train.gradient_accumulation_steps)
    device = process_device()
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16

    # ------------------------------------------------------------------ prompts: train, and held out for the eval
    tokenizer = distinct_pad(load_tokenizer(cfg.model), "model.name")  # [1]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"  # [2]; long prompts keep their end
    # data.max_length caps the prompt's tokens (encode_prompts truncates to model_max_length); restored on saving.
    context_length, tokenizer.model_max_length = tokenizer.model_max_length, cfg.data.max_length
    stop_ids = stop_token_ids(tokenizer, ppo.stop_token)
    rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    column = prompt_column(rows, cfg.data.text_column)
    train_prompts, eval_prompts = split_prompts(rows, column, held=0 if cfg.data.eval else ppo.eval_prompts,
                                                seed=cfg.train.seed, limit=cfg.data.max_train_samples)
    datasets_used = [rows]
    if cfg.data.eval:
        eval_rows = open_source(cfg.data.eval, "test", "data.eval", cfg.data.mirror)
        eval_prompts = prompt_records(eval_rows, prompt_column(eval_rows, cfg.data.text_column))[:ppo.eval_prompts
                                                                                                  or None]
        datasets_used.append(eval_rows)

    # ------------------------------------------------------------------ models
    scorer = Scorer(cfg, bf16, device)
    if cfg.peft is not None:
        # A frozen base is held in bf16 when autocast runs in bf16: every matmul would cast it anyway, and keep the
        # cast copy for the backward pass. Half the weight memory, and no copies; the adapter trains in fp32.
        policy = load_model(AutoModelForCausalLM, cfg.model, **({"dtype": torch.bfloat16} if bf16 else {}))
        policy = apply_peft(policy, cfg.peft, task_type="CAUSAL_LM")  # LoRA B = 0: the policy starts at the reference
        trainable_in_fp32(policy)
        reference = None  # [26] the reference is the policy with its adapter disabled
    else:
        policy = load_model(AutoModelForCausalLM, cfg.model)
        report.print_parameters(policy)
        reference = copy.deepcopy(policy).requires_grad_(False)  # [11] frozen
    value_model = load_value_model(cfg, ppo, tokenizer, scorer)
    for model in (policy, reference, value_model):
        if model is not None:
            model.to(device).eval()  # [3] eval mode throughout, training included: no dropout of any kind
    trainable = [p for model in (policy, value_model) for p in model.parameters() if p.requires_grad]
    # [22, 25] one optimiser over policy and value; AdamW eps 1e-5 as N+; the LR decays linearly, once per update.
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, eps=1e-5, weight_decay=cfg.train.weight_decay)
    updates = core.num_updates(ppo.total_episodes, ppo.batch_size)  # [23]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / updates)

    metrics = {}
    main = rank == 0  # the main process evaluates, logs, checkpoints and saves
    if eval_prompts and main:
        metrics |= {f"{k}_before": v for k, v in evaluate(policy, tokenizer, scorer, eval_prompts, ppo,
                                                          stop_ids, bf16, device).items()}
    reward_bias = 0.0
    if ppo.reward_baseline_prompts:  # [10] computed again on --resume: the same prompts, seed and reference
        torch.manual_seed(cfg.train.seed)
        reward_bias = reference_score_bias(policy, reference, tokenizer, scorer,
                                           train_prompts[:ppo.reward_baseline_prompts], ppo, stop_ids, bf16, device,
                                           rank, world, gather)
        metrics["reward_bias"] = reward_bias
        report.info(f"reward baseline: the reference policy's responses score {reward_bias:+.3f} on average; "
                    "subtracted from every score")

    # ------------------------------------------------------------------ the loop
    log_path, samples_path = output_dir / "train_log.jsonl", output_dir / "samples.jsonl"
    order = random.Random(cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    sample_every = max(1, updates // ppo.num_sample_generations) if ppo.num_sample_generations else 0
    loop_started, episode, stats, pool, first_update, kl_coef = time.time(), 0, {}, [], 1, ppo.kl_coef
    loop = {"policy": policy, "value_model": value_model, "optimizer": optimizer, "scheduler": scheduler,
            "order": order, "generator": generator}
    if checkpoint is not None:  # everything the next update depends on, as the killed run left it
        first_update, episode, pool, kl_coef = load_checkpoint(checkpoint, **loop, kl_coef=kl_coef)
        training.truncate_log(samples_path, first_update - 1, key="update")
    save_every = cfg.train.save_steps if cfg.train.save_strategy == "steps" else 0
    sync_grads = (lambda params: average_gradients(params, all_sum, world)) if world > 1 else None
    for update in range(first_update, updates + 1):
        while len(pool) < ppo.batch_size:  # walk the prompts in a fresh seeded order each pass
            pool += order.sample(train_prompts, len(train_prompts))
        chunk, pool = pool[:ppo.batch_size], pool[ppo.batch_size:]
        batch = chunk[rank * per_process:(rank + 1) * per_process]  # this process's share of the update's episodes
        # The sampling noise of each update, drawn per process, from the seed: a resumed run draws the same.
        torch.manual_seed(hash((cfg.train.seed, rank, update)) % 2**63)
        rollout = make_rollout(policy, reference, value_model, tokenizer, scorer, batch, ppo, stop_ids, bf16, device,
                               all_sum, kl_coef=kl_coef, reward_bias=reward_bias)
        stats = train_on_rollout(policy, value_model, optimizer, rollout, ppo, cfg.train.gradient_accumulation_steps,
                                 generator, bf16, sync_grads)
        scheduler.step()
        episode += ppo.batch_size
        stats = core.combine_process_stats(gather(stats | rollout["stats"]))  # over every process's episodes
        stats |= {"lr": scheduler.get_last_lr()[0], "episode": episode, "eps": episode / (time.time() - loop_started),
                  "objective/kl_coef": kl_coef}
        check_health(stats, ppo, cfg.train.watchdog, update, output_dir)
        if ppo.kl_target is not None:  # [13] every process saw the same whole-batch KL: the same next coefficient
            kl_coef = core.adaptive_kl_coef(kl_coef, stats["objective/kl"], ppo.kl_target, ppo.kl_horizon,
                                            ppo.batch_size)
        samples = gather(sample_rows(update, batch, rollout)) if sample_every and (
            update % sample_every == 0 or update == 1) else []
        if main:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": update, **stats}) + "\n")
            report.info(f"update {update}/{updates}  score {stats['objective/scores']:+.3f}  kl "
                        f"{stats['objective/kl']:.3f}  approxkl {stats['policy/approxkl_avg']:.4f}  clipfrac "
                        f"{stats['policy/clipfrac_avg']:.3f}  eos {stats['val/num_eos_tokens']}/"
                        f"{ppo.batch_size}")
            log_samples(samples_path, [row for rows in samples for row in rows])
            if save_every and update % save_every == 0 and update < updates:
                save_checkpoint(output_dir, cfg, update, episode, pool, **loop, kl_coef=kl_coef)

    # ------------------------------------------------------------------ save the policy only [25], evaluate
    metrics |= {key: stats[key] for key in ("objective/kl", "objective/scores", "objective/rlhf_reward",
                                            "policy/approxkl_avg", "eps")}
    metrics |= {"updates": updates, "episodes": episode, "train_runtime": round(time.time() - loop_started, 1)}
    if not main:
        return metrics
    if eval_prompts:
        metrics |= {f"{k}_after": v for k, v in evaluate(policy, tokenizer, scorer, eval_prompts, ppo,
                                                         stop_ids, bf16, device).items()}
        metrics["eval_score_gain"] = metrics["eval_score_after"] - metrics["eval_score_before"]
        metrics["eval_prompts"] = len(eval_prompts)
    policy.save_pretrained(output_dir)  # with LoRA: the adapter only
    tokenizer.padding_side, tokenizer.model_max_length = "right", context_length  # as chat and serve read it
    tokenizer.save_pretrained(output_dir)
    base = policy.get_base_model() if cfg.peft is not None else policy
    base.generation_config.save_pretrained(output_dir)
    if cfg.peft is not None:
        base.config.save_pretrained(output_dir)  # an adapter save has no config.json
    task = {"prompt_column": column, "stop_token_ids": stop_ids, "bf16": bf16, "labels": None,
            "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts)}
    report.write_run(output_dir, cfg, metrics, task=task, datasets=datasets_used, started=started)
    return metrics


# ---------------------------------------------------------------------------------------------- rollout


def make_rollout(policy, reference, value_model, tokenizer, scorer, batch: list[dict], ppo: PPOSection,
                 stop_ids: list[int], bf16: bool, device, all_sum=None, kl_coef: float | None = None,
                 reward_bias: float = 0.0) -> dict:
    """Generate, score and compute advantages for one batch of prompts, all without gradients [4]. With several
    processes, all_sum makes the whitening statistics those of every process's episodes together. kl_coef: the
    adaptive controller's current value (default ppo.kl_coef); reward_bias: the reference's mean score [10, 13]."""
    import torch

    kl_coef = ppo.kl_coef if kl_coef is None else kl_coef
    queries = encode_prompts(tokenizer, [record["prompt"] for record in batch], device)
    context = queries.shape[1]
    policy.eval()
    with torch.no_grad(), autocast(bf16, device):
        responses = sample(policy, tokenizer, queries, ppo, stop_ids)
        query_responses = torch.cat([queries, responses], 1)
        logprobs = forward_logprobs(policy, query_responses, context, responses, tokenizer.pad_token_id,
                                    ppo.temperature)
        if reference is None:
            with policy.disable_adapter():  # [26] the reference is the base without the adapter
                ref_logprobs = forward_logprobs(policy, query_responses, context, responses, tokenizer.pad_token_id,
                                                ppo.temperature)
        else:
            ref_logprobs = forward_logprobs(reference, query_responses, context, responses, tokenizer.pad_token_id,
                                            ppo.temperature)
        values = forward_values(value_model, query_responses, context, tokenizer.pad_token_id)

    ends, has_stop = core.end_indices(responses, stop_ids)  # [7, 8]
    pad_mask = core.padding_mask(ends, responses.shape[1])
    valid = ~pad_mask
    logprobs = logprobs.masked_fill(pad_mask, core.INVALID_LOGPROB)  # [15]
    ref_logprobs = ref_logprobs.masked_fill(pad_mask, core.INVALID_LOGPROB)
    values = values.masked_fill(pad_mask, 0.0)
    completions = decode_responses(tokenizer, responses, ends, has_stop)
    raw_scores = torch.tensor(scorer.score(batch, completions), device=responses.device)
    raw_scores = core.normalized_scores(raw_scores, reward_bias, ppo.reward_clip)  # [10]
    scores = core.apply_missing_eos_penalty(raw_scores, has_stop, ppo.missing_eos_penalty)  # [9]

    kl = (core.kl_k1 if ppo.kl_estimator == "k1" else core.kl_k3)(logprobs, ref_logprobs)  # [12]; 0 after the end
    non_score_reward = -kl_coef * kl
    rewards = core.shaped_rewards(scores, kl, kl_coef, ends)  # [13, 14]
    if ppo.whiten_rewards:
        rewards = core.masked_whiten(rewards, valid, shift_mean=False, all_sum=all_sum).masked_fill(pad_mask, 0.0)
    advantages, returns = core.gae(rewards, values, valid.float(), ppo.gamma, ppo.lam)  # [17]
    advantages = core.masked_whiten(advantages, valid, all_sum=all_sum).masked_fill(pad_mask, 0.0)  # [16, 18]

    stats = {
        "objective/kl": kl.sum(1).mean().item(),
        "objective/entropy": (-logprobs).masked_fill(pad_mask, 0.0).sum(1).mean().item(),
        "objective/non_score_reward": non_score_reward.sum(1).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean().item(),
        "objective/scores_without_penalty": raw_scores.mean().item(),
        "val/num_eos_tokens": int(has_stop.sum()),
        "objective/response_length": (ends + 1).float().mean().item(),
    }
    return {"pad_id": tokenizer.pad_token_id, "query_responses": query_responses, "responses": responses,
            "context": context, "logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns,
            "pad_mask": pad_mask, "completions": completions, "scores": scores, "kl": kl.sum(1), "stats": stats}


def sample(policy, tokenizer, queries, ppo: PPOSection, stop_ids: list[int]):
    """Sample exactly up to response_length tokens: do_sample, top_k=0, top_p=1, temperature T [4]. Sequences that
    stop early are padded to the full window, so every rollout has the same shape."""
    import torch

    mask = (queries != tokenizer.pad_token_id).long()
    # Every logits processor off but the temperature: the tokens must come from exactly softmax(logits / T), the
    # distribution the log-probs are computed under [5]; a model's own repetition penalty would break that.
    out = policy.generate(input_ids=queries, attention_mask=mask, max_new_tokens=ppo.response_length, do_sample=True,
                          top_k=0, top_p=1.0, temperature=ppo.temperature, repetition_penalty=1.0,
                          no_repeat_ngram_size=0, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    responses = out[:, queries.shape[1]:]
    missing = ppo.response_length - responses.shape[1]
    if missing:
        responses = torch.cat([responses, responses.new_full((len(responses), missing), tokenizer.pad_token_id)], 1)
    return responses


def forward_logprobs(model, query_responses, context: int, responses, pad_id: int, temperature: float):
    """Log-probs of the response tokens at temperature T, as in the rollout and in training [5, 6]."""
    logits = core.response_logits(model, query_responses, context, pad_id)
    return core.logprobs_from_logits(logits, responses, temperature)


def forward_values(value_model, query_responses, context: int, pad_id: int):
    """V(state before each response token): the value head at positions context-1 .. -2 [24]."""
    ids, mask, positions = core.left_padded_inputs(query_responses, pad_id, response_start=context)
    return core.per_token_scores(value_model, ids, mask, positions)[:, context - 1:-1]


# ---------------------------------------------------------------------------------------------- optimisation


def train_on_rollout(policy, value_model, optimizer, rollout: dict, ppo: PPOSection, accumulation: int,
                     generator, bf16: bool, sync_grads=None) -> dict:
    """num_ppo_epochs x num_mini_batches clipped policy + value steps on one rollout [19, 20, 21]. sync_grads
    averages the gradients over processes before each step, as DDP would."""
    import torch

    # Eval mode while training too: PPO trains with no dropout [3], and zeroing nn.Dropout modules is not enough,
    # since some models take a rate from their config in train mode (Llama's attention_dropout).
    policy.eval()
    value_model.eval()
    device = rollout["responses"].device
    sums, count, first_ratio_dev, norms = {}, 0, None, []
    for _ in range(ppo.num_ppo_epochs):
        for minibatch in core.minibatches(len(rollout["responses"]), ppo.num_mini_batches, generator):
            optimizer.zero_grad(set_to_none=True)
            for micro in minibatch.chunk(accumulation):  # gradient accumulation inside a minibatch [21]
                micro = micro.to(device)
                pick = {k: rollout[k][micro] for k in ("query_responses", "responses", "logprobs", "values",
                                                       "advantages", "returns", "pad_mask")}
                valid = ~pick["pad_mask"]
                with autocast(bf16, device):
                    logits = core.response_logits(policy, pick["query_responses"], rollout["context"],
                                                  rollout["pad_id"])
                    vpred = forward_values(value_model, pick["query_responses"], rollout["context"],
                                           rollout["pad_id"])
                new_logprobs = core.logprobs_from_logits(logits, pick["responses"], ppo.temperature)
                new_logprobs = new_logprobs.masked_fill(pick["pad_mask"], core.INVALID_LOGPROB)
                vpred = vpred.masked_fill(pick["pad_mask"], 0.0)
                pg_loss, pg_stats = core.policy_loss(new_logprobs, pick["logprobs"], pick["advantages"], valid,
                                                     ppo.cliprange)
                vf_loss, vf_stats = core.value_loss(vpred, pick["values"], pick["returns"], valid, ppo.cliprange_value)
                loss = pg_loss + ppo.vf_coef * vf_loss  # [20]
                (loss / accumulation).backward()
                with torch.no_grad():
                    ratio = (new_logprobs - pick["logprobs"]).exp()[valid]
                    if first_ratio_dev is None:  # [5] before any optimiser step this must be 1 (test: +-1e-3)
                        first_ratio_dev = (ratio - 1).abs().max().item()
                    entropy = core.masked_mean(core.entropy_from_logits(logits.detach() / ppo.temperature), valid)
                    step = {"policy/approxkl_avg": pg_stats["approxkl"], "policy/clipfrac_avg": pg_stats["clipfrac"],
                            "val/clipfrac_avg": vf_stats["clipfrac"], "loss/policy_avg": pg_loss.detach(),
                            "loss/value_avg": vf_loss.detach(), "policy/entropy_avg": entropy,
                            "val/ratio": ratio.mean(), "val/ratio_var": ratio.var() if ratio.numel() > 1 else
                            torch.tensor(0.0)}
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if sync_grads is not None:
                sync_grads(params)
            if ppo.max_grad_norm is not None:  # policy and value together, as one optimiser over both [25]
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, ppo.max_grad_norm)))  # the norm before
            optimizer.step()
    stats = {key: value / count for key, value in sums.items()}
    stats["policy/first_minibatch_ratio_max_dev"] = first_ratio_dev
    if norms:
        stats["grad_norm"] = sum(norms) / len(norms)  # before clipping, as transformers' Trainer logs it
    return stats


def check_health(stats: dict, ppo: PPOSection, mode: str, update: int, output_dir: Path) -> None:
    """The watchdog of our loop: a non-finite loss or KL, a runaway KL, or a collapsed entropy stop the run (exit 3)
    before it is logged or checkpointed, so the last checkpoint is the last good state; `train.watchdog: warn` only
    warns."""
    problem = None
    broken = [key for key in ("loss/policy_avg", "loss/value_avg", "objective/kl") if not math.isfinite(stats[key])]
    if broken:
        problem = (f"{broken[0]} is {stats[broken[0]]} at update {update}; lower train.learning_rate, or check the "
                   "reward for NaN/inf scores")
    elif ppo.max_kl is not None and stats["objective/kl"] > ppo.max_kl:
        problem = (f"objective/kl is {stats['objective/kl']:.1f} nats at update {update}, above ppo.max_kl="
                   f"{ppo.max_kl}: the policy is running away from the reference; raise ppo.kl_coef or lower "
                   "train.learning_rate")
    elif ppo.min_entropy is not None and stats["policy/entropy_avg"] < ppo.min_entropy:
        problem = (f"policy entropy is {stats['policy/entropy_avg']:.4f} nats per token at update {update}, below "
                   f"ppo.min_entropy={ppo.min_entropy}: the policy collapsed onto a few tokens; lower "
                   "train.learning_rate or raise ppo.kl_coef")
    if problem and mode == "stop":  # only now look for the last checkpoint: this runs every update
        raise TrainingStopped(f"{problem}; {training.last_checkpoint(str(training.checkpoints_dir(output_dir)))}")
    if problem:
        report.warn(problem)


def load_value_model(cfg: Recipe, ppo: PPOSection, tokenizer, scorer: Scorer):
    """The value model: a sequence classifier, from the reward model by default [24]. It reads the policy's token ids,
    so it must share the policy's vocabulary.

    With peft the value model is an adapter too. Started from the reward model, it is an adapter on the Scorer's own
    reward model, made by scorer.add_value_adapter (which then scores with that adapter disabled): one reward model in
    memory, and no gradients or AdamW state for its base: with bf16 bases too, rlhf-hh-ppo's peak RSS went from 6.9
    to 4.7 GB (benchmarks/ppo_vs_trl.py)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from nlpkit.config import ModelSection

    if ppo.value_model is not None:
        model, value_tokenizer = load_reward_model(ppo.value_model, "ppo.value_model")
        key = "ppo.value_model"
    elif scorer.model is not None:
        model, value_tokenizer, key = scorer.model, scorer.tokenizer, "reward.model"
    else:  # reward functions only: the policy's base with a fresh one-output head
        model = load_model(AutoModelForSequenceClassification, ModelSection(**cfg.model.model_dump()), num_labels=1,
                           pad_token_id=tokenizer.pad_token_id)
        value_tokenizer, key = tokenizer, "model.name"
    if value_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise NlpkitError(f"{key}: the value model starts from it, but its vocabulary differs from the policy's "
                          f"({cfg.model.name}); train the reward model from the same base, or set ppo.value_model")
    if model is scorer.model:
        if cfg.peft is not None:
            return scorer.add_value_adapter(cfg.peft)  # shared: the Scorer's model, scored with the adapter off
        model = copy.deepcopy(scorer.model).cpu()  # full weights: a copy of its own
    if cfg.peft is None:
        return model.to(torch.float32).requires_grad_(True)
    frozen_dtype = torch.bfloat16 if scorer.bf16 else torch.float32  # as the policy's base, and the Scorer's model
    value_model = apply_peft(model.to(frozen_dtype), cfg.peft, task_type="SEQ_CLS")  # SEQ_CLS: a trainable head copy
    trainable_in_fp32(value_model)
    return value_model


def evaluate(policy, tokenizer, scorer: Scorer, prompts: list[dict], ppo: PPOSection, stop_ids: list[int],
             bf16: bool, device, batch_size: int = 16) -> dict:
    """Greedy responses to held-out prompts, scored without the EOS penalty: what a user of the policy would get."""
    import torch

    def greedy(queries):
        out = policy.generate(input_ids=queries, attention_mask=(queries != tokenizer.pad_token_id).long(),
                              max_new_tokens=ppo.response_length, do_sample=False,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        return out[:, queries.shape[1]:]

    policy.eval()
    with torch.no_grad(), autocast(bf16, device):
        scores, stops = respond_and_score(greedy, tokenizer, scorer, prompts, stop_ids, batch_size, device)
    return {"eval_score": sum(scores) / len(scores), "eval_eos_rate": sum(stops) / len(stops)}


def reference_score_bias(policy, reference, tokenizer, scorer: Scorer, prompts: list[dict], ppo: PPOSection,
                         stop_ids: list[int], bf16: bool, device, rank: int, world: int, gather) -> float:
    """[10] The mean score (no EOS penalty) of responses the reference samples as in the rollout; each process
    scores its share of the prompts. With LoRA the reference is the policy with its adapter disabled [26]."""
    import torch

    model = policy if reference is None else reference
    model.eval()
    without_adapter = policy.disable_adapter() if reference is None else contextlib.nullcontext()
    with torch.no_grad(), autocast(bf16, device), without_adapter:
        scores, _ = respond_and_score(lambda queries: sample(model, tokenizer, queries, ppo, stop_ids), tokenizer,
                                      scorer, prompts[rank::world], stop_ids, ppo.batch_size, device)
    everything = [score for part in gather(scores) for score in part]
    return sum(everything) / len(everything)


def respond_and_score(respond, tokenizer, scorer: Scorer, prompts: list[dict], stop_ids: list[int],
                      batch_size: int, device) -> tuple[list[float], list[bool]]:
    """Batch by batch: respond(queries) -> response ids, cut at the first stop token, scored without the EOS
    penalty. Returns the scores and whether each response stopped."""
    scores, stops = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        responses = respond(encode_prompts(tokenizer, [record["prompt"] for record in batch], device))
        ends, has_stop = core.end_indices(responses, stop_ids)
        scores += scorer.score(batch, decode_responses(tokenizer, responses, ends, has_stop))
        stops += has_stop.tolist()
    return scores, stops


# ---------------------------------------------------------------------------------------------- helpers


def stop_token_ids(tokenizer, stop_token: str | None) -> list[int]:
    """The configured stop token (default: the EOS) as ids; checked, since a stop token the tokenizer does not
    know would never be generated and every response would be penalised [9]."""
    token = stop_token or tokenizer.eos_token
    if token is None or token not in tokenizer.get_vocab():
        raise NlpkitError(f"ppo.stop_token {token!r}: not a token of the policy's tokenizer; use its EOS "
                          f"({tokenizer.eos_token!r}) or another single token of its vocabulary")
    return [tokenizer.convert_tokens_to_ids(token)]


def encode_prompts(tokenizer, prompts: list[str], device):
    """Left-padded prompt ids [2], at most tokenizer.model_max_length of them (cut on the tokenizer's truncation
    side); a tokenizer with a chat template wraps each prompt as a user turn."""
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, padding=True, truncation=True, add_special_tokens=False, return_tensors="pt")
    else:
        batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    return batch["input_ids"].to(device)


def decode_responses(tokenizer, responses, ends, has_stop) -> list[str]:
    """Response text up to (not including) its stop token."""
    texts = []
    for row, end, stopped in zip(responses.tolist(), ends.tolist(), has_stop.tolist()):
        texts.append(tokenizer.decode(row[:end] if stopped else row[:end + 1], skip_special_tokens=True).strip())
    return texts


def sample_rows(update: int, batch: list[dict], rollout: dict) -> list[dict]:
    """The update's prompts, responses, scores and KL, as rows for samples.jsonl."""
    return [{"update": update, "prompt": record["prompt"], "response": completion, "score": score, "kl": kl}
            for record, completion, score, kl in zip(batch, rollout["completions"], rollout["scores"].tolist(),
                                                      rollout["kl"].tolist())]


def log_samples(path: Path, rows: list[dict], shown: int = 3) -> None:
    """Every sampled episode to samples.jsonl (from every process), and a few to stderr."""
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows[:shown]:
        report.info(f"  [{row['update']}] {row['score']:+.2f}  {row['prompt'][:60]!r} -> {row['response'][:100]!r}")
