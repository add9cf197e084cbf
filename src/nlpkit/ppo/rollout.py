"""One PPO rollout: generate responses to a batch of prompts, score them, and turn the scores into per-token
advantages and returns, all without gradients [4]. The math is core.py's; this is the plumbing around the models.

The scorer is any object with score(batch, completions) -> list[float] (nlpkit.scoring.Scorer); the value model is a
sequence classifier whose score head is read at every response position [24].
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from nlpkit.config import PPOSection
from nlpkit.models import autocast
from nlpkit.ppo import core


def make_rollout(policy, reference, value_model, tokenizer, scorer, batch: list[dict], seeds: list[int],
                 ppo: PPOSection, stop_ids: list[int], bf16: bool, device, all_sum=None, kl_coef: float | None = None,
                 reward_bias: float = 0.0) -> dict:
    """Generate, score and compute advantages for one batch of prompts, all without gradients [4]. seeds: one per
    episode (episode_seeds), so that an episode's response does not depend on how the batch is split over processes.
    With several processes, all_sum makes the whitening statistics those of every process's episodes together.
    kl_coef: the adaptive controller's current value (default ppo.kl_coef); reward_bias: the reference's mean score
    [10, 13]."""
    kl_coef = ppo.kl_coef if kl_coef is None else kl_coef
    queries = encode_prompts(tokenizer, [record["prompt"] for record in batch], device)
    context = queries.shape[1]
    policy.eval()
    with torch.no_grad(), autocast(bf16, device):
        responses = sample(policy, tokenizer, queries, seeds, ppo, stop_ids)
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
    completions = decode_responses(tokenizer, queries, responses, ends, has_stop)
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


def sample(policy, tokenizer, queries, seeds: list[int], ppo: PPOSection, stop_ids: list[int]):
    """Sample exactly up to response_length tokens from softmax(logits / T) [4], each row's noise from its own seed
    (GumbelSampler): an episode gets the same tokens whichever batch or process samples it. Sequences that stop early
    are padded to the full window, so every rollout has the same shape."""
    mask = (queries != tokenizer.pad_token_id).long()
    # Every other logits processor off: the tokens must come from exactly softmax(logits / T), the distribution the
    # log-probs are computed under [5]; a model's own repetition penalty would break that, and do_sample=False keeps
    # its generation_config's top_k/top_p out. The argmax of the noisy scores (one beam) is the sample.
    sampler = GumbelSampler(seeds, ppo.temperature, queries.shape[1])
    out = policy.generate(input_ids=queries, attention_mask=mask, max_new_tokens=ppo.response_length, do_sample=False,
                          num_beams=1, logits_processor=LogitsProcessorList([sampler]), repetition_penalty=1.0,
                          no_repeat_ngram_size=0, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    responses = out[:, queries.shape[1]:]
    missing = ppo.response_length - responses.shape[1]
    if missing:
        responses = torch.cat([responses, responses.new_full((len(responses), missing), tokenizer.pad_token_id)], 1)
    return responses


def episode_seeds(seed: int, update: int, indices) -> list[int]:
    """One sampling seed per episode, from the run's seed, the update and the episode's index in the update's whole
    batch: not from the process that samples it, so 1 and N processes (and a resumed run) draw the same tokens."""
    return [mixed_seed(seed, update, index) for index in indices]


def mixed_seed(*parts: int) -> int:
    """A generator seed from several integers; Python hashes a tuple of ints the same in every process and run."""
    return hash(parts) % 2**63


class GumbelSampler(LogitsProcessor):
    """Sampling by the Gumbel-max trick: scores / T + Gumbel noise, whose argmax is an exact sample from
    softmax(scores / T). Row i's noise at each generated position comes from a generator seeded by (seeds[i],
    position) alone, so a row's tokens do not depend on the other rows of its batch."""

    def __init__(self, seeds: list[int], temperature: float, prompt_length: int):
        self.seeds, self.temperature, self.prompt_length = seeds, temperature, prompt_length

    def __call__(self, input_ids, scores):
        position = input_ids.shape[1] - self.prompt_length
        generator = torch.Generator(device=scores.device)
        uniform = torch.stack([torch.rand(scores.shape[1], generator=generator.manual_seed(mixed_seed(seed, position)),
                                          device=scores.device) for seed in self.seeds])
        return scores / self.temperature - torch.log(-torch.log(uniform))  # -log(-log U) ~ Gumbel(0, 1)


def forward_logprobs(model, query_responses, context: int, responses, pad_id: int, temperature: float):
    """Log-probs of the response tokens at temperature T, as in the rollout and in training [5, 6]."""
    logits = core.response_logits(model, query_responses, context, pad_id)
    return core.logprobs_from_logits(logits, responses, temperature)


def forward_values(value_model, query_responses, context: int, pad_id: int):
    """V(state before each response token): the value head at positions context-1 .. -2 [24]."""
    ids, mask, positions = core.left_padded_inputs(query_responses, pad_id, response_start=context)
    return core.per_token_scores(value_model, ids, mask, positions)[:, context - 1:-1]


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


def decode_responses(tokenizer, queries, responses, ends, has_stop) -> list[str]:
    """Each response's text up to (not including) its stop token, as it continues its prompt: decoded together with
    the prompt, less the prompt's own text, so the space between them is kept. The reward model reads prompt + this
    text, as it read prompt + reply in training (a response decoded alone loses that space with word-level and
    WordPiece tokenizers)."""
    texts = []
    for query, row, end, stopped in zip(queries.tolist(), responses.tolist(), ends.tolist(), has_stop.tolist()):
        prompt = [t for t in query if t != tokenizer.pad_token_id]  # left padding
        kept = row[:end] if stopped else row[:end + 1]
        head = tokenizer.decode(prompt, skip_special_tokens=True)
        full = tokenizer.decode(prompt + kept, skip_special_tokens=True)
        texts.append(full[len(head):] if full.startswith(head) else tokenizer.decode(kept, skip_special_tokens=True))
    return texts
