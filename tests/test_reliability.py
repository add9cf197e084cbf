"""Nothing is lost: resume after kill -9, committed checkpoints, the watchdog (exit 3), secrets, full disks."""

import errno
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from helpers import nlpkit
from nlpkit import report, runs
from nlpkit.training import MARKER
from test_classify import CASES, make_recipe
from test_sft import sft_recipe

STEPS = 100  # long enough that the kill below always lands mid-run, however busy the cores are


def classify_recipe(tmp_path, tiny_bert, **train):
    train = {"max_steps": STEPS, "logging_steps": 1, "save_strategy": "steps", "save_steps": 10,
             "eval_strategy": "no", **train}
    return make_recipe(tmp_path, tiny_bert, CASES["multiclass"][0], **train)


def recipes(kind, tmp_path, model):
    if kind == "classify":
        return classify_recipe(tmp_path, model)
    return sft_recipe(tmp_path, model, max_steps=STEPS, logging_steps=1, save_strategy="steps", save_steps=10)


def log_steps(out: Path) -> list[int]:
    path = out / "train_log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def last_loss(out: Path) -> float:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line][-1]["loss"]


def finetune(recipe, out: Path, *flags) -> subprocess.Popen:
    """`nlpkit finetune` in a process of its own, stdout and stderr to files beside `out`.

    Every run of the test goes through here with the same thread count, so all do the same float arithmetic."""
    command = [sys.executable, "-m", "nlpkit", "finetune", recipe, "--output-dir", str(out), *flags]
    stdout, stderr = (open(out.with_suffix(suffix), "a") for suffix in (".out", ".err"))
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=stdout, stderr=stderr)


@pytest.mark.parametrize("kind", ["classify", "sft"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(kind, tmp_path, request):
    model = request.getfixturevalue("tiny_bert" if kind == "classify" else "tiny_llama")
    recipe = recipes(kind, tmp_path, model)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert finetune(recipe, reference, "--json").wait() == 0, reference.with_suffix(".err").read_text()

    process = finetune(recipe, killed)
    kill_at = random.Random().randint(11, 50)  # a random step after the first checkpoint (step 10)
    while not log_steps(killed) or log_steps(killed)[-1] < kill_at:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = log_steps(killed)[-1]
    assert killed_at < STEPS and not (killed / runs.MANIFEST).exists()

    assert finetune(recipe, killed, "--resume", "--json").wait() == 0, killed.with_suffix(".err").read_text()
    assert "resuming from" in killed.with_suffix(".err").read_text()
    got = json.loads(killed.with_suffix(".out").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        if key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-3), (key, killed_at)
    assert last_loss(killed) == pytest.approx(last_loss(reference), abs=1e-3)
    assert log_steps(killed) == log_steps(reference)  # every step once: nothing lost, nothing duplicated
    weights = "adapter_model.safetensors" if (reference / "adapter_model.safetensors").exists() else "model.safetensors"
    before, after = load_file(reference / weights), load_file(killed / weights)
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-3


def test_resume_never_picks_a_partial_checkpoint(tmp_path, tiny_bert):
    out = tmp_path / "run"
    recipe = classify_recipe(tmp_path, tiny_bert, max_steps=20)
    assert nlpkit("finetune", recipe, "--output-dir", out).code == 0
    (out / runs.MANIFEST).unlink()  # as if killed after the last checkpoint
    partial = out / "checkpoints" / "checkpoint-25"  # as if killed while Trainer wrote it: no commit marker
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    result = nlpkit("finetune", recipe, "--output-dir", out, "--resume")
    assert result.code == 0, result.stderr
    assert "checkpoint-20 (step 20)" in result.stderr and not partial.exists()


def test_only_committed_checkpoints_are_kept_and_each_loads(tmp_path, tiny_bert):
    out = tmp_path / "run"
    assert nlpkit("finetune", classify_recipe(tmp_path, tiny_bert, max_steps=30, save_total_limit=2),
                  "--output-dir", out).code == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["checkpoint-20", "checkpoint-30"]
    for name in kept:
        assert json.loads((out / "checkpoints" / name / MARKER).read_text())["step"] == int(name.split("-")[1])
        BertForSequenceClassification.from_pretrained(out / "checkpoints" / name)


@pytest.mark.parametrize("change, allowed", [("train.learning_rate=0.002", False), ("train.logging_steps=7", True)])
def test_resume_refuses_a_changed_recipe(change, allowed, tmp_path, tiny_bert):
    out = tmp_path / "run"
    recipe = classify_recipe(tmp_path, tiny_bert, max_steps=10)
    assert nlpkit("finetune", recipe, "--output-dir", out).code == 0
    done = nlpkit("finetune", recipe, "--output-dir", out, "--resume")
    assert done.code == 2 and "holds a finished run" in done.stderr
    (out / runs.MANIFEST).unlink()
    result = nlpkit("finetune", recipe, change, "--output-dir", out, "--resume")
    if allowed:
        assert result.code == 0, result.stderr
    else:
        assert result.code == 2 and "recipe changed since checkpoint-10 (train.learning_rate)" in result.stderr


def test_resume_without_a_checkpoint_is_bad_input(tmp_path, tiny_bert):
    result = nlpkit("finetune", classify_recipe(tmp_path, tiny_bert), "--output-dir", tmp_path / "none", "--resume")
    assert result.code == 2 and "no complete checkpoint" in result.stderr


def poison_forward(monkeypatch, from_call: int, value: float):
    """Make BERT's training loss `value` (NaN, 0) from the `from_call`-th forward on: a fault injected mid-run."""
    forward, calls = BertForSequenceClassification.forward, {"n": 0}

    @functools.wraps(forward)  # Trainer keeps only the dataset columns forward's signature names
    def patched(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] >= from_call:
            output.loss = output.loss * value
        return output

    monkeypatch.setattr(BertForSequenceClassification, "forward", patched)


def test_nan_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert, monkeypatch):
    poison_forward(monkeypatch, from_call=13, value=float("nan"))
    out = tmp_path / "run"
    result = nlpkit("finetune", classify_recipe(tmp_path, tiny_bert), "--output-dir", out)
    assert result.code == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "gradient norm is nan at step 13" in line and "lower train.learning_rate" in line
    assert "checkpoints/checkpoint-10" in line and "Traceback" not in result.stderr
    assert not (out / runs.MANIFEST).exists()
    saved = load_file(out / "checkpoints" / "checkpoint-10" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10"]


def test_loss_stuck_at_zero_stops_or_warns(tmp_path, tiny_bert, monkeypatch):
    poison_forward(monkeypatch, from_call=1, value=0.0)
    recipe = classify_recipe(tmp_path, tiny_bert, max_steps=6)
    stopped = nlpkit("finetune", recipe, "--output-dir", tmp_path / "stop")
    assert stopped.code == 3 and "exactly 0 for 3 logs (step 3)" in stopped.stderr
    warned = nlpkit("finetune", recipe, "train.watchdog=warn", "--output-dir", tmp_path / "warn")
    assert warned.code == 0 and "warning: training loss has been exactly 0" in warned.stderr


def test_secrets_never_reach_the_run_directory(tmp_path, tiny_bert, monkeypatch):
    secret = "hf_Secret1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "run"
    recipe = classify_recipe(tmp_path, tiny_bert, max_steps=10)
    argv = ["finetune", recipe, f"train.extra.hub_token={secret}", "--output-dir", out]
    monkeypatch.setattr(sys, "argv", ["nlpkit", *map(str, argv)])  # what the manifest records as the command
    result = nlpkit(*argv)
    assert result.code == 0, result.stderr
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".txt", ".yaml")]
    assert any(p.name == runs.MANIFEST for p in written) and any(p.name == MARKER for p in written)
    assert not [p for p in written if secret in p.read_text()]
    manifest = json.loads((out / runs.MANIFEST).read_text())
    assert manifest["config"]["train"]["extra"]["hub_token"] == "***"
    assert "train.extra.hub_token=***" in manifest["command"]


def test_a_full_disk_is_one_line_and_nothing_is_complete(tmp_path, tiny_bert, monkeypatch):
    write_json = report.write_json

    def disk_full(path, payload):
        if path.name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, payload)

    monkeypatch.setattr(report, "write_json", disk_full)
    out = tmp_path / "run"
    result = nlpkit("finetune", classify_recipe(tmp_path, tiny_bert, max_steps=5), "--output-dir", out)
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "metrics.json failed: No space left on device; free space" in result.stderr
    assert not (out / runs.MANIFEST).exists()


def test_remote_code_models_need_trust_remote_code(tmp_path, tiny_bert):
    custom = tmp_path / "custom"
    custom.mkdir()
    config = json.loads((tiny_bert / "config.json").read_text())
    config |= {"model_type": "my-bert", "auto_map": {"AutoModelForSequenceClassification": "modeling.MyModel"}}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (custom / name).write_text((tiny_bert / name).read_text())
    result = nlpkit("finetune", make_recipe(tmp_path, custom, CASES["multiclass"][0]), "--output-dir", tmp_path / "r")
    assert result.code == 2, result.stderr
    assert "model.trust_remote_code" in result.stderr and "remote code ran" not in result.stderr

