"""The preference family (stages dpo, kto, orpo, simpo) on a tiny chat Llama: the loss at the start, what trains and
what stays frozen, row rendering, KTO's rows, the implicit-reward pair metrics and `nlpkit eval` on a run."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import FIXTURES
from helpers import nlpkit
from nlpkit.data import chat_reply_ids, kto_chats, preference_chats, read_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_pairs(path: Path, implicit: bool = False) -> Path:
    """HH-style rows from the instruction fixture: the right answer is chosen, a refusal rejected."""
    with path.open("w") as f:
        for row in read_file(FIXTURES / "instructions.jsonl").rows:
            prompt = f"\n\nHuman: {row['instruction']}\n\nAssistant:"
            chosen, rejected = " " + row["response"], " I cannot help with that."
            pair = {"chosen": prompt + chosen, "rejected": prompt + rejected} if implicit else \
                {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(pair) + "\n")
    return path


def dpo_recipe(tmp_path, model, stage="dpo", peft=True, steps=4, **sections) -> str:
    pairs = str(write_pairs(tmp_path / "pairs.jsonl"))
    raw = {
        "stage": stage,
        "model": {"name": str(model)},
        "data": {"train": pairs, "eval": pairs, "max_length": 64},
        "train": {"max_steps": steps, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                  "learning_rate": 1e-3, "logging_steps": 1, "warmup_steps": 0, "save_strategy": "no",
                  "bf16": False},
        **({"peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}} if peft else {}),
        **sections,
    }
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_dpo_with_lora_starts_at_log2_trains_only_the_adapter_and_eval_reproduces_its_metrics(tmp_path, tiny_llama):
    run = tmp_path / "run"
    result = nlpkit("finetune", dpo_recipe(tmp_path, tiny_llama), "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    metrics = result.json()
    steps = [row for row in log(run) if "loss" in row]
    # B = 0: the policy is the reference, every implicit reward is 0 and the sigmoid loss is -log sigmoid(0) = log 2
    assert steps[0]["step"] == 1 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert name in steps[-1], name
    assert steps[-1]["loss"] < math.log(2)
    assert list((run / "tensorboard").iterdir())
    # every LoRA weight moved (A from its init, B from 0); the base is not saved in the run and was not touched
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all(w.abs().max() > 0 for name, w in adapter.items() if "lora_B" in name)
    assert (run / "config.json").is_file() and (run / "tokenizer_config.json").is_file()
    # held-out pairs: the trained policy prefers the right answers by its implicit reward
    assert metrics["eval_pairs"] == 10 and metrics["eval_pair_accuracy"] >= 0.9 and metrics["eval_mean_margin"] > 0
    evaluated = nlpkit("eval", run, "--data", tmp_path / "pairs.jsonl", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json() == pytest.approx({k: metrics[k] for k in evaluated.json()}, abs=1e-5)
    chat = nlpkit("chat", run, "--prompt", "What is the capital of France?")
    assert chat.code == 0, chat.stderr


def test_dpo_answers_the_prompts_ppo_holds_out_before_and_after(tmp_path, tiny_llama, toy_reward_model):
    from nlpkit.data import split_prompts

    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as f:
        for i, row in enumerate(read_file(FIXTURES / "instructions.jsonl").rows):
            f.write(json.dumps({"prompt": row["instruction"], "source": "hh" if i % 2 else "dolly"}) + "\n")
    held = {"eval_prompts": 4, "prompts": str(prompts), "score_with": str(toy_reward_model), "response_length": 8}
    run = tmp_path / "run"
    result = nlpkit("finetune", dpo_recipe(tmp_path, tiny_llama, dpo=held), "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    metrics = result.json()
    answers = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    rows = read_file(prompts)
    assert [a["prompt"] for a in answers] == [r["prompt"] for r in split_prompts(rows, "prompt", 4, 42, None)[1]]
    assert metrics["eval_prompts"] == 4 and set(metrics["eval_refusal_rate_by_source_after"]) <= {"hh", "dolly"}
    assert metrics["eval_score_gain"] == pytest.approx(metrics["eval_score_after"] - metrics["eval_score_before"])
    assert all(a["length_after"] <= 8 and a["kl_after"] >= 0 for a in answers) and metrics["eval_kl_after"] > 0
    assert "held-out answers to 4 prompts: score" in result.stderr


def test_dpo_eval_prompts_need_a_prompt_file(tmp_path, tiny_llama):
    result = nlpkit("finetune", dpo_recipe(tmp_path, tiny_llama, dpo={"eval_prompts": 4}), "--output-dir",
                    tmp_path / "run")
    assert result.code == 2 and "dpo.eval_prompts needs dpo.prompts" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    missing = {"eval_prompts": 4, "prompts": "ppo_prompts", "score_with": str(tmp_path / "no-rm")}
    result = nlpkit("finetune", dpo_recipe(tmp_path, tiny_llama, dpo=missing), "--output-dir", tmp_path / "run")
    assert result.code == 2 and f"dpo.score_with {tmp_path / 'no-rm'}: not a reward model directory" in result.stderr
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_full_dpo_changes_every_weight_and_leaves_the_reference_as_it_was(tmp_path, tiny_llama, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlpkit.config import DPOSection
    from nlpkit.recipes import validate_recipe
    from nlpkit.stages import dpo

    recipe = validate_recipe(yaml.safe_load(Path(dpo_recipe(tmp_path, tiny_llama, peft=False)).read_text()))
    seen = {}
    real_deepcopy = dpo.copy.deepcopy

    def keep_reference(thing, memo=None):  # the stage's frozen copy (the outermost call), kept to look at later
        copied = real_deepcopy(thing, memo)
        if memo is None and isinstance(thing, torch.nn.Module):  # the stage's call (copy recurses with a memo)
            seen["reference"] = copied
        return copied

    monkeypatch.setattr(dpo.copy, "deepcopy", keep_reference)
    run = tmp_path / "run"
    run.mkdir()
    metrics = dpo.run(recipe, run)
    monkeypatch.undo()
    base = load_file(tiny_llama / "model.safetensors")
    tuned = load_file(run / "model.safetensors")
    unchanged = [name for name, w in base.items() if name in tuned and torch.equal(tuned[name], w)]
    assert not unchanged, unchanged
    reference = seen["reference"].state_dict()
    assert all(torch.equal(reference[name], w) for name, w in base.items()), "the reference moved"
    assert not any(p.requires_grad for p in seen["reference"].parameters())
    assert metrics["eval_pair_accuracy"] >= 0.9
    # the end-of-run metrics equal the pure function on log-probs computed by hand
    from nlpkit.scoring import implicit_pair_metrics, reply_logps

    tokenizer = AutoTokenizer.from_pretrained(run)
    chats, _ = preference_chats(read_file(tmp_path / "pairs.jsonl"))
    pairs = [[chat_reply_ids(tokenizer, p, r, 64) for p, r in zip(chats["prompt"], chats[side])]
             for side in ("chosen", "rejected")]
    logps = [tuple(reply_logps(m, side, tokenizer.pad_token_id, False, False, 4) for side in pairs)
             for m in (AutoModelForCausalLM.from_pretrained(run), AutoModelForCausalLM.from_pretrained(tiny_llama))]
    expected = implicit_pair_metrics(logps[0], logps[1], DPOSection().beta)
    assert metrics["eval_mean_margin"] == pytest.approx(expected["eval_mean_margin"], abs=1e-4)


def test_implicit_reward_metrics_are_a_pure_function_of_log_probs():
    from nlpkit.scoring import implicit_pair_metrics

    policy, reference = ([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0]), ([-1.5, -2.0, -2.0], [-1.5, -2.0, -2.0])
    metrics = implicit_pair_metrics(policy, reference, beta=0.5)  # rewards (0.25, 0, -0.5) vs (-0.25, 0, 0.5)
    assert metrics == pytest.approx({"eval_pair_accuracy": 1 / 3, "eval_mean_margin": (0.5 + 0 - 1.0) / 3,
                                     "eval_pairs": 3})
    assert implicit_pair_metrics(policy, None, beta=1.0)["eval_pair_accuracy"] == pytest.approx(1 / 3)  # ties lose


def test_implicit_and_explicit_rows_render_the_same_pairs(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    explicit, dropped = preference_chats(read_file(write_pairs(tmp_path / "explicit.jsonl")))
    implicit, _ = preference_chats(read_file(write_pairs(tmp_path / "implicit.jsonl", implicit=True)))
    assert explicit == implicit and dropped == 0
    assert explicit["prompt"][0] == [{"role": "user", "content": "What is the capital of France?"}]
    assert explicit["chosen"][0] == [{"role": "assistant", "content": "Paris is the capital of France."}]
    rendered = tokenizer.apply_chat_template(explicit["prompt"][0] + explicit["chosen"][0], tokenize=False)
    assert rendered == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
                        "Paris is the capital of France.<|im_end|>\n")
    prompt_ids, reply_ids = chat_reply_ids(tokenizer, explicit["prompt"][0], explicit["chosen"][0], 128)
    assert tokenizer.decode(reply_ids) == "Paris is the capital of France.<|im_end|>\n"
    # a multi-turn transcript keeps its turns; plain implicit texts split at a word where they part
    rows = tmp_path / "turns.jsonl"
    rows.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: No.",
                                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: Sure"})
                    + "\n" + json.dumps({"chosen": "The sky is blue", "rejected": "The sky is bleak"}) + "\n")
    chats, _ = preference_chats(read_file(rows))
    assert [m["role"] for m in chats["prompt"][0]] == ["user", "assistant", "user"]
    assert chats["prompt"][1] == [{"role": "user", "content": "The sky is"}]
    assert chats["chosen"][1] == [{"role": "assistant", "content": "blue"}]


def test_kto_takes_unpaired_rows_and_splits_pairs_into_good_and_bad(tmp_path, tiny_llama):
    pairs = read_file(write_pairs(tmp_path / "pairs.jsonl"))
    split = kto_chats(pairs)
    assert split["label"] == [True] * 10 + [False] * 10
    assert split["completion"][0] == [{"role": "assistant", "content": "Paris is the capital of France."}]
    assert split["completion"][10] == [{"role": "assistant", "content": "I cannot help with that."}]
    assert split["prompt"][0] == split["prompt"][10]
    unpaired = tmp_path / "kto.jsonl"
    with unpaired.open("w") as f:
        for i, row in enumerate(read_file(FIXTURES / "instructions.jsonl").rows):
            good = i % 2 == 0
            f.write(json.dumps({"prompt": row["instruction"], "completion": row["response"] if good else "No.",
                                "label": good}) + "\n")
    assert kto_chats(read_file(unpaired))["label"] == [i % 2 == 0 for i in range(10)]
    run = tmp_path / "run"
    recipe = dpo_recipe(tmp_path, tiny_llama, stage="kto", data={"train": str(unpaired), "eval": str(tmp_path / "pairs.jsonl"),
                                                                 "max_length": 64})
    result = nlpkit("finetune", recipe, "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    steps = [row for row in log(run) if "loss" in row]
    assert len(steps) == 4 and all(math.isfinite(row["loss"]) for row in steps)
    assert "kl" in steps[0] and "rewards/chosen" in "".join(steps[0])
    assert result.json()["eval_pairs"] == 10


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_orpo_and_simpo_train_a_few_steps(stage, tmp_path, tiny_llama):
    # One pair's prompt fills max_length: trl's experimental trainers would keep it with an empty reply (nan loss).
    long_pair = {"prompt": "\n\nHuman: " + "tell me a story " * 40 + "\n\nAssistant:", "chosen": " Yes.",
                 "rejected": " No."}
    recipe = dpo_recipe(tmp_path, tiny_llama, stage=stage)
    train = tmp_path / "train.jsonl"
    train.write_text((tmp_path / "pairs.jsonl").read_text() + json.dumps(long_pair) + "\n")
    run = tmp_path / "run"
    result = nlpkit("finetune", recipe, f"data.train={train}", "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    assert "1 of 11 rows dropped: their prompt fills data.max_length=64" in result.stderr
    steps = [row for row in log(run) if "loss" in row]
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]
    assert "rewards/margins" in steps[0]
    metrics = result.json()
    assert metrics["eval_pairs"] == 10 and 0 <= metrics["eval_pair_accuracy"] <= 1
    evaluated = nlpkit("eval", run, "--data", tmp_path / "pairs.jsonl", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json()["eval_mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-5)


def test_dpo_from_an_sft_run_merges_its_adapter_into_the_base(tmp_path, tiny_llama):
    from test_sft import sft_recipe

    sft = tmp_path / "sft"
    assert nlpkit("finetune", sft_recipe(tmp_path, tiny_llama, max_steps=2), "--lora", "--output-dir", sft).code == 0
    run = tmp_path / "dpo"
    result = nlpkit("finetune", dpo_recipe(tmp_path, sft, steps=2), "--output-dir", run, "--json")
    assert result.code == 0, result.stderr
    first = next(row for row in log(run) if "loss" in row)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the sft model itself
    chat = nlpkit("chat", run, "--prompt", "Name a primary color.")
    assert chat.code == 0, chat.stderr


def test_loss_type_names_are_trls():
    import dataclasses

    import trl
    from trl.experimental.cpo import CPOConfig

    from nlpkit.config import LOSS_TYPES

    source = Path(trl.trainer.dpo_trainer.__file__).read_text()
    named = re.search(r"Should be one of \[(.*?)\]", source.replace('"\n', "").replace(' "', ""), re.S).group(1)
    assert set(LOSS_TYPES["dpo"]) == {name.strip(" '\"") for name in named.split(",")}
    kto = Path(trl.trainer.kto_trainer.__file__).read_text()
    assert all(f'loss_type == "{name}"' in kto for name in LOSS_TYPES["kto"])
    cpo = next(f for f in dataclasses.fields(CPOConfig) if f.name == "loss_type")
    assert set(LOSS_TYPES["simpo"]) <= set(cpo.metadata["choices"])
