"""Two processes through accelerate (gloo on CPU) train exactly like one process with the same global batch.

docs/stack-notes.md traps 4 and 5: `accelerate launch --cpu` would silently run one process (the presets use MULTI_GPU, which
is gloo on a CPU), and Trainer doubles sequence-classification loss under DDP unless told not to average tokens.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from test_classify import CASES, make_recipe
from test_dpo import dpo_recipe
from test_reward import reward_recipe
from test_sft import sft_recipe

# fp32 and no dropout: then one process and two differ only in the order of float sums (about 1e-7), and
# the random sampler gives both the same global batches (bf16 rounding would differ with the batch split).
# lr 1e-4: Adam turns a gradient that is all float noise into a step of up to lr, the same in both runs' worst
# weight; at 1e-3 that reached 1.3e-5 in one run of six steps, at 1e-4 it stays ten times under the 1e-5 bar.
SAME_ARITHMETIC = {"bf16": False, "train_sampling_strategy": "random", "max_steps": 6, "logging_steps": 1,
                   "warmup_steps": 0, "save_strategy": "no", "learning_rate": 1e-4}


@pytest.fixture(scope="module")
def bert_without_dropout(tiny_bert, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert-no-dropout")
    shutil.copytree(tiny_bert, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def recipe_for(stage, tmp_path, model) -> str:
    if stage == "classify":
        recipe, rows, global_batch = make_recipe(tmp_path, model, CASES["multiclass"][0]), 32, 16
    elif stage == "reward":
        recipe, rows, global_batch = reward_recipe(tmp_path, model), 64, 16
    elif stage == "dpo":  # full fine-tuning: the reference is a frozen copy in each process
        recipe, rows, global_batch = dpo_recipe(tmp_path, model, peft=False), 8, 4
    else:
        recipe, rows, global_batch = sft_recipe(tmp_path, model), 10, 10  # the fixture's 10 rows each step
    raw = yaml.safe_load(Path(recipe).read_text())
    raw["data"]["max_train_samples"] = rows  # a multiple of the global batch: every step's batch is full
    raw["train"].pop("per_device_train_batch_size")  # the global batch decides the per-device one
    raw["train"] |= {"global_batch_size": global_batch, **SAME_ARITHMETIC}
    Path(recipe).write_text(yaml.safe_dump(raw))
    return recipe


def finetune(recipe, out: Path, *flags):
    command = [sys.executable, "-m", "nlpkit", "finetune", recipe, "--output-dir", str(out), "--json", *flags]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


MODELS = {"classify": "bert_without_dropout", "sft": "tiny_llama", "reward": "toy_llama", "dpo": "tiny_llama"}
PER_PROCESS = {"classify": 8, "sft": 5, "reward": 8, "dpo": 2}  # with 2 processes; 1 process takes twice as many


@pytest.mark.parametrize("stage", MODELS)
def test_two_processes_equal_one_with_the_same_global_batch(stage, tmp_path, request):
    model = request.getfixturevalue(MODELS[stage])
    recipe = recipe_for(stage, tmp_path, model)
    one, two = finetune(recipe, tmp_path / "one"), finetune(recipe, tmp_path / "two", "--num-processes", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    per_process = PER_PROCESS[stage]
    assert f"{2 * per_process} per process x 1 process(es)" in one.stderr
    assert f"{per_process} per process x 2 process(es)" in two.stderr

    single, double = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(single) >= 5 and single.keys() == double.keys()
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=1e-4), step
    weights = "model.safetensors"
    a, b = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    base = load_file(model / weights)  # and the weights did move: the equality is not that of untrained copies
    moved = [(a[k] - base[k.removeprefix("bert.")]).abs().max().item() for k in a if k.removeprefix("bert.") in base]
    assert moved and max(moved) > 1e-4

    # One result on stdout, one copy of every file, and the metrics of the whole eval set.
    result = json.loads(two.stdout)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    if stage == "classify":  # predictions gathered from both processes, the padding duplicate dropped
        for key in ("eval_accuracy", "eval_f1_macro"):
            assert result[key] == pytest.approx(json.loads(one.stdout)[key]), key
        assert result["eval_confusion_matrix"] == json.loads(one.stdout)["eval_confusion_matrix"]  # counts


def test_bad_data_in_launched_processes_is_one_line_and_exit_2(tmp_path, bert_without_dropout):
    recipe = make_recipe(tmp_path, bert_without_dropout, {"train": "missing.csv"})
    result = finetune(recipe, tmp_path / "run", "--num-processes", "2")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.csv" in errors[0]
    assert not (tmp_path / "run" / "nlpkit_run.json").exists()

