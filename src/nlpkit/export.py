"""`nlpkit export`: a causal LM as a GGUF file for llama.cpp and Ollama, checked by loading it back.

    nlpkit export runs/sft-dolly-lora --format gguf --outtype f16      # the adapter is merged first
    nlpkit export smollm2-135m --format gguf --outtype q8_0 --output /tmp/smollm2-q8_0.gguf --json

The file is written with the `gguf` package (llama.cpp's own Python writer) under its tensor names for the llama
architecture: the architecture numbers, the tokenizer (tokens, types, merges, special ids), the chat template, and
the q/k projections reordered for llama.cpp's rotary layout. Then transformers' GGUF loader, which undoes that
reordering, reads the file back and the largest logits difference against the source model (a run with its adapter
attached, in fp32) is reported on a few chat prompts, with the tokenizer read back and compared too. The result
ends with the lines of an Ollama Modelfile.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from nlpkit import models, runs
from nlpkit.adapters import refuse_unmergeable
from nlpkit.errors import NlpkitError
from nlpkit.report import info, print_metrics, warn

FORMATS = ("gguf",)
OUTTYPES = {"f16": "F16", "q8_0": "Q8_0", "f32": "F32"}  # --outtype -> the gguf package's quantization type
SUPPORTED = ("Llama-family causal LMs (config model_type llama: Llama 2, TinyLlama, SmolLM/SmolLM2) with default "
             "RoPE, no biases and a byte-level BPE tokenizer")
# Against the source: rounding the weights to f16 is all that moves the logits (q8_0: reported, not judged). On
# SmolLM2-135M, whose logits reach ~40, f16 rounding alone moves them by ~0.04 (docs/export.md).
F16_TARGET = 1e-2
# Against the source with its weights rounded as the file stores them: only a wrong name, q/k order or metadata
# value could show here (measured: exactly 0).
LAYOUT_TOLERANCE = 1e-3
CHECK_PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
                 "Write a short poem about the sea."]


def export(ref: str, fmt: str, outtype: str, output: Path | None) -> dict:
    """Write the GGUF (to a temporary name, renamed when complete), read it back, compare, report."""
    import torch

    if fmt not in FORMATS:
        raise NlpkitError(f"--format {fmt}: nlpkit exports gguf (llama.cpp, Ollama); use --format gguf, or "
                          "`nlpkit merge` for a plain transformers folder")
    if outtype not in OUTTYPES:
        raise NlpkitError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    out = output or default_output(ref, outtype)
    if out.exists():
        raise NlpkitError(f"--output {out}: already exists; choose another --output or delete it")
    start = time.perf_counter()
    model, tokenizer, merged = load_source(ref)
    texts = check_texts(tokenizer)
    ids = [tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids for text in texts]
    reference = logits(model, ids)  # before merging: the run as chat and serve answer with it
    if merged:
        model = model.merge_and_unload()
    model = model.to("cpu", torch.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        tensors = write_gguf(model, tokenizer, partial, OUTTYPES[outtype], name=Path(ref.rstrip("/")).name)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    rounded = logits(model, ids)  # the model now holds the file's weights (f16 or q8_0 values), in its own layout
    written = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers reads the file as llama.cpp would find it: its config from the metadata, q/k un-permuted.
    reloaded = logits(AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                           dtype=torch.float32).eval(), ids)
    layout_diff = max(float((want - got).abs().max()) for want, got in zip(rounded, reloaded))
    if layout_diff > LAYOUT_TOLERANCE:  # the weights are right but the file reads back as another model
        out.unlink()
        raise RuntimeError(f"{out}: read back, the file differs from the model it was written from by "
                           f"{layout_diff:.3g} in the logits (names, q/k order or metadata); removed it")
    positions = sum(want.shape[0] for want in reference)
    back = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    tokenizer_same = all(back(text, add_special_tokens=False).input_ids == i[0].tolist() for text, i in zip(texts, ids))
    result = {
        "output": str(out), "format": fmt, "outtype": outtype, "source": ref, "merged_adapter": merged,
        "size_mb": out.stat().st_size / 2**20, "tensors": tensors,
        "max_abs_logits_diff": max(float((want - got).abs().max()) for want, got in zip(reference, reloaded)),
        "layout_max_abs_logits_diff": layout_diff,
        "argmax_agreement": sum(int((w.argmax(-1) == g.argmax(-1)).sum()) for w, g in zip(reference, reloaded))
        / positions,
        "check_prompts": len(texts), "check_positions": positions,
        "target": F16_TARGET if outtype in ("f16", "f32") else None,
        "tokenizer_round_trip": tokenizer_same, "chat_template_round_trip": back.chat_template == tokenizer.chat_template,
        "write_s": written - start, "verify_s": time.perf_counter() - written, "wall_s": time.perf_counter() - start,
        "modelfile": modelfile(out, tokenizer),
    }
    info(f"round trip: max |logits difference| {result['max_abs_logits_diff']:.2e} against the source"
         + (f" (target <= {result['target']:g})" if result["target"] is not None else "")
         + f", {layout_diff:.2e} against the source rounded to {outtype} (only the file's layout shows here); top-1 "
         f"agreement {result['argmax_agreement']:.1%} over {len(texts)} prompts, {positions} positions")
    if not tokenizer_same:
        warn(f"{out}: read back, the tokenizer splits the check prompts differently from the source's")
    return result


def default_output(ref: str, outtype: str) -> Path:
    """Beside a run or model directory (runs/sft -> runs/sft-f16.gguf); here for an alias."""
    path = Path(ref.rstrip("/"))
    return path.with_name(f"{path.name}-{outtype}.gguf")


def load_source(ref: str):
    """The model in fp32 (with its adapter attached: the caller merges it after measuring), its tokenizer, and
    whether there is an adapter. The architecture is checked from the config before any weight is loaded."""
    import torch
    from transformers import AutoConfig

    if runs.is_run(ref):
        run = runs.open_run(ref)
        if not run.is_causal_lm:
            raise NlpkitError(f"{ref}: a {run.stage} run (a classifier); GGUF export takes sft and rlhf runs of "
                              f"{SUPPORTED}")
        check_architecture(AutoConfig.from_pretrained(run.path), ref)
        refuse_unmergeable(run)
        model = runs.load_model(run, dequantize=True, dtype=torch.float32)  # a QLoRA base: dequantized to fp32
        return model, runs.load_tokenizer(run), run.has_adapter
    check_architecture(AutoConfig.from_pretrained(models.resolve_model(ref)), ref)
    model, tokenizer = runs.load_causal_lm(ref, dtype=torch.float32)
    return model, tokenizer, False


def check_architecture(config, ref: str) -> None:
    kind = (config.architectures or ["?"])[0]
    if config.model_type != "llama":
        raise NlpkitError(f"{ref}: model_type {config.model_type} ({kind}); GGUF export supports {SUPPORTED}")
    if not kind.endswith("ForCausalLM"):
        raise NlpkitError(f"{ref}: a {kind} (not a causal LM); GGUF export supports {SUPPORTED}")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise NlpkitError(f"{ref}: RoPE scaling {rope['rope_type']!r}; GGUF export supports {SUPPORTED}")
    if config.attention_bias or config.mlp_bias:
        raise NlpkitError(f"{ref}: attention or MLP biases; GGUF export supports {SUPPORTED}")


def rope_parameters(config) -> dict:
    # transformers 5 keeps theta and type under rope_parameters; older configs have rope_theta on the config
    return getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}


def check_texts(tokenizer) -> list[str]:
    """The prompts as chat and serve send them: through the chat template, ready for the answer."""
    if not tokenizer.chat_template:
        return CHECK_PROMPTS
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True) for prompt in CHECK_PROMPTS]


def logits(model, ids: list) -> list:
    """Next-token logits at every position, one prompt at a time (no padding to line up), in fp32 on the CPU."""
    import torch

    with torch.inference_mode():
        return [model(input_ids=i.to(model.device)).logits[0].float().cpu() for i in ids]


# ---------------------------------------------------------------------------------------------- the file


def write_gguf(model, tokenizer, path: Path, qtype_name: str, name: str) -> int:
    """The metadata llama.cpp's llama architecture reads, the tokenizer, then every tensor; returns the count.

    Each weight of `model` is left holding the value the file stores (rounded to f16 or q8_0 and back, in the
    model's own layout), so the caller can tell what rounding costs from what the file's layout would cost."""
    import gguf
    import torch

    config, qtype = model.config, gguf.GGMLQuantizationType[qtype_name]
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * heads != config.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if qtype_name == "F32" else f"MOSTLY_{qtype_name}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RuntimeError(f"{hf_name}: no GGUF name for this llama tensor")
        weight = tensor.numpy()
        rotary_heads = {"q_proj": heads, "k_proj": kv_heads}.get(hf_name.rsplit(".", 2)[-2])
        data, stored = encode(rotary_pairs_adjacent(weight, rotary_heads) if rotary_heads else weight, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=stored)
        count += 1
        # The model keeps the stored values in its own layout: q/k are rounded again unpermuted (row order does not
        # change q8_0's blocks, which run along each row), so only the file's reader can prove the reordering right.
        held = encode(weight, qtype)[0] if rotary_heads else data
        tensor.copy_(torch.from_numpy(gguf.quants.dequantize(held, stored)).reshape(tensor.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def rotary_pairs_adjacent(weight, heads: int):
    """Reorder a q or k projection's output rows for llama.cpp's rotary embedding.

    transformers' Llama rotates each head's dimension i together with dimension i + head_dim/2 (the two halves);
    llama.cpp's rope rotates neighbours 2i and 2i+1. Within every head, row i of the first half and row i of the
    second half are put side by side, which makes the two computations the same. (llama.cpp's converter does this in
    LlamaModel.permute; transformers' GGUF loader undoes it when reading the file back.)"""
    half = weight.shape[0] // heads // 2
    by_head = weight.reshape(heads, 2, half, *weight.shape[1:])  # [head, which half, row in half, inputs]
    return by_head.swapaxes(1, 2).reshape(weight.shape)  # [head, row in half, which half, inputs]


def encode(data, qtype):
    """Vectors (norms) stay fp32, as llama.cpp keeps them; matrices in the asked type (f32: the weights unrounded).
    A matrix whose rows do not split into q8_0's blocks of 32 falls back to f16, as llama.cpp's converter does."""
    import gguf
    import numpy as np

    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE, as llama.cpp's "gpt2" tokenizer model reads it: every id up to the embedding
    size (ids the tokenizer does not use as unused padding), token types, merges, special ids, the chat template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec["model"]
    if bpe["type"] != "BPE" or bpe.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise NlpkitError(f"tokenizer: a {bpe['type']} tokenizer (decoder {(spec.get('decoder') or {}).get('type')}); "
                          f"GGUF export supports {SUPPORTED}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise NlpkitError(f"tokenizer: {len(vocab)} tokens but the model embeds {vocab_size}; resize the embeddings "
                          "before exporting")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:  # special ones (<|im_end|>) are control tokens; others are matched whole in the text
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        if (token_id := getattr(tokenizer, f"{kind}_token_id")) is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Whether llama.cpp adds BOS/EOS around text: as this tokenizer does (SmolLM2 adds neither).
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp splits text before BPE with a regex it picks by name (tokenizer.ggml.pre). Two shapes are known
    here: GPT-2's regex ("gpt-2"), and single digits first, then GPT-2's regex ("smollm", SmolLM2's original)."""
    def gpt2(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space")

    if pre and gpt2(pre):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers") or []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and gpt2(steps[1])):
        return "smollm"
    raise NlpkitError(f"tokenizer: pre-tokenizer {json.dumps(pre)} has no llama.cpp name nlpkit knows (gpt-2, "
                      f"smollm); GGUF export supports {SUPPORTED}")


# ---------------------------------------------------------------------------------------------- Ollama

# Ollama's own ChatML template (Go template syntax); a Modelfile SYSTEM line becomes the first message.
OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")


def modelfile(path: Path, tokenizer) -> str:
    """`ollama create NAME -f Modelfile` lines: ChatML templates are written out (with the template's default system
    prompt, if it adds one); for other templates Ollama reads tokenizer.chat_template from the file where it knows it.
    Greedy decoding, as nlpkit chat answers."""
    lines = [f"FROM ./{path.name}"]
    system = chatml_default_system(tokenizer)
    if system is not None:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the file where it recognises it; "
                     "otherwise write one in Go template syntax")
        if tokenizer.eos_token:
            lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines)


def chatml_default_system(tokenizer) -> str | None:
    """None unless the chat template renders plain ChatML, checked by rendering a conversation with and without a
    system message; then the system prompt it adds when there is none ("" if it adds none)."""
    if not tokenizer.chat_template:
        return None

    def chatml(messages):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    if render([{"role": "system", "content": "Be brief."}] + turns) != chatml([{"role": "system",
                                                                              "content": "Be brief."}] + turns):
        return None
    head, tail = render(turns), chatml(turns)
    if head == tail:
        return ""
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head.removesuffix(tail), re.S)
    return match.group(1) if head.endswith(tail) and match else None


def print_result(result: dict) -> None:
    print_metrics({k: v for k, v in result.items() if k != "modelfile"})
    info(f"\nOllama Modelfile (then: ollama create NAME -f Modelfile):\n{result['modelfile']}")
