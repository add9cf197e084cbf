"""`nlpkit quantize` end to end on a tiny Llama and a tiny classifier run (the real model: slow test)."""

import pytest

from conftest import FIXTURES
from helpers import nlpkit


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_a_causal_lm_saves_and_reloads(bits, tmp_path, tiny_llama):
    out = tmp_path / "q"
    result = nlpkit("quantize", tiny_llama, "--bits", bits, "--eval-data", FIXTURES / "instructions.jsonl",
                    "--output-dir", out, "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["footprint_mb_quantized"] < report["footprint_mb_fp32"]
    assert report["eval_rows"] == 10 and report["perplexity_fp32"] > 1 and report["latency_ms_quantized"] > 0
    assert report["reloaded_perplexity"] == pytest.approx(report["perplexity_quantized"], rel=1e-3)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_quantize_a_classifier_run_reports_accuracy(tmp_path, tiny_bert):
    from test_classify import CASES, make_recipe

    run = tmp_path / "run"
    assert nlpkit("finetune", make_recipe(tmp_path, tiny_bert, CASES["binary"][0]), "--output-dir", run).code == 0
    result = nlpkit("quantize", run, "--bits", 8, "--eval-data", FIXTURES / "sentiment_eval.csv", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["kind"] == "classifier" and report["footprint_mb_quantized"] < report["footprint_mb_fp32"]
    # The full-precision figure is the run's own accuracy on that file, as `nlpkit eval` measures it.
    evaluated = nlpkit("eval", run, "--data", FIXTURES / "sentiment_eval.csv", "--json").json()
    assert report["accuracy_fp32"] == pytest.approx(evaluated["eval_accuracy"])
    # 8 bits moves few predictions: on 16 rows, at most 2 flip.
    assert abs(report["accuracy_change"]) <= 2 / 16 + 1e-9
    assert report["accuracy_change"] == pytest.approx(report["accuracy_quantized"] - report["accuracy_fp32"])


@pytest.mark.slow
@pytest.mark.parametrize("bits, max_footprint, max_perplexity_increase", [(8, 0.55, 0.03), (4, 0.35, 0.10)])
def test_smollm2_keeps_perplexity(bits, max_footprint, max_perplexity_increase, shared_data):
    result = nlpkit("quantize", "smollm2-135m", "--bits", bits, "--eval-data",
                    shared_data / "dolly_open_qa" / "test.jsonl", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["footprint_ratio"] <= max_footprint
    assert report["perplexity_increase"] <= max_perplexity_increase


def test_4bit_keeps_the_sensitive_layers_in_bf16(tmp_path, tiny_llama):
    """4 bits: k_proj, v_proj and down_proj stay unquantized, stored (like embeddings and norms) in bf16, not fp32; the
    saved model reloads the same way. 8 bits keeps its fp32 layout."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from nlpkit.quantize import KEEP_16BIT_4BIT

    out = tmp_path / "q"
    report = nlpkit("quantize", tiny_llama, "--bits", 4, "--output-dir", out, "--json").json()
    assert report["kept_bf16"] == KEEP_16BIT_4BIT == ["k_proj", "v_proj", "down_proj"]
    assert 0 < report["quantized_param_share"] < 1
    model = AutoModelForCausalLM.from_pretrained(out)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for name, module in linears.items():
        kept = name.endswith(("k_proj", "v_proj", "down_proj", "lm_head"))
        assert isinstance(module, bnb.nn.Linear4bit) != kept, name
        if kept:
            assert module.weight.dtype == torch.bfloat16, name
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "kept_bf16" not in nlpkit("quantize", tiny_llama, "--bits", 8, "--json").json()
