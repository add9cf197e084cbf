"""Model references: aliases, directories, hub ids, and the embedded models (slow: real weights)."""

import pytest

from nlpkit.errors import NlpkitError
from nlpkit.models import resolve_model


def test_references_resolve_or_fail_clearly(tiny_bert, tmp_path):
    assert resolve_model(str(tiny_bert)) == str(tiny_bert)
    assert resolve_model("someone/some-model") == "someone/some-model"  # a hub id passes through unchanged
    with pytest.raises(NlpkitError, match="did you mean 'smollm2-135m'"):
        resolve_model("smollm2")
    with pytest.raises(NlpkitError, match="no such directory"):
        resolve_model(str(tmp_path / "a" / "b"))


@pytest.mark.slow
def test_minilm_alias_is_a_real_bert():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model("minilm"))
    assert config.model_type == "bert" and config.num_hidden_layers == 6 and config.hidden_size == 384


@pytest.mark.slow
def test_smollm2_gguf_converts_once_to_safetensors(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("NLPKIT_CACHE", str(tmp_path))
    folder = resolve_model("smollm2-135m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no staging directory left behind
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama" and 130e6 < model.num_parameters() < 140e6
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert resolve_model("smollm2-135m") == folder  # second call reuses the cache
