"""The PPO math for language models, as small pure functions on tensors (docs/ppo-checklist.md items in brackets).

Shapes: B episodes, T response tokens. `ends[i]` is the index (in the response) of the last valid token of episode i:
its first stop token (EOS) when it has one, else the last generated token. Everything after `ends[i]` is padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INVALID_LOGPROB = 1.0  # sentinel in both log-prob tensors after the end (TRL's value): ratio there is exp(0) = 1 [15]


# ---------------------------------------------------------------------------------------------- tokens


def left_padded_inputs(ids: torch.Tensor, pad_id: int, response_start: int | None = None):
    """(input_ids, attention_mask, position_ids) for a left-padded batch [2].

    The prompt part is masked by `ids != pad`; position ids are the exclusive cumulative sum of the mask, so left
    padding does not shift positions; pad positions get id 0 (a valid embedding row). Response tokens (from
    `response_start` on) are always attended: a tiny or unlucky policy can sample the pad id itself, and hiding it
    would change what the model saw when it sampled the next token.
    """
    mask = ids != pad_id
    if response_start is not None:
        mask[:, response_start:] = True
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    return ids.masked_fill(~mask, 0), mask.long(), position_ids


def end_indices(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ends, has_stop): the first stop token's index, else T-1; and whether a stop token was generated [7, 8]."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    has_stop = is_stop.any(1)
    first = torch.where(has_stop, is_stop.float().argmax(1), torch.full_like(has_stop, responses.shape[1] - 1,
                                                                              dtype=torch.long))
    return first.long(), has_stop


def padding_mask(ends: torch.Tensor, length: int) -> torch.Tensor:
    """True after each episode's end: the positions no loss, value or advantage may touch [15]."""
    return torch.arange(length, device=ends.device)[None, :] > ends[:, None]


# ---------------------------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / T): the distribution the tokens were sampled from [5]. Computing it at
    T = 1 while sampling at T < 1 makes the first ratio differ from 1 and the KL meaningless."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logits(model, query_responses: torch.Tensor, context_len: int, pad_id: int) -> torch.Tensor:
    """Logits that score the response tokens: position t predicts token t+1, so slice context_len-1 : -1 [6].
    Only those positions go through the LM head (logits_to_keep): the vocabulary-wide logits are most of a step's
    memory, and the prompt's are never used."""
    ids, mask, positions = left_padded_inputs(query_responses, pad_id, response_start=context_len)
    kept = query_responses.shape[1] - context_len + 1  # positions context_len-1 .. end
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=kept).logits
    return logits[:, :-1]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Categorical entropy per position."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def per_token_scores(seq_cls_model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The `score` head of a sequence classifier applied at every position: [B, L].

    A reward model reads this at the last real token; a value model reads it at every response position [8, 24].
    """
    if hasattr(seq_cls_model, "get_base_model"):  # a PeftModel (not imported: peft is heavy and often unused); its
        seq_cls_model = seq_cls_model.get_base_model()  # LoRA layers and saved head live in the base model's modules
    backbone = getattr(seq_cls_model, seq_cls_model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return seq_cls_model.score(hidden).squeeze(-1).float()


def scores_at(per_token: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """The reward-model score of each sequence, read at its last real token (the EOS when there is one) [8, 14]."""
    return per_token.gather(1, last_index[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------- rewards


def apply_missing_eos_penalty(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of responses with no stop token (TRL's form of the EOS trick) [9]. Without
    it a policy learns to avoid stopping, to fit more rewarded words in the window."""
    if penalty is None:
        return scores
    return torch.where(has_stop, scores, scores - penalty)


def normalized_scores(scores: torch.Tensor, bias: float, clip: float | None) -> torch.Tensor:
    """score - bias, then clipped to [-clip, clip] when clip is set [10]. With bias = the mean score of responses
    the reference (SFT) policy sampled, the reference's own responses average 0 (N+'s reward-model normalisation):
    scores are centred where training starts, whatever offset the reward model learned. Clipping (OpenRLHF: 10)
    keeps a reward-model outlier from dominating a batch."""
    scores = scores - bias
    return scores if clip is None else scores.clamp(-clip, clip)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """The next KL coefficient of Ziegler et al.'s adaptive controller [13]: it grows while the measured KL (nats
    per response) is above target and shrinks while below. The error is clipped to +-0.2, so a single batch moves the
    coefficient by at most 0.2 * n_steps / horizon (n_steps: episodes in the update)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp: unbiased per-token KL estimate, may be negative; the one to put in the reward [12]."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(r) - 1 - r with r = ref_logp - logp: unbiased and >= 0 for every token (since e^r >= 1 + r) [12]."""
    logr = ref_logprobs - logprobs
    return logr.exp() - 1 - logr


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, ends: torch.Tensor) -> torch.Tensor:
    """rewards = -kl_coef * kl at every response token, plus the score at the last valid token [13, 14].

    The score goes AT the end (the EOS), as N+ and OpenRLHF do, not one past it (the TRL quirk, issues #1893/#3750):
    one past the EOS is a padding position whose value is zeroed, so GAE there credits the wrong state.
    `kl` must already be zero after the end.
    """
    rewards = -kl_coef * kl
    rewards[torch.arange(len(scores), device=scores.device), ends] += scores
    return rewards


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim) if dim is not None else (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked elements (as TRL's masked_var)."""
    mean = masked_mean(values, mask)
    centered = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    return centered * count / (count - 1) if count > 1 else centered


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """Scale to unit variance over the valid tokens; shift_mean=False keeps the mean (for rewards: a constant
    reward shift would otherwise vanish and change what the value model learns) [16, 18].

    all_sum sums a tensor over processes (an all-reduce); with it the mean and variance are those of the whole batch
    across processes, as one process holding all of it would compute. Without it: this process's batch."""
    if all_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        weights = mask.to(values.dtype)
        count = all_sum(weights.sum())
        mean = all_sum((values * weights).sum()) / count
        var = all_sum((((values - mean) ** 2) * weights).sum()) / count
        var = var * count / (count - 1) if count > 1 else var
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation, backwards over the response [17].

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  V and A past the end are 0.
    Returns (advantages, returns = advantages + values), both zero after the end; returns are taken before any
    whitening of the advantages, so the value model regresses on real returns.
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------- losses


def token_sum(values: torch.Tensor, mask: torch.Tensor, normaliser=None) -> torch.Tensor:
    """The sum of values over the valid tokens, divided by normaliser: by default their count, which makes it their
    mean. A part of a minibatch (a micro-batch, a process's share) divides by the minibatch's count instead, so that
    the parts' losses add up to the minibatch's token mean [21]."""
    return (values * mask.to(values.dtype)).sum() / (mask.sum() if normaliser is None else normaliser)


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float,
                normaliser=None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), summed over valid tokens and divided by
    normaliser (default: their count, a mean) [19]."""
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = token_sum(torch.maximum(unclipped, clipped), mask, normaliser)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(logratio ** 2, mask),  # low-variance KL(old || new) estimate
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(new_values, old_values, returns, mask, cliprange_value: float,
               normaliser=None) -> tuple[torch.Tensor, dict]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2), summed over valid tokens and divided by normaliser
    (default: their count, a mean) [20]. Clipping keeps the value model near the values the advantages were computed
    with."""
    clipped_values = old_values + (new_values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (new_values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * token_sum(torch.maximum(unclipped_loss, clipped_loss), mask, normaliser)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------- schedule


def exact_div(a: int, b: int, what: str) -> int:
    """Batch sizes must divide exactly [21]; the caller's config check names the keys."""
    if b <= 0 or a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def minibatches(batch_size: int, num_mini_batches: int, generator: torch.Generator):
    """Index sets of one PPO epoch: a fresh permutation, split into num_mini_batches equal parts [21]."""
    size = exact_div(batch_size, num_mini_batches, "batch_size / num_mini_batches")
    order = torch.randperm(batch_size, generator=generator)
    return [order[i:i + size] for i in range(0, batch_size, size)]


def num_updates(total_episodes: int, batch_size: int) -> int:
    """ceil(total_episodes / batch_size) [23]."""
    return math.ceil(total_episodes / batch_size)


def combine_process_stats(per_process: list[dict]) -> dict:
    """One update's statistics from every process (equal batches): means of means are the whole batch's means;
    the EOS count is a sum; the first-minibatch ratio check keeps its worst process [5]."""
    combined = {key: sum(stats[key] for stats in per_process) / len(per_process) for key in per_process[0]}
    combined["val/num_eos_tokens"] = sum(stats["val/num_eos_tokens"] for stats in per_process)
    deviations = [stats["policy/first_minibatch_ratio_max_dev"] for stats in per_process]
    combined["policy/first_minibatch_ratio_max_dev"] = max(deviations)
    return combined
