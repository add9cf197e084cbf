"""stage: reward on the toy preferences: a one-output classifier, pad != EOS, pair accuracy, `nlpkit eval` on the run."""

import json

import pytest
import yaml

from conftest import write_toy_preferences
from helpers import nlpkit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reward_recipe(tmp_path, model, steps=40, **sections) -> str:
    raw = {
        "stage": "reward",
        "model": {"name": str(model)},
        "data": {"train": str(write_toy_preferences(tmp_path / "pref_train.jsonl", 400, seed=1)),
                 "eval": str(write_toy_preferences(tmp_path / "pref_test.jsonl", 100, seed=2)), "max_length": 32},
        "train": {"max_steps": steps, "per_device_train_batch_size": 32, "learning_rate": 1e-3, "warmup_steps": 0,
                  "logging_steps": 10, "save_strategy": "no"},
        **sections,
    }
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_reward_model_learns_preferences_and_eval_reproduces_it(tmp_path, toy_llama):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    run = tmp_path / "rm"
    result = nlpkit("finetune", reward_recipe(tmp_path, toy_llama), "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    metrics = result.json()
    assert metrics["eval_pairs"] == 100
    assert metrics["eval_pair_accuracy"] >= 0.8  # chance is 0.5; the positive-word signal is strong
    assert metrics["eval_mean_margin"] > 0
    config = AutoConfig.from_pretrained(run)
    assert config.num_labels == 1 and config.architectures == ["LlamaForSequenceClassification"]
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    # every weight that exists in the base moved (the score head is new)
    base = load_file(toy_llama / "model.safetensors")
    tuned = load_file(run / "model.safetensors")
    unchanged = [name for name, w in base.items() if name in tuned and tuned[name].equal(w)]
    assert not unchanged
    # `nlpkit eval` on the same file gives the same numbers as the end of training
    evaluated = nlpkit("eval", run, "--data", tmp_path / "pref_test.jsonl", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json() == pytest.approx({k: metrics[k] for k in evaluated.json()})
    assert json.loads((run / "metrics.json").read_text())["eval_pair_accuracy"] == metrics["eval_pair_accuracy"]


def test_pair_scores_are_read_at_the_eos(tmp_path, toy_llama):
    """The score of a text is the classifier's output at its appended EOS, not at the padding after it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nlpkit.scoring import score_ids
    from nlpkit.data import pair_ids

    tokenizer = AutoTokenizer.from_pretrained(toy_llama)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(toy_llama, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id).eval()
    texts = ["the cat sits good", "a dog"]
    ids = pair_ids(tokenizer, {"chosen": texts, "rejected": texts}, max_length=32)["chosen_ids"]
    batched = score_ids(model, ids, tokenizer.pad_token_id, bf16=False)
    for text, score in zip(texts, batched):
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")["input_ids"]
        assert ids[0, -1] == tokenizer.eos_token_id
        alone = model(input_ids=ids).logits[0, 0].item()  # no padding at all: the last token is the EOS
        assert score == pytest.approx(alone, abs=1e-5)


def test_long_pairs_keep_their_end_and_are_never_dropped(tmp_path, toy_llama):
    from transformers import AutoTokenizer

    from nlpkit.data import pair_ids

    tokenizer = AutoTokenizer.from_pretrained(toy_llama)
    prompt = "the cat sits on the mat and the dog sits on the rug and "
    ids = pair_ids(tokenizer, {"prompt": [prompt], "chosen": ["good"], "rejected": ["bad"]}, max_length=4)
    for reply, kept in (("good", ids["chosen_ids"][0]), ("bad", ids["rejected_ids"][0])):
        full = tokenizer(prompt + reply + tokenizer.eos_token)["input_ids"]
        assert len(full) > 4 and kept == full[-4:] and kept[-1] == tokenizer.eos_token_id
    # a run whose max_length is shorter than every pair still trains on all of them
    result = nlpkit("finetune", reward_recipe(tmp_path, toy_llama, steps=2), "data.max_length=6",
                    "--output-dir", tmp_path / "rm", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["train_pairs"] == 400


def test_reward_with_lora_saves_adapter_and_head(tmp_path, toy_llama):
    run = tmp_path / "rm-lora"
    result = nlpkit("finetune", reward_recipe(tmp_path, toy_llama, steps=4), "--lora", "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()
    evaluated = nlpkit("eval", run, "--data", tmp_path / "pref_test.jsonl", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json()["eval_pair_accuracy"] == pytest.approx(result.json()["eval_pair_accuracy"])


def test_reward_on_a_merged_sft_run_loads_again_for_eval(tmp_path, tiny_llama):
    """reward-mbpp's start: a score head and LoRA on a merged sft run (a causal LM directory with a manifest)."""
    from test_sft import sft_recipe

    sft, merged, run = tmp_path / "sft", tmp_path / "sft-merged", tmp_path / "rm"
    assert nlpkit("finetune", sft_recipe(tmp_path, tiny_llama, max_steps=2), "--lora", "--output-dir", sft).code == 0
    assert nlpkit("merge", sft, "--output-dir", merged).code == 0
    result = nlpkit("finetune", reward_recipe(tmp_path, merged, steps=2), "--lora", "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    evaluated = nlpkit("eval", run, "--data", tmp_path / "pref_test.jsonl", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json()["eval_pair_accuracy"] == pytest.approx(result.json()["eval_pair_accuracy"])
    assert evaluated.json()["eval_mean_margin"] == pytest.approx(result.json()["eval_mean_margin"], abs=1e-4)  # bf16
