"""One PPO update on a rollout: num_ppo_epochs passes of num_mini_batches clipped policy + value steps [19, 20, 21],
with one optimiser over policy and value [25]. Returns the update's statistics as trl's PPOTrainer named them.
"""

from __future__ import annotations

from nlpkit.config import PPOSection
from nlpkit.distributed import average_gradients
from nlpkit.models import autocast
from nlpkit.ppo import core
from nlpkit.ppo.rollout import forward_values


def train_on_rollout(policy, value_model, optimizer, rollout: dict, ppo: PPOSection, accumulation: int,
                     generator, bf16: bool, all_sum=None, world: int = 1) -> dict:
    """num_ppo_epochs x num_mini_batches clipped policy + value steps on one rollout [19, 20, 21]. With `world`
    processes, all_sum (a sum over them) averages the gradients before each step, as DDP would, and counts the
    minibatch's valid tokens over every process."""
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
            minibatch = minibatch.to(device)
            normaliser = minibatch_normaliser(~rollout["pad_mask"][minibatch], all_sum, world)
            for micro in minibatch.chunk(accumulation):  # gradient accumulation inside a minibatch [21]
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
                                                     ppo.cliprange, normaliser)
                vf_loss, vf_stats = core.value_loss(vpred, pick["values"], pick["returns"], valid, ppo.cliprange_value,
                                                    normaliser)
                (pg_loss + ppo.vf_coef * vf_loss).backward()  # [20]
                with torch.no_grad():
                    to_micro_mean = normaliser / valid.sum()  # the losses are logged as this micro-batch's means
                    ratio = (new_logprobs - pick["logprobs"]).exp()[valid]
                    if first_ratio_dev is None:  # [5] before any optimiser step this must be 1 (test: +-1e-3)
                        first_ratio_dev = (ratio - 1).abs().max().item()
                    entropy = core.masked_mean(core.entropy_from_logits(logits.detach() / ppo.temperature), valid)
                    step = {"policy/approxkl_avg": pg_stats["approxkl"], "policy/clipfrac_avg": pg_stats["clipfrac"],
                            "val/clipfrac_avg": vf_stats["clipfrac"], "loss/policy_avg": pg_loss * to_micro_mean,
                            "loss/value_avg": vf_loss * to_micro_mean, "policy/entropy_avg": entropy,
                            "val/ratio": ratio.mean(), "val/ratio_var": ratio.var() if ratio.numel() > 1 else
                            torch.tensor(0.0)}
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if all_sum is not None:
                average_gradients(params, all_sum, world)
            if ppo.max_grad_norm is not None:  # policy and value together, as one optimiser over both [25]
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, ppo.max_grad_norm)))  # the norm before
            optimizer.step()
    stats = {key: value / count for key, value in sums.items()}
    stats["policy/first_minibatch_ratio_max_dev"] = first_ratio_dev
    if norms:
        stats["grad_norm"] = sum(norms) / len(norms)  # before clipping, as transformers' Trainer logs it
    return stats


def minibatch_normaliser(valid, all_sum, world: int):
    """What each process divides its summed token losses by: the minibatch's valid tokens over every process, over
    `world`. The micro-batches' gradients add up, average_gradients divides their sum over processes by `world`, and
    the step takes the gradient of the token mean of the whole minibatch, as one process holding all of it would; a
    mean per process (or per micro-batch) would weigh a token by how many valid tokens share its process."""
    tokens = valid.sum().float()
    return tokens if all_sum is None else all_sum(tokens) / world
