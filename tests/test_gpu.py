"""The GPU check suite (issue 15): every command end to end on CUDA, on the tiny offline models of conftest.py.

    make gpu-check                                              # a one-screen summary; the full log in runs/
    PYTHONPATH=src python -m pytest -m gpu -rA tests/test_gpu.py  # the same tests, plain pytest output

Marked `gpu` (pyproject's addopts leave them out of `make test`) and skipped, with the reason, where torch sees no
CUDA device. Each test asserts what the command produced (exit 0, the files, the metrics) and that the work ran on
the GPU, observed from outside the code under test: the run manifest's device, the CUDA memory the command
allocated (in-process commands: at least a fair share of the model's weight bytes), or the device of the model that
generated or was timed. Every run is a few steps of a tiny model: the file is sized to finish well inside 6 minutes
on one H100/H200 (docs/gpu.md). Only the CLI and the test helpers are used, never nlpkit.stages.* (stage modules
move).

Figures worth reading (the plan estimate against the measured peak, quantized footprints) are printed and, when
$GPU_CHECK_NOTES names a file (make gpu-check sets it), appended there for the summary.
"""

import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FIXTURES, corpus
from helpers import nlpkit
from test_classify import CASES, make_recipe
from test_reliability import classify_recipe, finetune, log_steps
from test_reward import reward_recipe
from test_rlhf import grpo_recipe, read_log, rlhf_recipe
from test_sft import sft_recipe


def _why_skipped() -> str:
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
    return (f"needs CUDA: torch.cuda.is_available() is False here ({build}); run `make gpu-check` on a machine with "
            "an NVIDIA GPU (docs/gpu.md)")


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=_why_skipped())]

MANIFEST = "nlpkit_run.json"
MARKER = "nlpkit_checkpoint.json"  # nlpkit.training.MARKER: a checkpoint is committed once it holds this file
MB = 2**20
SUBPROCESS_TIMEOUT = 240  # seconds; a tiny run takes 10-30 s, most of it imports


# ---------------------------------------------------------------------------------------------- helpers


def note(text: str) -> None:
    """A figure for the summary: printed, and appended to $GPU_CHECK_NOTES where make gpu-check points it."""
    print(text)
    path = os.environ.get("GPU_CHECK_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


@contextlib.contextmanager
def cuda_allocated():
    """The most CUDA memory the block allocated beyond what was held before it, in bytes (box["bytes"])."""
    gc.collect()  # models of earlier tests wait in reference cycles (accelerate's forward wrapper) until collected
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    box = {}
    try:
        yield box
    finally:
        torch.cuda.synchronize()
        box["bytes"] = torch.cuda.max_memory_allocated() - held


def assert_on_cuda(allocated: dict, model_dir: Path, what: str) -> None:
    """The command put (at least a bf16 copy of most of) the model's weights on the GPU: the files hold fp32."""
    need = 0.4 * weight_bytes(model_dir)
    assert allocated["bytes"] >= need, (
        f"{what}: allocated {allocated['bytes'] / MB:.2f} MB of CUDA memory, less than 0.4 x the model's "
        f"{weight_bytes(model_dir) / MB:.2f} MB of weights: the model did not run on the GPU")


def run_nlpkit(*args):
    """The real CLI in this process, with the CUDA memory it allocated: (Result, allocated)."""
    with cuda_allocated() as allocated:
        result = nlpkit(*args)
    assert result.code == 0, f"nlpkit {' '.join(map(str, args))} exited {result.code}:\n{result.stderr[-4000:]}"
    return result, allocated


def assert_complete_cuda_run(out: Path) -> dict:
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert manifest["device"].startswith("cuda"), manifest["device"]
    for name in ("metrics.json", "train_log.jsonl", "README.md"):
        assert (out / name).is_file(), name
    return manifest


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.is_file() else f"({path} not written)"


def write_yaml(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# ---------------------------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, tiny_bert) -> dict:
    """A full fine-tune of the tiny BERT on the binary fixture: finetune's test, then eval and serve use it."""
    tmp = tmp_path_factory.mktemp("gpu-classify")
    out = tmp / "run"
    result, allocated = run_nlpkit("finetune", make_recipe(tmp, tiny_bert, CASES["binary"][0], max_steps=30),
                                   "--output-dir", out, "--json")
    return {"path": out, "metrics": result.json(), "allocated": allocated}


@pytest.fixture(scope="module")
def sft_lora_run(tmp_path_factory, tiny_llama) -> dict:
    """A LoRA SFT run of the tiny Llama: finetune's test, then merge uses it."""
    tmp = tmp_path_factory.mktemp("gpu-sft")
    out = tmp / "run"
    result, allocated = run_nlpkit("finetune", sft_recipe(tmp, tiny_llama), "--lora", "--output-dir", out, "--json")
    return {"path": out, "metrics": result.json(), "allocated": allocated}


@pytest.fixture(scope="module")
def chatty_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama with min_new_tokens=8 in its generation config, so its random weights never answer with an
    immediate EOS: chat and serve must return text, and this makes "non-empty" a fair thing to ask of them."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("chatty-llama")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    config = GenerationConfig.from_pretrained(folder)
    config.min_new_tokens = 8
    config.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- finetune


def test_finetune_classify_full_on_cuda(classify_run, tiny_bert):
    from safetensors.torch import load_file

    out, metrics = classify_run["path"], classify_run["metrics"]
    assert_complete_cuda_run(out)
    assert_on_cuda(classify_run["allocated"], tiny_bert, "finetune classify (full)")
    assert metrics["eval_accuracy"] is not None and 0 <= metrics["eval_accuracy"] <= 1
    assert "train_loss" in metrics and math.isfinite(metrics["train_loss"])
    assert any("loss" in entry for entry in logged(out))
    base, tuned = load_file(tiny_bert / "model.safetensors"), load_file(out / "model.safetensors")
    matched = [k for k in base if f"bert.{k}" in tuned]
    assert len(matched) == len(base), sorted(set(base) - set(matched))
    unchanged = [k for k in matched if tuned[f"bert.{k}"].equal(base[k])]
    assert not unchanged, unchanged  # every pretrained weight moved: the whole model trained


def test_finetune_classify_lora_on_cuda(tmp_path, tiny_bert):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result, allocated = run_nlpkit("finetune", make_recipe(tmp_path, tiny_bert, CASES["multiclass"][0], max_steps=20),
                                   "--lora", "--output-dir", out, "--json")
    assert_complete_cuda_run(out)
    assert_on_cuda(allocated, tiny_bert, "finetune classify --lora")
    assert result.json()["eval_f1_macro"] is not None
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [w for k, w in adapter.items() if "lora_B" in k]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b)  # B starts at 0: it moved, so the adapter trained


def test_finetune_classify_qlora_4bit_uses_bitsandbytes_cuda(tmp_path, tiny_bert):
    import bitsandbytes as bnb

    from nlpkit import runs

    out = tmp_path / "run"
    result, allocated = run_nlpkit("finetune", make_recipe(tmp_path, tiny_bert, CASES["multiclass"][0], max_steps=20),
                                   "--lora", "--bits", "4", "--output-dir", out, "--json")
    manifest = assert_complete_cuda_run(out)
    assert manifest["config"]["quant"]["bits"] == 4 and manifest["config"]["peft"]["method"] == "lora"
    assert_on_cuda(allocated, tiny_bert, "finetune classify --lora --bits 4")
    assert result.json()["eval_f1_macro"] is not None

    run = runs.open_run(out)
    model = runs.load_model(run)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "no bitsandbytes Linear4bit layer in the reloaded QLoRA base"
    for layer in quantized:
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.quant_state is not None
        assert layer.weight.device.type == "cuda", layer.weight.device
    tokenizer = runs.load_tokenizer(run)
    batch = tokenizer(["the team won the final", "a new phone with a fast chip"], padding=True,
                      return_tensors="pt").to("cuda")
    with torch.inference_mode():  # bitsandbytes' CUDA 4-bit matmul, through the adapter
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_finetune_sft_lora_on_cuda(sft_lora_run, tiny_llama):
    out, metrics = sft_lora_run["path"], sft_lora_run["metrics"]
    assert_complete_cuda_run(out)
    assert_on_cuda(sft_lora_run["allocated"], tiny_llama, "finetune sft --lora")
    for key in ("eval_loss_base", "eval_loss", "eos_stop_rate", "train_loss", "train_runtime"):
        assert key in metrics, key
    assert metrics["eval_loss"] < metrics["eval_loss_base"]  # lr 1e-3 on 10 rows: it learned something
    assert (out / "adapter_config.json").is_file() and (out / "generation_config.json").is_file()


def test_adapter_base_loads_in_bf16_with_fp32_adapters(tmp_path, tiny_llama):
    """model.dtype: auto on a GPU holds an adapter run's frozen base in bf16; the adapters train in fp32.
    model.attn_implementation is accepted and recorded (both keys: the core engineer's change of the same issue)."""
    out = tmp_path / "run"
    run_nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "--lora", "model.dtype=auto",
               "model.attn_implementation=sdpa", "--output-dir", out, "--json")
    manifest = assert_complete_cuda_run(out)
    assert manifest["config"]["model"]["dtype"] == "auto"
    assert manifest["config"]["model"]["attn_implementation"] == "sdpa"

    from nlpkit import runs  # lazily: a checkout without the loader fails this test only, never collection

    model = runs.load_model(runs.open_run(out))
    params = dict(model.named_parameters())
    lora = {name: p.dtype for name, p in params.items() if "lora_" in name}
    base = {name: p.dtype for name, p in params.items() if name.endswith("base_layer.weight")}
    assert lora and base
    assert set(lora.values()) == {torch.float32}, {n: d for n, d in lora.items() if d != torch.float32}
    assert set(base.values()) == {torch.bfloat16}, {n: d for n, d in base.items() if d != torch.bfloat16}


def test_finetune_reward_on_cuda(tmp_path, toy_llama):
    out = tmp_path / "rm"
    result, allocated = run_nlpkit("finetune", reward_recipe(tmp_path, toy_llama, steps=40), "--output-dir", out,
                                   "--json")
    assert_complete_cuda_run(out)
    assert_on_cuda(allocated, toy_llama, "finetune reward")
    metrics = result.json()
    assert metrics["eval_pairs"] == 100
    assert metrics["eval_pair_accuracy"] >= 0.7  # chance is 0.5; the CPU test reaches 0.8 with the same recipe
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- rlhf


def test_rlhf_ppo_on_cuda(tmp_path, toy_llama, toy_reward_model):
    out = tmp_path / "ppo"
    recipe = rlhf_recipe(tmp_path, toy_llama, toy_reward_model, total_episodes=64, eval_prompts=8,
                         num_sample_generations=2)
    result, allocated = run_nlpkit("rlhf", recipe, "train.bf16=auto", "--output-dir", out, "--json")
    assert_complete_cuda_run(out)
    assert_on_cuda(allocated, toy_llama, "rlhf (ppo)")
    log = read_log(out)
    assert [entry["step"] for entry in log] == [1, 2, 3, 4] and log[-1]["episode"] == 64  # 16 episodes an update
    assert all(math.isfinite(entry["objective/kl"]) and math.isfinite(entry["objective/scores"]) for entry in log)
    metrics = result.json()
    for key in ("eval_score_before", "eval_score_after", "eval_score_gain", "objective/kl"):
        assert key in metrics, key
    assert (out / "model.safetensors").is_file()


def test_rlhf_grpo_on_cuda(tmp_path, tiny_llama):
    recipe = grpo_recipe(tmp_path, tiny_llama, "grpo")
    out = tmp_path / "run"
    _, allocated = run_nlpkit("rlhf", recipe, "--output-dir", out, "--json")
    assert_complete_cuda_run(out)
    assert_on_cuda(allocated, tiny_llama, "rlhf (grpo)")
    steps = [entry for entry in read_log(out) if "reward" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert all(0.0 <= entry["reward"] <= 1.0 and "kl" in entry for entry in steps)
    assert (out / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------- eval, chat, serve


def test_eval_on_cuda_reproduces_the_runs_metrics(classify_run, tiny_bert):
    result, allocated = run_nlpkit("eval", classify_run["path"], "--data", FIXTURES / "sentiment_eval.csv", "--json")
    assert_on_cuda(allocated, tiny_bert, "eval")
    evaluated, trained = result.json(), classify_run["metrics"]
    assert evaluated["eval_accuracy"] == pytest.approx(trained["eval_accuracy"], abs=1 / 16 + 1e-9)  # 16 rows
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], abs=0.02)


def test_chat_answers_with_text_generated_on_cuda(chatty_llama, monkeypatch):
    from transformers import GenerationMixin

    devices = []
    generate = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        devices.append(next(self.parameters()).device.type)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    result, _ = run_nlpkit("chat", chatty_llama, "--prompt", "Name a color.", "--max-new-tokens", "12")
    assert result.stdout.strip(), f"empty answer; stderr:\n{result.stderr[-2000:]}"
    assert devices == ["cuda"], devices


def test_serve_answers_each_endpoint_on_cuda(classify_run, chatty_llama):
    from fastapi.testclient import TestClient

    from nlpkit.serve import create_app, load_served

    chat, classifier = load_served(str(chatty_llama)), load_served(str(classify_run["path"]))
    for served in (chat, classifier):
        assert next(served.model.parameters()).device.type == "cuda", f"serve {served.name}: model not on the GPU"

    with TestClient(create_app(chat, max_tokens_limit=16)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["task"] == "chat"
        response = client.post("/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"].strip()
        assert 1 <= body["usage"]["completion_tokens"] <= 12

    with TestClient(create_app(classifier)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["task"] == "classify"
        labels = health.json()["labels"]
        response = client.post("/v1/classify", json={"input": ["a great film", "a dull, thin plot"]})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [row["index"] for row in data] == [0, 1]
        for row in data:
            assert row["label"] in labels
            assert sum(s["score"] for s in row["scores"]) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------- quantize, merge, embed


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_cuda_shrinks_the_footprint(bits, tiny_llama, monkeypatch):
    from nlpkit import quantize

    timed = []
    latency = quantize.forward_latency_ms

    def spy(model, *args, **kwargs):  # both models, full precision and quantized, are timed on the GPU
        timed.append(next(model.parameters()).device.type)
        return latency(model, *args, **kwargs)

    monkeypatch.setattr(quantize, "forward_latency_ms", spy)
    result, _ = run_nlpkit("quantize", tiny_llama, "--bits", bits, "--eval-data", FIXTURES / "instructions.jsonl",
                           "--json")
    report = result.json()
    assert timed == ["cuda", "cuda"], timed
    assert report["footprint_ratio"] < 1, report
    assert report["quantized_param_share"] > 0
    assert math.isfinite(report["perplexity_quantized"]) and report["perplexity_quantized"] > 1
    note(f"quantize {bits}-bit tiny Llama: footprint ratio {report['footprint_ratio']:.3f}, perplexity "
         f"{report['perplexity_fp32']:.2f} -> {report['perplexity_quantized']:.2f}")


def test_merge_on_cuda(sft_lora_run, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    merged = tmp_path / "merged"
    result, allocated = run_nlpkit("merge", sft_lora_run["path"], "--output-dir", merged, "--json")
    assert_on_cuda(allocated, tiny_llama, "merge")
    report = result.json()
    assert report["max_abs_logits_diff"] <= 0.05  # a bf16 base rounds the merged sum; fp32 stays under 1e-3
    assert report["reload_max_abs_logits_diff"] <= 1e-3
    weights = load_file(merged / "model.safetensors")
    assert weights and not any("lora" in key for key in weights)
    assert (merged / MANIFEST).is_file()


def test_embed_on_cuda(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NLPKIT_CACHE", str(tmp_path))
    result, allocated = run_nlpkit("embed", tiny_bert, "--similar", "good food", "tasty food", "the team won",
                                   "--json")
    assert_on_cuda(allocated, tiny_bert, "embed")
    ranked = result.json()["ranked"]
    assert sorted(r["text"] for r in ranked) == ["tasty food", "the team won"]
    assert all(-1.0001 <= r["cosine"] <= 1.0001 for r in ranked)
    assert ranked[0]["cosine"] >= ranked[1]["cosine"]


# ---------------------------------------------------------------------------------------------- plan


MEASURE = r"""
import json, sys
import torch
from nlpkit.cli import app

report, argv = sys.argv[1], sys.argv[2:]
torch.cuda.init()
torch.cuda.reset_peak_memory_stats()
sys.argv = ["nlpkit", *argv]
try:
    app()
    code = 0
except SystemExit as e:
    code = e.code or 0
with open(report, "w") as f:
    json.dump({"exit": code, "max_memory_allocated": torch.cuda.max_memory_allocated()}, f)
sys.exit(code)
"""


def plan_model(folder: Path, tiny_llama: Path) -> Path:
    """A 28M-parameter Llama (8 layers, hidden 512) with the tiny Llama's tokenizer: large enough that weights,
    optimizer state and activations, not allocator slack, make the peak."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_plan_estimate_is_within_25_percent_of_the_measured_cuda_peak(tmp_path, tiny_llama):
    import random

    model = plan_model(tmp_path / "model", tiny_llama)
    words = " ".join(corpus()).split()
    rng = random.Random(0)
    data = tmp_path / "text.jsonl"  # every row longer than max_length: every batch is batch x max_length tokens
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(300))}) + "\n"
                            for _ in range(64)))
    recipe = write_yaml(tmp_path / "plan.yaml", {
        "stage": "sft",
        "model": {"name": str(model)},
        "data": {"train": str(data), "format": "text", "max_length": 128},
        "train": {"max_steps": 6, "per_device_train_batch_size": 8, "logging_steps": 1, "warmup_steps": 0,
                  "save_strategy": "no", "eval_strategy": "no"},
        "generation": {"eos_check_prompts": 0},
    })
    planned = nlpkit("plan", recipe, "--json")
    assert planned.code == 0, planned.stderr[-3000:]
    plan = planned.json()
    assert str(plan.get("device", "")).startswith("cuda"), f"plan on a GPU reports its device: {plan.get('device')}"
    memory = plan["memory_mb"]
    # framework and data are host memory (the process's RSS); the rest is what the GPU holds.
    estimate = memory["total"] - memory.get("framework", 0) - memory.get("data", 0)

    out, report = tmp_path / "run", tmp_path / "measured.json"
    process = subprocess.run([sys.executable, "-c", MEASURE, str(report), "finetune", recipe, "--output-dir", str(out)],
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    measured = json.loads(report.read_text())["max_memory_allocated"] / MB
    manifest = assert_complete_cuda_run(out)
    recorded = manifest.get("peak_gpu_memory_mb")
    note(f"plan: estimate {estimate:,.0f} MB on the GPU (total {memory['total']:,.0f} MB with host parts) vs "
         f"torch.cuda.max_memory_allocated {measured:,.0f} MB ({estimate / measured - 1:+.0%})"
         + (f"; the manifest's peak_gpu_memory_mb {recorded:,.0f} MB" if recorded is not None else ""))
    assert abs(estimate - measured) / measured <= 0.25, {k: v for k, v in memory.items()}


# ---------------------------------------------------------------------------------------------- processes


def test_fsdp_in_one_process_on_cuda(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    out = tmp_path / "fsdp"
    recipe = sft_recipe(tmp_path, tiny_llama, max_steps=6, logging_steps=1)
    command = [sys.executable, "-m", "nlpkit", "finetune", recipe, "--num-processes", "1", "--distributed", "fsdp",
               "--output-dir", str(out), "--json"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    assert "eval_loss" in json.loads(process.stdout)
    assert_complete_cuda_run(out)
    assert [e["step"] for e in logged(out) if "loss" in e] == [1, 2, 3, 4, 5, 6]
    base, tuned = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    assert tuned.keys() == base.keys()  # the full state dict gathered into one ordinary model, no FSDP prefixes
    assert all(torch.isfinite(w).all() for w in tuned.values())
    assert any(not tuned[k].equal(base[k]) for k in base)


def test_resume_after_kill_9_on_cuda(tmp_path, tiny_bert):
    """tests/test_reliability.py's kill -9 and --resume, on the GPU: killed after the first committed checkpoint,
    resumed, every step logged once. 300 steps: GPU steps are fast, and the kill must land mid-run."""
    from nlpkit import runs

    steps = 300
    recipe = classify_recipe(tmp_path, tiny_bert, max_steps=steps)
    out = tmp_path / "killed"
    process = finetune(recipe, out)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    # after the first committed checkpoint (step 10; rotated away once step 20's is committed) and past it
    while not (any((out / "checkpoints").glob(f"checkpoint-*/{MARKER}")) and log_steps(out)
               and log_steps(out)[-1] > 10):
        assert process.poll() is None, f"the run ended before it could be killed:\n{tail(out.with_suffix('.err'))}"
        assert time.monotonic() < deadline, "no committed checkpoint in time"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = log_steps(out)[-1]
    assert killed_at < steps and not (out / runs.MANIFEST).exists()

    resumed = finetune(recipe, out, "--resume", "--json")
    assert resumed.wait(timeout=SUBPROCESS_TIMEOUT) == 0, tail(out.with_suffix(".err"))
    assert "resuming from" in out.with_suffix(".err").read_text()
    assert_complete_cuda_run(out)
    trained = [e["step"] for e in logged(out) if "loss" in e]
    assert trained == list(range(1, steps + 1)), f"killed at step {killed_at}"  # every step once
    note(f"resume: killed at step {killed_at} of {steps}, resumed to the end, every step logged once")
