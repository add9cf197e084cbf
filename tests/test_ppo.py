"""The PPO math, one test per checkable item of docs/ppo-checklist.md (item numbers in brackets).

Pure functions on hand-made tensors here; the items that need a model (ratio = 1 at the first minibatch, reference
unchanged, KL = 0 at step 0 with LoRA, dropout off) run the real loop in tests/test_rlhf.py.
"""

import math

import pytest
import torch

from nlpkit.ppo import core

EOS, PAD = 5, 0


def test_end_indices_and_everything_after_the_first_stop_token_is_padding():  # [7, 8, 15]
    responses = torch.tensor([[7, 8, EOS, 9, EOS],   # stops at 2; what follows is garbage
                              [7, 7, 7, 7, 7],       # no EOS: the last generated token ends it
                              [EOS, 3, 3, 3, 3],     # stops at once
                              [4, 9, 6, 2, EOS]])    # EOS at the very last slot
    ends, has_stop = core.end_indices(responses, [EOS])
    assert ends.tolist() == [2, 4, 0, 4]
    assert has_stop.tolist() == [True, False, True, True]
    assert core.padding_mask(ends, 5).tolist() == [[False, False, False, True, True], [False] * 5,
                                                   [False, True, True, True, True], [False] * 5]


def test_any_configured_stop_token_counts_not_just_eos():  # [9]: TRL #3750
    responses = torch.tensor([[1, 11, 2], [1, 2, 3]])
    ends, has_stop = core.end_indices(responses, [EOS, 11])
    assert ends.tolist() == [1, 2] and has_stop.tolist() == [True, False]


def test_left_padding_masks_prompt_pads_and_keeps_positions():  # [2]
    ids = torch.tensor([[PAD, PAD, 4, 6, 8, PAD],
                        [3, 4, 6, 7, 9, 2]])
    clean, mask, positions = core.left_padded_inputs(ids, PAD, response_start=4)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]  # a sampled pad in the response stays visible
    assert positions.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]  # first real token is position 0
    assert clean[0, :2].tolist() == [0, 0] and clean[0, 2:5].tolist() == [4, 6, 8]


def test_logprobs_use_the_sampling_temperature():  # [5]
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    tokens = torch.tensor([[0]])
    at_t = core.logprobs_from_logits(logits, tokens, temperature=0.5)
    expected = torch.log_softmax(logits / 0.5, -1)[0, 0, 0]
    assert torch.allclose(at_t[0, 0], expected)
    assert not torch.allclose(at_t, core.logprobs_from_logits(logits, tokens, temperature=1.0))


def test_missing_eos_penalty_shifts_exactly_the_responses_without_eos():  # [9]
    scores = torch.tensor([0.5, -1.0, 2.0])
    has_stop = torch.tensor([True, False, False])
    assert core.apply_missing_eos_penalty(scores, has_stop, 1.5).tolist() == pytest.approx([0.5, -2.5, 0.5])
    assert core.apply_missing_eos_penalty(scores, has_stop, None).tolist() == scores.tolist()


def test_k1_is_the_log_ratio_and_k3_is_never_negative():  # [12]
    # Worked by hand: p = 1/2 where the reference gives 1/4 is k1 = ln 2 = 0.693147, the other way round -ln 2 (k1
    # may be negative); k3 = e^r - 1 - r with r = ln(ref/p) is 1/2 - 1 + ln 2 = 0.193147 and 2 - 1 - ln 2 = 0.306853.
    logp, ref = torch.tensor([0.5, 0.25, 0.3]).log(), torch.tensor([0.25, 0.5, 0.3]).log()
    assert core.kl_k1(logp, ref).tolist() == pytest.approx([0.693147, -0.693147, 0.0], abs=1e-6)
    assert core.kl_k3(logp, ref).tolist() == pytest.approx([0.193147, 0.306853, 0.0], abs=1e-6)
    # Both are unbiased: averaged over tokens drawn from p = (1/2, 1/2), each is KL(p || ref) with ref = (1/4, 3/4),
    # 1/2 ln 2 + 1/2 ln(2/3) = 0.143841.
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    for estimator in (core.kl_k1, core.kl_k3):
        assert (p * estimator(p.log(), q.log())).sum().item() == pytest.approx(0.143841, abs=1e-6)
    torch.manual_seed(0)
    logp, ref = torch.randn(64, 9) * 3, torch.randn(64, 9) * 3
    assert (core.kl_k3(logp, ref) >= 0).all()
    assert torch.allclose(core.kl_k3(logp, logp), torch.zeros_like(logp))


def test_score_sits_at_the_eos_with_the_kl_penalty():  # [13, 14]
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.1, 0.2, 0.3]])
    scores = torch.tensor([2.0, -1.0])
    ends = torch.tensor([2, 3])
    rewards = core.shaped_rewards(scores, kl, 0.05, ends)
    for i in range(2):
        assert rewards[i, ends[i]] == pytest.approx(scores[i].item() - 0.05 * kl[i, ends[i]].item())
    assert rewards[0, 3] == 0.0  # past the end: nothing (TRL's quirk would put the score here)
    assert rewards[0, 1] == pytest.approx(-0.05 * 0.2)


def test_reward_is_read_at_the_last_real_token():  # [8]
    per_token = torch.tensor([[0.1, 0.2, 0.9, 7.0], [0.3, 0.4, 0.5, 0.6]])  # 7.0 sits on a pad position
    assert core.scores_at(per_token, torch.tensor([2, 3])).tolist() == pytest.approx([0.9, 0.6])


def test_gae_against_a_hand_worked_three_token_example():  # [17]
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends at token 1
    advantages, returns = core.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 1: d2 = 2 - 1.5 = 0.5; d1 = 0 + 1.5 - 1 = 0.5, A1 = 0.5 + 0.5*0.5; d0 = 1 + 1 - 0.5 = 1.5, A0 = 1.5 + .5*.75
    assert advantages[0].tolist() == pytest.approx([1.875, 0.75, 0.5])
    assert returns[0].tolist() == pytest.approx([2.375, 1.75, 2.0])
    # Row 2: V past the end is 0, so d1 = 2 + 0 - 1 = 1 (the 9.0 and 7.0 after the end are ignored)
    assert advantages[1].tolist() == pytest.approx([2.0, 1.0, 0.0])
    assert returns[1].tolist() == pytest.approx([2.5, 2.0, 0.0])


def test_gae_with_gamma_below_one():  # [17]
    advantages, _ = core.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2), 0.9, 1.0)
    assert advantages[0].tolist() == pytest.approx([0.9, 1.0])


def test_whitening_uses_only_valid_tokens_and_can_keep_the_mean():  # [16, 18]
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]).bool()
    white = core.masked_whiten(values, mask)
    assert core.masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert core.masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-5)
    kept = core.masked_whiten(values, mask, shift_mean=False)
    assert core.masked_mean(kept, mask).item() == pytest.approx(3.5, abs=1e-5)  # the mean of 1..6 survives


def test_policy_loss_clips_and_reports_fractions_in_range():  # [19, 27]
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.0, 0.5, -0.5], [0.1, -0.1, 2.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    loss, stats = core.policy_loss(new, old, adv, mask, cliprange=0.2)
    # by hand, max(-A r, -A clip(r, 0.8, 1.2)) per valid token: -1; -1.2 (r = e^0.5 clipped); 0.8 (r = e^-0.5
    # clipped); -e^0.1; e^-0.1 (both inside the range)
    assert loss.item() == pytest.approx((-1 - 1.2 + 0.8 - math.exp(0.1) + math.exp(-0.1)) / 5)
    # clipped term larger: token (0,1) ratio 1.65 with A>0 and (0,2) ratio 0.61 with A<0; (1,2) is masked
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert 0 <= stats["clipfrac"] <= 1
    _, same_stats = core.policy_loss(old, old, adv, mask, 0.2)
    assert same_stats["ratio"].item() == 1.0 and same_stats["approxkl"].item() == 0.0
    assert same_stats["clipfrac"].item() == 0.0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():  # [20]
    old_v = torch.tensor([[0.0, 0.0]])
    new_v = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, stats = core.value_loss(new_v, old_v, returns, torch.ones(1, 2).bool(), cliprange_value=0.2)
    # token 0: unclipped 0, clipped (0.2-1)^2 = 0.64 -> 0.64; token 1: both (0.1-1)^2 = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_losses_of_the_parts_of_a_minibatch_add_up_to_its_token_mean():  # [21]
    """With the whole minibatch's token count as normaliser, parts holding different numbers of valid tokens (the
    micro-batches, or the processes' shares) add up to the loss of the whole; their own means would not."""
    torch.manual_seed(0)
    new, old, adv, values, returns = (torch.randn(4, 3) for _ in range(5))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]]).bool()
    halves = (slice(0, 2), slice(2, 4))  # 4 and 3 valid tokens

    def loss(rows, normaliser=None):
        return (core.policy_loss(new[rows], old[rows], adv[rows], mask[rows], 0.2, normaliser)[0]
                + core.value_loss(values[rows], old[rows], returns[rows], mask[rows], 0.2, normaliser)[0])

    whole = loss(slice(None)).item()
    assert sum(loss(rows, mask.sum()) for rows in halves).item() == pytest.approx(whole, abs=1e-6)
    assert (sum(loss(rows) for rows in halves) / 2).item() != pytest.approx(whole, abs=1e-3)


def test_minibatches_are_a_fresh_permutation_per_epoch_and_must_divide():  # [21]
    generator = torch.Generator().manual_seed(0)
    first = core.minibatches(8, 2, generator)
    second = core.minibatches(8, 2, generator)
    assert [len(m) for m in first] == [4, 4]
    assert sorted(torch.cat(first).tolist()) == list(range(8))
    assert torch.cat(first).tolist() != torch.cat(second).tolist()
    with pytest.raises(ValueError, match="not divisible"):
        core.minibatches(10, 3, generator)


def test_num_updates_rounds_up():  # [23]
    assert core.num_updates(100, 16) == 7 and core.num_updates(96, 16) == 6



def test_whitening_over_processes_equals_whitening_the_whole_batch():
    """[16, 18] with all_sum, each process's half is whitened with the statistics of the whole batch. Two threads
    stand in for two processes; all_sum is an all-reduce between them."""
    import threading

    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    halves = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    slots, barrier, results = [None, None], threading.Barrier(2), [None, None]

    def worker(rank):
        def all_sum(tensor):
            slots[rank] = tensor
            barrier.wait()  # both contributions are in
            total = slots[0] + slots[1]
            barrier.wait()  # both have read them before either writes the next
            return total

        results[rank] = core.masked_whiten(*halves[rank], all_sum=all_sum)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    whole = core.masked_whiten(values, mask)
    assert torch.allclose(torch.cat(results)[mask], whole[mask], atol=1e-5)
    assert not torch.allclose(core.masked_whiten(*halves[0])[mask[:3]], whole[:3][mask[:3]], atol=1e-3)


def test_statistics_of_processes_combine_into_the_whole_batch():
    per_process = [{"objective/scores": 1.0, "val/num_eos_tokens": 3, "policy/first_minibatch_ratio_max_dev": 1e-6},
                   {"objective/scores": 3.0, "val/num_eos_tokens": 5, "policy/first_minibatch_ratio_max_dev": 4e-6}]
    assert core.combine_process_stats(per_process) == pytest.approx({
        "objective/scores": 2.0, "val/num_eos_tokens": 8, "policy/first_minibatch_ratio_max_dev": 4e-6})


def test_scores_are_shifted_by_the_reference_bias_then_clipped():  # [10]
    reference_scores = torch.tensor([1.0, 3.0, 2.0, 6.0])
    bias = reference_scores.mean().item()
    centred = core.normalized_scores(reference_scores, bias, None)
    assert centred.mean().item() == pytest.approx(0.0)  # the reference's responses average 0
    assert centred.tolist() == pytest.approx([-2.0, 0.0, -1.0, 3.0])
    assert core.normalized_scores(reference_scores, bias, 1.5).tolist() == pytest.approx([-1.5, 0.0, -1.0, 1.5])
    assert torch.equal(core.normalized_scores(reference_scores, 0.0, None), reference_scores)  # off: unchanged


def test_adaptive_kl_coefficient_follows_the_target_with_a_clipped_error():  # [13] Ziegler et al.
    # KL 1.5x the target: error +0.5, clipped to +0.2; 16 episodes of a 1000-episode horizon
    assert core.adaptive_kl_coef(0.1, kl=9.0, target=6.0, horizon=1000, n_steps=16) == pytest.approx(
        0.1 * (1 + 0.2 * 16 / 1000))
    # KL 5 % below the target: error -0.05, inside the clip
    assert core.adaptive_kl_coef(0.1, kl=5.7, target=6.0, horizon=1000, n_steps=16) == pytest.approx(
        0.1 * (1 - 0.05 * 16 / 1000))
    assert core.adaptive_kl_coef(0.1, kl=0.0, target=6.0, horizon=16, n_steps=16) == pytest.approx(0.08)  # -0.2
    assert core.adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=16, n_steps=16) == pytest.approx(0.1)  # on target
