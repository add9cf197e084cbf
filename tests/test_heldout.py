"""Held-out answers (nlpkit/heldout.py): the refusal detector, the summary's arithmetic, and the KL to the reference
on a tiny Llama with a LoRA adapter."""

import pytest

from nlpkit.heldout import answer, is_refusal, summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "As an AI, I don't have personal opinions.",
    "As a chatbot, I don't have the ability to browse the internet.", "I cannot provide medical advice.",
    "I\u2019m not able to do that.", "It is not appropriate to share someone's address.", "I am unable to answer."])
def test_refusals_and_disclaimers_are_found(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Paris is the capital of France.", "Drink water, sleep well and walk every day.",
    "Cannes is a city in France.", "The scanner can read barcodes.", "Sorry seems to be the hardest word, Elton sang."])
def test_ordinary_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_summary_means_and_refusals_per_source():
    rows = [{"prompt": "a", "source": "hh", "answer": "I cannot.", "score": 1.0, "stopped": True, "length": 4,
             "refusal": True, "kl": 2.0},
            {"prompt": "b", "source": "dolly", "answer": "Paris.", "score": 3.0, "stopped": False, "length": 12,
             "refusal": False, "kl": 6.0},
            {"prompt": "c", "source": "dolly", "answer": "I'm sorry.", "score": -1.0, "stopped": True, "length": 4,
             "refusal": True, "kl": 1.0}]
    got = summary(rows)
    assert got["eval_score"] == pytest.approx(1.0) and got["eval_eos_rate"] == pytest.approx(2 / 3)
    assert got["eval_length"] == pytest.approx(20 / 3) and got["eval_refusal_rate"] == pytest.approx(2 / 3)
    assert got["eval_refusal_rate_by_source"] == {"dolly": 0.5, "hh": 1.0}
    assert got["eval_kl"] == pytest.approx(3.0) and got["eval_kl_per_token"] == pytest.approx(9 / 20)
    assert "eval_score" not in summary([{**row, "score": None} for row in rows])


def test_kl_is_zero_at_the_reference_and_positive_once_the_adapter_moves(tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.padding_side = "left"
    assert tokenizer.pad_token != tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    prompts = [{"prompt": "What is the capital of France?"}, {"prompt": "Name a color."}]
    kwargs = dict(max_new_tokens=6, stop_ids=[tokenizer.eos_token_id], bf16=False, device="cpu")
    at_start = answer(policy, tokenizer, prompts, kl_to="adapter", **kwargs)  # LoRA's B = 0: the reference itself
    assert [row["kl"] for row in at_start] == [0.0, 0.0]
    assert all(row["length"] <= 6 and row["score"] is None and "answer" in row for row in at_start)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    moved = answer(policy, tokenizer, prompts, kl_to="adapter", **kwargs)
    assert all(row["kl"] > 0 for row in moved)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)  # the same, as its own model
    separate = answer(policy, tokenizer, prompts, kl_to=reference, **kwargs)
    assert [row["kl"] for row in separate] == pytest.approx([row["kl"] for row in moved], rel=1e-4)
