"""nlpkit plan on tiny models: parameter counts equal the built models', the memory parts follow the settings."""

import pytest
import yaml
from test_classify import CASES, make_recipe
from test_sft import sft_recipe

from helpers import nlpkit


def plan_json(*args):
    result = nlpkit("plan", *args, "--json")
    assert result.code == 0, result.stderr
    return result.json()


def counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


@pytest.mark.parametrize("lora", [False, True])
def test_classify_parameter_counts_match_the_real_model(tmp_path, tiny_bert, lora):
    from transformers import AutoModelForSequenceClassification

    from nlpkit.adapters import apply_peft
    from nlpkit.config import PeftSection

    recipe = make_recipe(tmp_path, tiny_bert, CASES["multiclass"][0])
    planned = plan_json(recipe, *(["--lora"] if lora else []))["parameters"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)  # topics: 3 labels
    if lora:
        model = apply_peft(model, PeftSection(), task_type="SEQ_CLS")
    total, trainable = counts(model)
    assert (planned["total"], planned["trainable"]) == (total, trainable)


def test_sft_lora_parameter_counts_match_the_real_model(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from nlpkit.adapters import apply_peft
    from nlpkit.config import PeftSection

    planned = plan_json(sft_recipe(tmp_path, tiny_llama), "--lora", "peft.r=4")["parameters"]
    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_llama), PeftSection(r=4), task_type="CAUSAL_LM")
    assert (planned["total"], planned["trainable"]) == counts(model)


def measured_training_state_mb(model_dir, num_labels: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[2, 10, 11, 3]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()

    def mb(tensors):
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    return {"weights": mb(model.parameters()), "gradients": mb(p.grad for p in model.parameters()),
            "optimizer": mb(t for state in optimizer.state.values() for t in state.values() if t.dim() > 0)}


def test_memory_parts_follow_precision_adapters_and_processes(tmp_path, tiny_bert):
    recipe = make_recipe(tmp_path, tiny_bert, CASES["binary"][0])
    full = plan_json(recipe, "train.bf16=false")
    memory = full["memory_mb"]
    # Weights, gradients and AdamW's state as a real training step holds them, measured on the built model.
    measured = measured_training_state_mb(tiny_bert, num_labels=2)
    for part in ("weights", "gradients", "optimizer"):
        assert memory[part] == pytest.approx(measured[part], rel=0.01), part
    assert memory["framework"] > 100  # torch + transformers, measured in the planning process
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"), abs=0.5)
    assert full["batch"]["global"] == 8

    bf16 = plan_json(recipe, "train.bf16=true")["memory_mb"]
    assert bf16["activations"] < memory["activations"] and bf16["autocast_cache"] > 0 == memory["autocast_cache"]
    shorter = plan_json(recipe, "train.bf16=false", "data.max_length=32")["memory_mb"]  # default 128
    assert shorter["activations"] < memory["activations"]

    lora = plan_json(recipe, "train.bf16=false", "--lora")["memory_mb"]
    assert lora["gradients"] < memory["gradients"] and lora["optimizer"] < memory["optimizer"]
    qlora = plan_json(recipe, "train.bf16=false", "--lora", "--bits", "4")["memory_mb"]
    assert qlora["weights"] < lora["weights"]

    ddp = plan_json(recipe, "train.bf16=false", "--num-processes", "2", "train.gradient_accumulation_steps=3")
    assert ddp["batch"] == {"per_device": 8, "num_processes": 2, "gradient_accumulation_steps": 3, "global": 48}
    assert ddp["memory_mb"]["ddp_buckets"] == pytest.approx(memory["gradients"], abs=0.1)


def test_over_budget_suggests_overrides_that_fit(tmp_path, tiny_bert):
    recipe = make_recipe(tmp_path, tiny_bert, CASES["binary"][0])
    fits = plan_json(recipe, "--memory", "100GB")
    assert fits["fits"] is True and "suggestions" not in fits
    planned = plan_json(recipe, "--memory", "1MB")
    assert planned["fits"] is False and planned["budget_mb"] == 1
    suggestions = planned["suggestions"]
    assert suggestions  # on this tiny model LoRA saves nothing (its dropout copies outweigh the gradients)
    for s in suggestions:
        assert s["estimate_mb"] < planned["memory_mb"]["total"]
        again = plan_json(recipe, *s["override"].split())  # each override is valid and gives the figure shown
        assert again["memory_mb"]["total"] == pytest.approx(s["estimate_mb"], abs=15)  # framework re-measured
    human = nlpkit("plan", recipe, "--memory", "1MB")
    assert "does NOT fit" in human.stderr and f"try {suggestions[0]['override']}" in human.stderr


def test_plan_shows_resolved_config_and_rejects_bad_input(tmp_path, tiny_bert):
    recipe = make_recipe(tmp_path, tiny_bert, CASES["binary"][0])
    human = nlpkit("plan", recipe, "train.learning_rate=3e-4")
    assert human.code == 0
    assert yaml.safe_load(human.stderr.split("parameters:")[0])["train"]["learning_rate"] == 3e-4
    assert "estimated peak memory" in human.stderr
    bad = nlpkit("plan", recipe, "--memory", "lots")
    assert bad.code == 2 and "--memory 'lots'" in bad.stderr
    typo = nlpkit("plan", recipe, "train.learning_rat=1")
    assert typo.code == 2 and "did you mean 'learning_rate'" in typo.stderr


LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False}


def test_planned_for_a_gpu_frozen_weights_are_bf16_and_host_memory_is_apart(tmp_path, tiny_llama):
    recipe = sft_recipe(tmp_path, tiny_llama)
    cpu = plan_json(recipe, "--lora", "--device", "cpu")
    gpu = plan_json(recipe, "--lora", "--device", "cuda")
    assert gpu["device"].startswith("cuda") and "framework" not in gpu["memory_mb"] and "host_memory_mb" in gpu
    params = gpu["parameters"]
    frozen = params["total"] - params["trainable"]
    # The base in bf16 on a GPU (fp32 on the CPU); the adapters in fp32 on both.
    assert gpu["memory_mb"]["weights"] == pytest.approx((2 * frozen + 4 * params["trainable"]) / 2**20, abs=0.1)
    assert cpu["memory_mb"]["weights"] == pytest.approx(4 * params["total"] / 2**20, abs=0.1)
    full = plan_json(recipe, "--device", "cuda")  # full fine-tuning keeps fp32 master weights
    assert full["memory_mb"]["weights"] == pytest.approx(4 * full["parameters"]["total"] / 2**20, abs=0.1)


def test_an_8b_llama_with_lora_on_a_24gb_gpu_in_bf16_and_in_4_bit(tmp_path):
    """The question a practitioner asks first, answered from the config alone (no weights are loaded)."""
    import json

    from conftest import FIXTURES

    model = tmp_path / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    recipe = "sft-dolly-lora"  # the shipped recipe, by name
    common = [recipe, f"model.name={model}", f"data.train={FIXTURES / 'instructions.jsonl'}", "--device", "cuda",
              "--memory", "24GB"]
    bf16 = plan_json(*common)
    nf4 = plan_json(*common, "--bits", "4")
    params = bf16["parameters"]  # 8.03B in the base, 42M in rank-16 adapters
    assert params["total"] - params["trainable"] == pytest.approx(8.03e9, rel=0.01)
    frozen, trainable = params["total"] - params["trainable"], params["trainable"]
    assert bf16["memory_mb"]["weights"] == pytest.approx((2 * frozen + 4 * trainable) / 2**20, abs=0.1)  # bf16 base
    assert nf4["memory_mb"]["weights"] < 0.4 * bf16["memory_mb"]["weights"]
    for planned in (bf16, nf4):  # batch 8 x 384 tokens keeps too many activations; checkpointing brings it under
        assert planned["fits"] is False
        fix = next(s for s in planned["suggestions"] if "gradient_checkpointing" in s["override"])
        assert fix["fits"] is True
