"""RLHF with nlpkit's own PPO loop (trl deleted its PPOTrainer): a policy, a frozen reference, a reward, a value model.

    nlpkit finetune reward-hh          # first: the reward model
    nlpkit rlhf rlhf-hh-ppo            # then: PPO against it
    nlpkit chat runs/rlhf-hh-ppo --prompt "How do I stay safe online?"

One update: sample `ppo.batch_size` prompts (split over the processes under --num-processes), generate responses
(left padding, sampling at temperature T), cut each after its first stop token, score it (reward model at the EOS,
plus reward functions, minus a penalty when no EOS came), shape per-token rewards with the KL to the reference,
compute GAE advantages from the value model, then `num_ppo_epochs` passes of `num_mini_batches` clipped policy +
value steps (gradients averaged over processes). This file is the loop, read top to bottom; the math lives in
nlpkit/ppo/core.py as small tested functions, one rollout in ppo/rollout.py, one update in ppo/update.py, checkpoints
in ppo/checkpoint.py and scoring in nlpkit/scoring.py. The numbers in brackets are the items of the PPO checklist
(docs/ppo-checklist.md).

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

from nlpkit import heldout, report, training
from nlpkit.adapters import apply_peft
from nlpkit.config import PPOSection, Recipe
from nlpkit.data import open_source, prompt_column, prompt_records, split_prompts
from nlpkit.distributed import process_device, process_group
from nlpkit.errors import NlpkitError, TrainingStopped
from nlpkit.models import autocast, bf16_is_fast, distinct_pad, load_model, load_tokenizer, weights_dtype
from nlpkit.ppo import core
from nlpkit.ppo.checkpoint import load_checkpoint, save_checkpoint
from nlpkit.ppo.rollout import decode_responses, encode_prompts, episode_seeds, make_rollout, sample
from nlpkit.ppo.update import train_on_rollout
from nlpkit.scoring import Scorer, load_reward_model

MODEL_CLASS = "AutoModelForCausalLM"  # what `nlpkit merge` loads a run with
SAMPLE_TEXTS = ["What is the capital of France?", "Give me three tips for staying healthy."]
# The last update's statistics that metrics.json keeps.
FINAL_STATS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg", "eps")


def run(cfg: Recipe, output_dir: Path, resume: bool = False) -> dict:
    import torch

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
    main = rank == 0  # the main process evaluates, logs, checkpoints and saves

    # ------------------------------------------------------------------ prompts: train, and held out for the eval
    tokenizer, context_length = load_policy_tokenizer(cfg)
    stop_ids = stop_token_ids(tokenizer, ppo.stop_token)
    column, train_prompts, eval_prompts, datasets_used = load_prompts(cfg, ppo)

    # ------------------------------------------------------------------ models
    scorer, policy, reference, value_model = load_models(cfg, ppo, tokenizer, bf16, device)
    updates = core.num_updates(ppo.total_episodes, ppo.batch_size)  # [23]
    optimizer, scheduler = make_optimizer(cfg, policy, value_model, updates)
    before = heldout.answer(policy, tokenizer, eval_prompts, ppo.response_length, stop_ids, bf16, device,
                            scorer) if eval_prompts and main else []
    metrics = {}
    reward_bias = 0.0
    if ppo.reward_baseline_prompts:  # [10] computed again on --resume: the same prompts, seed and reference
        reward_bias = metrics["reward_bias"] = reference_score_bias(
            policy, reference, tokenizer, scorer, train_prompts[:ppo.reward_baseline_prompts], cfg.train.seed, ppo,
            stop_ids, bf16, device, rank, world, gather)

    # ------------------------------------------------------------------ the loop
    log_path, samples_path = output_dir / "train_log.jsonl", output_dir / "samples.jsonl"
    order, generator = random.Random(cfg.train.seed), torch.Generator().manual_seed(cfg.train.seed)
    loop_started, episode, stats, pool, first_update, kl_coef = time.time(), 0, {}, [], 1, ppo.kl_coef
    loop = {"policy": policy, "value_model": value_model, "optimizer": optimizer, "scheduler": scheduler,
            "order": order, "generator": generator}
    if checkpoint is not None:  # everything the next update depends on, as the killed run left it
        first_update, episode, pool, kl_coef = load_checkpoint(checkpoint, **loop, kl_coef=kl_coef)
        training.truncate_log(samples_path, first_update - 1, key="update")
    save_every = cfg.train.save_steps if cfg.train.save_strategy == "steps" else 0
    trackers = training.LoopTrackers(cfg, output_dir) if main else None  # train.report_to
    for update in range(first_update, updates + 1):
        chunk, pool = next_prompts(pool, order, train_prompts, ppo.batch_size)
        share = range(rank * per_process, (rank + 1) * per_process)  # this process's episodes of the update
        batch, seeds = [chunk[i] for i in share], episode_seeds(cfg.train.seed, update, share)
        rollout = make_rollout(policy, reference, value_model, tokenizer, scorer, batch, seeds, ppo, stop_ids, bf16,
                               device, all_sum, kl_coef=kl_coef, reward_bias=reward_bias)
        stats = train_on_rollout(policy, value_model, optimizer, rollout, ppo, cfg.train.gradient_accumulation_steps,
                                 generator, bf16, all_sum, world)
        scheduler.step()
        episode += ppo.batch_size
        stats = core.combine_process_stats(gather(stats | rollout["stats"]))  # over every process's episodes
        stats |= {"lr": scheduler.get_last_lr()[0], "episode": episode, "eps": episode / (time.time() - loop_started),
                  "objective/kl_coef": kl_coef}
        check_health(stats, ppo, cfg.train.watchdog, update, output_dir)
        if ppo.kl_target is not None:  # [13] every process saw the same whole-batch KL: the same next coefficient
            kl_coef = core.adaptive_kl_coef(kl_coef, stats["objective/kl"], ppo.kl_target, ppo.kl_horizon,
                                            ppo.batch_size)
        samples = gather(sample_rows(update, batch, rollout)) if sampled(update, updates, ppo) else []
        if main:
            log_update(log_path, samples_path, update, updates, stats, samples, ppo.batch_size)
            trackers.log(update, stats)
            if save_every and update % save_every == 0 and update < updates:
                save_checkpoint(output_dir, cfg, update, episode, pool, **loop, kl_coef=kl_coef)

    # ------------------------------------------------------------------ save the policy only [25], evaluate
    metrics |= {key: stats[key] for key in FINAL_STATS} | {"updates": updates, "episodes": episode,
                                                           "train_runtime": round(time.time() - loop_started, 1)}
    if not main:
        return metrics
    save_policy(output_dir, cfg, policy, tokenizer, context_length)  # first: a failing evaluation never loses it
    if eval_prompts:
        after = heldout.answer(policy, tokenizer, eval_prompts, ppo.response_length, stop_ids, bf16, device, scorer,
                               kl_to=reference or "adapter")
        metrics |= heldout.before_after(before, after, output_dir)
        report.info(heldout.describe(metrics))
    trackers.log(updates, {k: v for k, v in metrics.items() if k.startswith("eval_") and not isinstance(v, dict)})
    trackers.close()
    task = {"prompt_column": column, "stop_token_ids": stop_ids, "bf16": bf16, "labels": None,
            "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts)}
    report.write_run(output_dir, cfg, metrics, task=task, datasets=datasets_used, started=started)
    return metrics


# ---------------------------------------------------------------------------------------------- setting up


def load_policy_tokenizer(cfg: Recipe):
    """The policy's tokenizer as rollouts use it, and the model_max_length it came with (save_policy restores it)."""
    tokenizer = distinct_pad(load_tokenizer(cfg.model), "model.name")  # [1]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"  # [2]; long prompts keep their end
    # data.max_length caps the prompt's tokens (encode_prompts truncates to model_max_length); restored on saving.
    context_length, tokenizer.model_max_length = tokenizer.model_max_length, cfg.data.max_length
    return tokenizer, context_length


def stop_token_ids(tokenizer, stop_token: str | None) -> list[int]:
    """The configured stop token (default: the EOS) as ids; checked, since a stop token the tokenizer does not
    know would never be generated and every response would be penalised [9]."""
    token = stop_token or tokenizer.eos_token
    if token is None or token not in tokenizer.get_vocab():
        raise NlpkitError(f"ppo.stop_token {token!r}: not a token of the policy's tokenizer; use its EOS "
                          f"({tokenizer.eos_token!r}) or another single token of its vocabulary")
    return [tokenizer.convert_tokens_to_ids(token)]


def load_prompts(cfg: Recipe, ppo: PPOSection) -> tuple[str, list[dict], list[dict], list]:
    """(prompt column, training prompts, held-out prompts, the datasets read). The held-out prompts are
    ppo.eval_prompts of data.train that training never samples, or the first ppo.eval_prompts of data.eval."""
    rows = open_source(cfg.data.train, "train", "data.train", cfg.data.mirror)
    column = prompt_column(rows, cfg.data.text_column)
    train_prompts, eval_prompts = split_prompts(rows, column, held=0 if cfg.data.eval else ppo.eval_prompts,
                                                seed=cfg.train.seed, limit=cfg.data.max_train_samples)
    if not cfg.data.eval:
        return column, train_prompts, eval_prompts, [rows]
    eval_rows = open_source(cfg.data.eval, "test", "data.eval", cfg.data.mirror)
    eval_prompts = prompt_records(eval_rows, prompt_column(eval_rows, cfg.data.text_column))[:ppo.eval_prompts or None]
    return column, train_prompts, eval_prompts, [rows, eval_rows]


def load_models(cfg: Recipe, ppo: PPOSection, tokenizer, bf16: bool, device):
    """(scorer, policy, reference, value model) on the device, in eval mode [3]: throughout, training included, so
    no dropout of any kind. With LoRA the reference is None and the value model shares the Scorer's reward model."""
    scorer = Scorer(cfg.reward, bf16, device)
    policy, reference = load_policy(cfg, bf16)
    value_model = load_value_model(cfg, ppo, tokenizer, scorer)
    for model in (policy, reference, value_model):
        if model is not None:
            model.to(device).eval()
    return scorer, policy, reference, value_model


def load_policy(cfg: Recipe, bf16: bool):
    """(policy, reference): the reference is a frozen copy [11], or None with LoRA, where it is the policy with its
    adapter disabled [26] and one base model sits in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.peft is None:
        policy = load_model(AutoModelForCausalLM, cfg.model)
        report.print_parameters(policy)
        # Held as frozen weights are on this device (bf16 on a GPU) when autocast runs in bf16; else as the policy.
        frozen = weights_dtype(cfg.model.dtype, True, process_device().type) if bf16 else policy.dtype
        return policy, copy.deepcopy(policy).requires_grad_(False).to(frozen)  # [11] frozen
    # A frozen base is held in bf16 when autocast runs in bf16: every matmul would cast it anyway, and keep the
    # cast copy for the backward pass. Half the weight memory, and no copies; the adapter trains in fp32.
    policy = load_model(AutoModelForCausalLM, cfg.model, frozen=True, **({"dtype": torch.bfloat16} if bf16 else {}))
    policy = apply_peft(policy, cfg.peft, task_type="CAUSAL_LM")  # LoRA B = 0: the policy starts at the reference
    return policy, None


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
    return apply_peft(model.to(frozen_dtype), cfg.peft, task_type="SEQ_CLS")  # SEQ_CLS: a trainable head copy


def make_optimizer(cfg: Recipe, policy, value_model, updates: int):
    """[22, 25] One optimiser over policy and value; AdamW eps 1e-5 as N+; the LR decays linearly, once per update."""
    import torch

    trainable = [p for model in (policy, value_model) for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, eps=1e-5, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / updates)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------- the loop


def next_prompts(pool: list[dict], order, prompts: list[dict], count: int) -> tuple[list[dict], list[dict]]:
    """The next `count` prompts of the pool, and the pool left; an empty pool refills with every prompt in a fresh
    seeded order, so each pass walks them all."""
    while len(pool) < count:
        pool = pool + order.sample(prompts, len(prompts))
    return pool[:count], pool[count:]


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


def sampled(update: int, updates: int, ppo: PPOSection) -> bool:
    """Whether samples.jsonl gets this update's episodes: the first update and every updates/N-th after it."""
    if not ppo.num_sample_generations:
        return False
    every = max(1, updates // ppo.num_sample_generations)
    return update % every == 0 or update == 1


def sample_rows(update: int, batch: list[dict], rollout: dict) -> list[dict]:
    """The update's prompts, responses, scores and KL, as rows for samples.jsonl."""
    return [{"update": update, "prompt": record["prompt"], "response": completion, "score": score, "kl": kl}
            for record, completion, score, kl in zip(batch, rollout["completions"], rollout["scores"].tolist(),
                                                      rollout["kl"].tolist())]


def log_update(log_path: Path, samples_path: Path, update: int, updates: int, stats: dict,
               samples: list[list[dict]], batch_size: int) -> None:
    """The update's statistics to train_log.jsonl and one line on stderr; the sampled episodes of every process."""
    with log_path.open("a") as f:
        f.write(json.dumps({"step": update, **stats}) + "\n")
    report.info(f"update {update}/{updates}  score {stats['objective/scores']:+.3f}  kl "
                f"{stats['objective/kl']:.3f}  approxkl {stats['policy/approxkl_avg']:.4f}  clipfrac "
                f"{stats['policy/clipfrac_avg']:.3f}  eos {stats['val/num_eos_tokens']}/{batch_size}")
    log_samples(samples_path, [row for rows in samples for row in rows])


def log_samples(path: Path, rows: list[dict], shown: int = 3) -> None:
    """Every sampled episode to samples.jsonl (from every process), and a few to stderr."""
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows[:shown]:
        report.info(f"  [{row['update']}] {row['score']:+.2f}  {row['prompt'][:60]!r} -> {row['response'][:100]!r}")


# ---------------------------------------------------------------------------------------------- evaluation and saving


def reference_score_bias(policy, reference, tokenizer, scorer: Scorer, prompts: list[dict], seed: int,
                         ppo: PPOSection, stop_ids: list[int], bf16: bool, device, rank: int, world: int,
                         gather) -> float:
    """[10] The mean score (no EOS penalty) of responses the reference samples as in the rollout; each process
    scores its share of the prompts. Each response's seed comes from its prompt's index (episode_seeds of update 0,
    before the loop's first), so the bias is the same with any number of processes. With LoRA the reference is the
    policy with its adapter disabled [26]."""
    import torch

    model = policy if reference is None else reference
    model.eval()
    without_adapter = policy.disable_adapter() if reference is None else contextlib.nullcontext()
    share = range(rank, len(prompts), world)
    seeds = episode_seeds(seed, 0, share)

    def respond(queries, start: int):
        return sample(model, tokenizer, queries, seeds[start:start + len(queries)], ppo, stop_ids)

    with torch.no_grad(), autocast(bf16, device), without_adapter:
        scores, _ = respond_and_score(respond, tokenizer, scorer, [prompts[i] for i in share], stop_ids,
                                      ppo.batch_size, device)
    everything = [score for part in gather(scores) for score in part]
    bias = sum(everything) / len(everything)
    report.info(f"reward baseline: the reference policy's responses score {bias:+.3f} on average; subtracted from "
                "every score")
    return bias


def respond_and_score(respond, tokenizer, scorer: Scorer, prompts: list[dict], stop_ids: list[int],
                      batch_size: int, device) -> tuple[list[float], list[bool]]:
    """Batch by batch: respond(queries, start) -> response ids (start: the index of the batch's first prompt), cut at
    the first stop token, scored without the EOS penalty. Returns the scores and whether each response stopped."""
    scores, stops = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        queries = encode_prompts(tokenizer, [record["prompt"] for record in batch], device)
        responses = respond(queries, start)
        ends, has_stop = core.end_indices(responses, stop_ids)
        scores += scorer.score(batch, decode_responses(tokenizer, queries, responses, ends, has_stop))
        stops += has_stop.tolist()
    return scores, stops


def save_policy(output_dir: Path, cfg: Recipe, policy, tokenizer, context_length: int) -> None:
    """The policy only [25] (with LoRA: the adapter), with the tokenizer and configs `nlpkit chat` and serve read."""
    policy.save_pretrained(output_dir)  # with LoRA: the adapter only
    saved = copy.copy(tokenizer)  # the rollout's own (left padding, prompt-length cap) still answers the eval prompts
    saved.padding_side, saved.model_max_length = "right", context_length  # as chat and serve read it
    saved.save_pretrained(output_dir)
    base = policy.get_base_model() if cfg.peft is not None else policy
    base.generation_config.save_pretrained(output_dir)
    if cfg.peft is not None:
        base.config.save_pretrained(output_dir)  # an adapter save has no config.json
