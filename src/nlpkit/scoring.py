"""Scoring completions, for every RL and evaluation path: a reward model read at the EOS, plus reward functions.

A reward model is a `stage: reward` run (full or adapter) or any saved sequence classifier with num_labels=1; reward
functions are `reward.function` specs (nlpkit/rewards.py). stages/ppo.py scores its rollouts and its before/after
evaluation with the Scorer, stages/grpo.py hands it to trl as one reward function, and pair_metrics (a reward run's
end-of-run metrics and `nlpkit eval`) reads pair accuracy with score_ids, so every path scores text the way the
reward model was trained: at the EOS. A dpo/kto/orpo/simpo policy has an implicit reward instead (its log-prob ratio
to the reference): preference_metrics reads the same pair accuracy and margin from it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from nlpkit import runs
from nlpkit.adapters import apply_peft
from nlpkit.config import DPOSection, PeftSection, RewardSection
from nlpkit.errors import NlpkitError
from nlpkit.models import autocast, distinct_pad
from nlpkit.data import chat_reply_ids, open_source, pair_ids, preference_chats, preference_columns
from nlpkit.distributed import place
from nlpkit.rewards import call_reward_function, load_reward_function


class Scorer:
    """Score completions: the reward model at the EOS (text in the reward model's own format), plus weighted
    reward functions. The same object scores the training rollouts and the before/after evaluation."""

    def __init__(self, reward: RewardSection, bf16: bool, device):
        import torch

        self.template = reward.prompt_template
        self.functions = [(spec, load_reward_function(spec)) for spec in reward.function]
        weights = reward.function_weight
        self.weights = weights if isinstance(weights, list) else [weights] * len(self.functions)
        self.bf16 = bf16
        self.model = self.tokenizer = None
        self.reward_view = contextlib.nullcontext  # add_value_adapter: with that adapter disabled
        self.max_length = 1024
        if reward.model is not None:
            self.model, self.tokenizer = load_reward_model(reward.model, "reward.model")
            # Frozen, and only ever run under autocast: held in bf16 when autocast is, at half the memory.
            self.model.requires_grad_(False).to(device, torch.bfloat16 if bf16 else torch.float32).eval()  # [3]
            manifest = Path(reward.model) / runs.MANIFEST
            if manifest.is_file():  # score no longer text than the reward model was trained on
                self.max_length = json.loads(manifest.read_text())["task"].get("max_length") or self.max_length

    def score(self, batch: list[dict], completions: list[str]) -> list[float]:
        """The total: the reward model's score plus each function's value times its weight."""
        parts = self.components(batch, completions)
        weights = [1.0] * (self.model is not None) + self.weights
        return [sum(w * v for w, v in zip(weights, values)) for values in zip(*parts.values())]

    def components(self, batch: list[dict], completions: list[str]) -> dict[str, list[float]]:
        """Each source's unweighted scores: "reward_model" (when there is one), then each function by its spec."""
        parts = {}
        if self.model is not None:
            # Every text ends in the EOS and is scored there [8]: RewardTrainer trained on text + EOS, and what the
            # head says at any other token is untrained (reward-hh read 0.86 higher, on average, at a reply's last
            # token than at its EOS, which outweighed the missing-EOS penalty and taught the policy not to stop).
            # A response cut by the window is scored as if it ended there, and loses missing_eos_penalty [9]
            # (OpenRLHF likewise writes an EOS at the end of every sequence).
            ids = [self.tokenizer(self.template.format(prompt=record["prompt"]) + completion +
                                  self.tokenizer.eos_token)["input_ids"][-self.max_length:]
                   for record, completion in zip(batch, completions)]
            with self.reward_view():
                parts["reward_model"] = score_ids(self.model, ids, self.tokenizer.pad_token_id, self.bf16)
        prompts = [record["prompt"] for record in batch]
        columns = {key: [record[key] for record in batch] for key in batch[0] if key != "prompt"}
        for spec, function in self.functions:
            parts[spec] = call_reward_function(spec, function, prompts, completions, columns)
        return parts

    def add_value_adapter(self, peft: PeftSection):
        """[24] The PPO value model as a peft adapter on this reward model, with a trainable copy of its score head
        (SEQ_CLS): one reward model in memory, and no gradients or AdamW state for its base. From now on this Scorer
        scores with that adapter disabled, so the reward stays the reward model's own while the value model trains.
        The adapter trains in fp32 over the frozen base (bf16 when autocast is)."""
        value_model = apply_peft(self.model, peft, task_type="SEQ_CLS")
        self.reward_view = value_model.disable_adapter
        return value_model


def score_ids(model, ids: list[list[int]], pad_id: int, bf16: bool) -> list[float]:
    """Right-pad token lists, run the classifier, read the score at each list's last token."""
    import torch

    from nlpkit.ppo.core import per_token_scores, scores_at

    device = next(model.parameters()).device
    lengths = torch.tensor([len(row) for row in ids])
    batch = torch.full((len(ids), int(lengths.max())), pad_id)
    for i, row in enumerate(ids):
        batch[i, :len(row)] = torch.tensor(row)
    mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
    batch, mask, lengths = batch.to(device), mask.to(device), lengths.to(device)  # one copy to the model's device
    with torch.inference_mode(), autocast(bf16, device):
        per_token = per_token_scores(model, batch.masked_fill(~mask, 0), mask.long())
    return scores_at(per_token, lengths - 1).tolist()


def check_reward_model(ref: str, key: str) -> None:
    """That `ref` is a reward model directory: checked before training where scoring comes only at the end."""
    from transformers import AutoConfig

    if not (Path(ref) / "config.json").is_file():
        raise NlpkitError(f"{key} {ref}: not a reward model directory (no config.json); give the output directory of "
                          "a `stage: reward` run")
    config = AutoConfig.from_pretrained(ref)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise NlpkitError(f"{key} {ref}: not a reward model (architectures {architectures}, num_labels "
                          f"{config.num_labels}); it must be a sequence classifier with num_labels=1, as "
                          "`nlpkit finetune` with stage: reward writes")


def load_reward_model(ref: str, key: str):
    """A reward run (full or adapter, merged) or a saved sequence classifier with num_labels=1, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model(ref, key)
    path = Path(ref)
    tokenizer = distinct_pad(AutoTokenizer.from_pretrained(path), key, fix=False)
    if (path / "adapter_config.json").is_file():
        # Dequantized first: a 4-bit reward run merges into plain weights that can be cast and moved.
        model = runs.load_model(runs.open_run(path), dequantize=True).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- pair accuracy


def reward_run_metrics(run: runs.Run, data_spec: str, mirror: str | None) -> dict:
    """Pair accuracy and mean margin of a reward run on any preference file: the same keys as its metrics.json."""
    model, tokenizer = load_reward_model(str(run.path), "RUN_DIR")
    rows = open_source(data_spec, "test", "--data", mirror)
    return pair_metrics(model, tokenizer, preference_columns(rows), run.task["max_length"],
                        run.recipe.train.per_device_eval_batch_size, run.task["bf16"])


def pair_metrics(model, tokenizer, pairs: dict[str, list], max_length: int, batch_size: int, bf16: bool) -> dict:
    """Score chosen and rejected texts exactly as the model was trained on them (pair_ids), read at the EOS.

    Ties count as wrong: a reward model that scores everything alike has accuracy 0, not 0.5.
    """
    def scores(rows: list[list[int]]) -> list[float]:
        return [score for start in range(0, len(rows), batch_size)
                for score in score_ids(model, rows[start:start + batch_size], tokenizer.pad_token_id, bf16)]

    model.eval()
    ids = pair_ids(tokenizer, pairs, max_length)
    return pair_summary(scores(ids["chosen_ids"]), scores(ids["rejected_ids"]))


def pair_summary(chosen: list[float], rejected: list[float]) -> dict:
    """Pair accuracy and mean margin of chosen over rejected scores. Ties count as wrong: a model that scores
    everything alike has accuracy 0, not 0.5."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"eval_pair_accuracy": sum(m > 0 for m in margins) / len(margins),
            "eval_mean_margin": sum(margins) / len(margins), "eval_pairs": len(margins)}


# ---------------------------------------------------------------------------------------------- implicit rewards


def implicit_pair_metrics(policy: tuple[list, list], reference: tuple[list, list] | None, beta: float) -> dict:
    """pair_summary of the implicit rewards of a preference-trained policy, from the (chosen, rejected) log-probs of
    policy and reference: beta * (log pi - log pi_ref), as trl's DPO and KTO define it; beta * log pi (mean per token)
    for orpo and simpo, which have no reference (reference None)."""
    reference = reference or ([0.0] * len(policy[0]), [0.0] * len(policy[1]))
    chosen, rejected = ([beta * (p - r) for p, r in zip(pi, ref)] for pi, ref in zip(policy, reference))
    return pair_summary(chosen, rejected)


def preference_metrics(policy, tokenizer, chats: dict[str, list], *, stage: str, beta: float, max_length: int,
                       batch_size: int, bf16: bool, reference=None) -> dict:
    """Implicit-reward pair accuracy and mean margin on conversational preference rows (data.preference_chats),
    tokenized as trl's trainers tokenize them, for a dpo/kto/orpo/simpo policy. The reference: `reference`, else
    (dpo, kto) the policy with its adapter disabled. As trl does, pairs whose prompt fills max_length are left out."""
    pairs = [tuple(chat_reply_ids(tokenizer, prompt, reply, max_length) for reply in (chosen, rejected))
             for prompt, chosen, rejected in zip(chats["prompt"], chats["chosen"], chats["rejected"])]
    pairs = [pair for pair in pairs if len(pair[0][0]) < max_length]
    if not pairs:
        raise NlpkitError(f"every pair's prompt fills data.max_length={max_length}; raise it")
    average = stage in ("orpo", "simpo")  # their rewards are beta x the mean log-prob per reply token

    def logps(model) -> tuple[list, list]:
        return tuple(reply_logps(model, [pair[k] for pair in pairs], tokenizer.pad_token_id, bf16, average,
                                 batch_size) for k in (0, 1))

    policy.eval()
    scores = logps(policy)
    if average:
        return implicit_pair_metrics(scores, None, beta)
    if reference is None:
        with policy.disable_adapter():  # LoRA: the reference is the policy without its adapter
            return implicit_pair_metrics(scores, logps(policy), beta)
    return implicit_pair_metrics(scores, logps(reference.eval()), beta)


def reply_logps(model, ids: list[tuple[list[int], list[int]]], pad_id: int, bf16: bool, average: bool,
                batch_size: int) -> list[float]:
    """log pi(reply | prompt) of (prompt ids, reply ids) pairs, summed over the reply's tokens (mean with average)."""
    import torch

    from nlpkit.ppo.core import logprobs_from_logits

    device, out = next(model.parameters()).device, []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        tokens, mask, reply = (torch.zeros(len(chunk), width, dtype=torch.long) for _ in range(3))
        for i, (p, r) in enumerate(chunk):
            tokens[i] = torch.tensor(p + r + [pad_id] * (width - len(p) - len(r)))
            mask[i, :len(p) + len(r)], reply[i, len(p):len(p) + len(r)] = 1, 1
        tokens, mask, reply = tokens.to(device), mask.to(device), reply[:, 1:].to(device)
        with torch.inference_mode(), autocast(bf16, device):
            logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
        per_token = logprobs_from_logits(logits, tokens[:, 1:], 1.0) * reply
        total = per_token.sum(-1)
        out += (total / reply.sum(-1).clamp(min=1) if average else total).tolist()
    return out


def preference_run_metrics(run: runs.Run, data_spec: str, mirror: str | None) -> dict:
    """`nlpkit eval` of a dpo/kto/orpo/simpo run on a preference file: the keys of its metrics.json."""
    rows = open_source(data_spec, "test", "--data", mirror)
    chats, _ = preference_chats(rows)
    cfg = run.recipe
    # A full fine-tune's reference is the model it started from; an adapter's is its run with the adapter disabled.
    reference = None if run.has_adapter or run.stage in ("orpo", "simpo") else \
        place(runs.load_start(cfg.model, run.auto_class, frozen=True))
    return preference_metrics(runs.load_model(run), runs.load_tokenizer(run), chats, stage=run.stage,
                              beta=(cfg.dpo or DPOSection()).beta, max_length=run.task["max_length"],
                              batch_size=cfg.train.per_device_eval_batch_size, bf16=run.task["bf16"],
                              reference=reference)
