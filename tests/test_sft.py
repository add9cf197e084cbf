"""Instruction SFT on a tiny Llama: formats, the exact trained-on mask, loud failures, template round trip."""

import json

import pytest
import yaml

from conftest import CHATML, FIXTURES
from helpers import nlpkit
from nlpkit.data import detect_sft_format, read_file, sft_dataset

FORMATS = {  # fixture -> detected format
    "instructions.jsonl": "alpaca",
    "chat.jsonl": "messages",
    "prompt_completion.jsonl": "prompt_completion",
    "plain_text.jsonl": "text",
}


def sft_recipe(tmp_path, model, train="instructions.jsonl", **train_args) -> str:
    recipe = {
        "stage": "sft",
        "model": {"name": str(model)},
        "data": {"train": str(FIXTURES / train), "eval": str(FIXTURES / train), "max_length": 64},
        "train": {"max_steps": 8, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                  "learning_rate": 1e-3, "logging_steps": 2, "warmup_steps": 0, **train_args},
        "generation": {"max_new_tokens": 8, "eos_check_prompts": 4},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("fixture", FORMATS)
def test_each_format_trains_exactly_on_the_answer(fixture, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = read_file(FIXTURES / fixture)
    fmt = detect_sft_format(rows, "auto")
    assert fmt == FORMATS[fixture]
    dataset = sft_dataset(rows, fmt, None, 0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), processing_class=tokenizer,
                         args=SFTConfig(output_dir="/tmp/unused", report_to="none", max_length=128, use_cpu=True),
                         train_dataset=dataset)
    processed = trainer.train_dataset[0]
    if fmt == "text":
        assert processed["labels"] == processed["input_ids"]  # plain LM: every token is trained on
        return
    prompt_ids = tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    ids = processed["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert processed["labels"] == [-100] * len(prompt_ids) + ids[len(prompt_ids):]  # the exact masked positions
    answer = dataset[0]["completion"][0]["content"]
    assert tokenizer.decode(ids[len(prompt_ids):]) == f"{answer}<|im_end|>\n"  # answer + EOS, nothing of the prompt


def test_sft_run_reports_and_round_trips_its_template(tmp_path, tiny_llama):
    out = tmp_path / "run"
    result = nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "generation.no_repeat_ngram_size=3", "--lora",
                    "train.per_device_eval_batch_size=8", "data.max_length=384", "train.bf16=false",
                    "--output-dir", out, "--json")
    assert result.code == 0, result.stderr
    metrics = result.json()
    for key in ("eval_loss_base", "eval_loss", "eos_stop_rate", "train_loss", "train_runtime"):
        assert key in metrics, key
    assert metrics["eos_check_prompts"] == 4 and metrics["eos_stop_rate"] * 4 in (0, 1, 2, 3, 4)
    assert metrics["eval_loss"] < metrics["eval_loss_base"]  # lr 1e-3 on 10 rows: it must learn something
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved.get("chat_template", (out / "chat_template.jinja").read_text() if (out / "chat_template.jinja")
                     .is_file() else None) == CHATML
    assert (out / "generation_config.json").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["no_repeat_ngram_size"] == 3
    from nlpkit.runs import load_causal_lm
    assert load_causal_lm(str(out))[0].generation_config.no_repeat_ngram_size == 3  # what chat and serve generate with

    evaluated = nlpkit("eval", out, "--data", FIXTURES / "instructions.jsonl", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json()["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    base = nlpkit("eval", tiny_llama, "--data", FIXTURES / "instructions.jsonl", "--json")  # batched as the run was
    assert base.code == 0, base.stderr
    assert base.json()["eval_loss"] == pytest.approx(metrics["eval_loss_base"], abs=1e-5)

    # nlpkit chat answers the end-of-run sample prompt as the run did (greedy, the saved generation config).
    chat = nlpkit("chat", out, "--prompt", metrics["sample"]["prompt"], "--max-new-tokens", "8")
    assert chat.code == 0, chat.stderr
    assert chat.stdout.strip() == metrics["sample"]["answer"]  # the streamed answer, on stdout


def test_full_sft_and_merge(tmp_path, tiny_llama):
    out = tmp_path / "run"
    assert nlpkit("finetune", sft_recipe(tmp_path, tiny_llama, train="chat.jsonl"), "--output-dir", out).code == 0
    assert (out / "model.safetensors").is_file()
    lora = tmp_path / "lora"
    assert nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "--lora", "--output-dir", lora).code == 0
    merged = nlpkit("merge", lora, "--json")
    assert merged.code == 0, merged.stderr
    assert merged.json()["max_abs_logits_diff"] <= 1e-3


def test_no_trained_token_is_an_error(tmp_path, tiny_llama):
    recipe = sft_recipe(tmp_path, tiny_llama)
    result = nlpkit("finetune", recipe, "data.max_length=6", "--output-dir", tmp_path / "run")
    assert result.code == 2
    assert "no row has a trained-on token within data.max_length=6" in result.stderr


@pytest.mark.parametrize("line, field", [
    ('{"instruction": "Hi"}', "no 'output' / 'response' / 'completion' / 'answer' field"),
    ('{"instruction": "Hi", "response": 3}', "field 'response' must be text, got int"),
    ('{"instruction": "Hi", "response": ', "not valid JSON"),
])
def test_bad_instruction_rows_name_file_line_and_field(line, field, tmp_path, tiny_llama):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "Name a color.", "response": "Red."}\n' + line + "\n")
    result = nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), f"data.train={data}", "data.eval=null",
                    "--output-dir", tmp_path / "run")
    assert result.code == 2
    assert f"bad.jsonl line 2: {field}" in result.stderr


def test_data_check_renders_and_counts(tiny_llama):
    result = nlpkit("data", "check", FIXTURES / "instructions.jsonl", "--model", tiny_llama, "--max-length", "60",
                    "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["format"] == "alpaca" and report["rows"] == 10
    assert report["example"].endswith("<|im_start|>assistant\n«Paris is the capital of France.<|im_end|>\n»")
    assert report["truncated_rows"] > 0 and report["tokens"]["max"] > 60
    short = nlpkit("data", "check", FIXTURES / "instructions.jsonl", "--model", tiny_llama, "--max-length", "3")
    assert short.code == 2 and "no row has a trained-on token within max_length=3" in short.stderr


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "Hi", "response": ', "bad.jsonl line 2: not valid JSON"),
    ('{"instruction": "Hi"}', "bad.jsonl line 2: no 'output' / 'response'"),
    ('{"instruction": "Hi", "response": ["a"]}', "bad.jsonl line 2: field 'response' must be text, got list"),
])
def test_data_check_names_file_row_and_field(line, message, tmp_path, tiny_llama):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "Name a color.", "response": "Red."}\n' + line + "\n")
    result = nlpkit("data", "check", data, "--model", tiny_llama)
    assert result.code == 2 and message in result.stderr


def test_completion_only_false_trains_on_everything_and_packing_runs(tmp_path, tiny_llama, monkeypatch):
    from nlpkit import training

    fit, trained = training.fit, {}

    def capture(trainer, *args, **kwargs):  # the trainer nlpkit builds, as it builds it
        trained.setdefault("datasets", []).append(trainer.train_dataset)
        return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "fit", capture)
    for flag in ("true", "false"):
        result = nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), f"train.completion_only={flag}",
                        "train.max_steps=1", "--output-dir", tmp_path / flag)
        assert result.code == 0, result.stderr
    answers_only, everything = (dataset[0]["labels"] for dataset in trained["datasets"])
    assert any(label == -100 for label in answers_only)  # the default masks the prompt
    assert all(label != -100 for label in everything)  # the prompt is trained on too

    packed = tmp_path / "packed"
    result = nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "train.packing=true", "--output-dir", packed)
    assert result.code == 0, result.stderr


def test_exact_match_is_measured_before_and_after_on_gsm8k_style_answers(tmp_path, tiny_llama, monkeypatch):
    from nlpkit.stages import sft

    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, bf16, batch_size=16):
        # The first call is the base model, the second the tuned one: 2 of 4 right, then 3 of 4.
        right = 2 if not calls else 3
        calls.append(len(prompts))
        numbers = ("7", "12", "50", "15")  # math.jsonl's first answers, in file order (no max_eval_samples)
        return [f"so #### {n}" if i < right else "#### 0" for i, n in enumerate(numbers)], [True] * len(prompts)

    monkeypatch.setattr(sft, "generate", fake_generate)
    recipe = sft_recipe(tmp_path, tiny_llama, train="math.jsonl")
    result = nlpkit("finetune", recipe, "generation.exact_match_prompts=4", "generation.eos_check_prompts=0",
                    "data.max_length=128", "--output-dir", tmp_path / "run", "--json")
    assert result.code == 0, result.stderr
    metrics = result.json()
    assert (metrics["exact_match_base"], metrics["exact_match"], metrics["exact_match_prompts"]) == (0.5, 0.75, 4)
    assert calls == [4, 4]


def test_exact_match_needs_answers_with_a_final_number(tmp_path, tiny_llama):
    result = nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "generation.exact_match_prompts=4",
                    "--output-dir", tmp_path / "run")
    assert result.code == 2 and "no eval answer ends in '#### <number>'" in result.stderr
