"""`nlpkit sample` on the tiny chat Llama and MBPP-shaped problems: both files written, every score kept, pairs that
`stage: reward` trains on and that carry DPO's columns; `nlpkit eval` on a code set; code SFT rows and prompts."""

import json

import pytest
import yaml

from conftest import CODE_PROBLEMS, write_code_problems
from helpers import nlpkit
from nlpkit.data import (open_source, preference_chats, preference_columns, prompt_column, prompt_records, read_file,
                         sft_dataset)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pair_user(pair: dict) -> str:
    """The user turn inside a pair's ChatML-rendered prompt."""
    return pair["prompt"].split("\n", 1)[1].split("<|im_end|>")[0]


def test_code_rows_render_the_problem_with_one_assert_and_keep_every_test(tmp_path):
    rows = open_source(str(write_code_problems(tmp_path / "code.jsonl")), "train", "data.train")
    records = prompt_records(rows, prompt_column(rows, None))
    assert records[0] == {"prompt": "Write a function to add two numbers.\nYour code should pass this test:\n"
                                    "assert add(2, 3) == 5",
                          "test_list": CODE_PROBLEMS[0]["test_list"], "test_setup_code": ""}
    assert all("add(1, 1)" not in r["prompt"] for r in records)  # the other asserts stay hidden
    sft = sft_dataset(rows, "code", None, 0)  # SFT: the same prompt, the reference solution fenced
    assert sft[0]["prompt"] == [{"role": "user", "content": records[0]["prompt"]}]
    solution = "```python\ndef add(a, b):\n    return a + b\n```"
    assert sft[0]["completion"] == [{"role": "assistant", "content": solution}]


def test_sample_writes_scored_samples_and_pairs_that_train_a_reward_model(tmp_path, tiny_llama):
    length = tmp_path / "length.py"  # a score that differs between completions of a random model
    length.write_text("def chars(prompts, completions, **_):\n    return [len(c) / 100 for c in completions]\n")
    out = tmp_path / "samples"
    result = nlpkit("sample", tiny_llama, "--data", write_code_problems(tmp_path / "code.jsonl"), "--num-samples", 4,
                    "--reward", "compiles", "--reward", "unit_test_fraction", "--reward", f"{length}:chars",
                    "--max-new-tokens", 12, "--output-dir", out, "--json")
    assert result.code == 0, result.stderr
    summary = result.json()
    samples, pairs = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "pairs.jsonl")
    assert summary["prompts"] == 3 and summary["samples"] == len(samples) == 12
    assert summary["pairs"] == len(pairs) >= 1
    assert summary["pass@1"] == 0.0 and summary["pass@4"] == 0.0  # a random model passes nothing
    for row in samples:
        assert set(row["scores"]) == {"compiles", "unit_test_fraction", f"{length}:chars"}
        assert row["total"] == pytest.approx(sum(row["scores"].values()))
        assert row["scores"][f"{length}:chars"] == pytest.approx(len(row["completion"]) / 100)
        assert row["passed"] is False
    totals = {(s["prompt"], s["completion"]): s["total"] for s in samples}
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}  # DPO's columns and the reward stage's
        assert pair["prompt"].startswith("<|im_start|>user\nWrite a function")  # as the policy saw it
        assert pair["prompt"].endswith("<|im_start|>assistant\n")
        user = pair_user(pair)
        group = {c: t for (p, c), t in totals.items() if p == user}
        assert group[pair["chosen"]] == max(group.values()) > min(group.values()) == group[pair["rejected"]]
    assert len(preference_columns(read_file(out / "pairs.jsonl"))["chosen"]) == len(pairs)

    recipe = tmp_path / "reward.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "reward", "model": {"name": str(tiny_llama)},
        "data": {"train": str(out / "pairs.jsonl"), "eval": str(out / "pairs.jsonl"), "max_length": 96},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_strategy": "no",
                  "bf16": False},
    }))
    trained = nlpkit("finetune", recipe, "--output-dir", tmp_path / "rm", "--json")
    assert trained.code == 0, trained.stderr
    assert trained.json()["eval_pairs"] == len(pairs)
    assert (tmp_path / "rm" / "model.safetensors").is_file()

    # DPO reads the rendered prompt back as the chat it was (rendered once more by the template, not wrapped twice)
    chats, _ = preference_chats(read_file(out / "pairs.jsonl"))
    assert chats["prompt"][0] == [{"role": "user", "content": pair_user(pairs[0])}]
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "dpo", "model": {"name": str(tiny_llama)},
        "data": {"train": str(out / "pairs.jsonl"), "eval": str(out / "pairs.jsonl"), "max_length": 96},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_strategy": "no",
                  "bf16": False},
    }))
    trained = nlpkit("finetune", recipe, "--output-dir", tmp_path / "dpo", "--json")
    assert trained.code == 0, trained.stderr
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


def test_eval_on_a_code_set_reports_pass_rates(tmp_path, tiny_llama):
    data = write_code_problems(tmp_path / "code.jsonl")
    result = nlpkit("eval", tiny_llama, "--data", data, "--num-samples", 3, "--limit", 2, "--json")
    assert result.code == 0, result.stderr
    metrics = result.json()
    assert metrics["eval_problems"] == 2 and metrics["eval_samples_per_problem"] == 3
    assert metrics["eval_pass@1"] == metrics["eval_pass@3"] == metrics["eval_pass@1_sampled"] == 0.0


def test_prompt_batches_give_a_far_longer_prompt_a_call_of_its_own():
    from nlpkit.sample import prompt_batches

    lengths = [30, 10, 1800, 20, 25, 12]
    # per_call ends the first call at 4 prompts; then 2 x 1800 padded tokens > 400
    assert prompt_batches(lengths, per_call=4, max_padded=400) == [[1, 5, 3, 4], [0], [2]]
    # the budget alone: 4 x 25 <= 100 < 5 x 30, and 1800 > 100 goes alone
    assert prompt_batches(lengths, per_call=8, max_padded=100) == [[1, 5, 3, 4], [0], [2]]
    assert prompt_batches(lengths, per_call=8, max_padded=6 * 1800) == [[1, 5, 3, 4, 0, 2]]


def test_generate_batches_shortest_prompts_first_and_answers_in_the_prompts_order(tiny_llama):
    """A stand-in model answers each row with the row itself, so every answer shows which prompt it was given."""
    import torch
    from transformers import AutoTokenizer

    from nlpkit.sample import generate

    class Echo(torch.nn.Module):
        device = torch.device("cpu")
        batches: list[int] = []

        def generate(self, input_ids, attention_mask, num_return_sequences=1, **_):
            self.batches.append(int(attention_mask.sum(1).max()))
            return torch.cat([input_ids, input_ids], dim=1).repeat_interleave(num_return_sequences, dim=0)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = None  # the prompt is the whole row
    prompts = ["a much longer prompt than the others, with many more words in it", "short", "a middling prompt",
               "tiny", "a prompt of some length"]
    echo = Echo()
    answers = generate(echo, tokenizer, prompts, 2, 8, 1.0, False, batch_size=4)
    said = [tokenizer.decode(tokenizer(p)["input_ids"], skip_special_tokens=True).strip() for p in prompts]
    assert answers == [[text, text] for text in said]
    assert echo.batches == sorted(echo.batches) and len(echo.batches) == 3  # 2 prompts x 2 samples a call
