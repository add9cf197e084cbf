"""`nlpkit quantize`: load a model in 8 or 4 bits with bitsandbytes and measure what that saves and costs.

    nlpkit quantize smollm2-135m --bits 4 --eval-data dolly:test --json
    nlpkit quantize runs/classify-sst2 --bits 8 --eval-data sst2:validation --json

Reports the weight footprint (full precision and quantized), the latency of one forward pass, and the quality change
on the eval data: perplexity of the responses for a causal LM (every token too, as perplexity_all_tokens),
accuracy for a classifier run. With --output-dir the quantized model
is saved, reloaded from disk and measured again, to prove the saved model works.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from pydantic import ValidationError

from nlpkit.config import ModelSection, QuantSection
from nlpkit.data import open_source
from nlpkit.distributed import place
from nlpkit.errors import NlpkitError
from nlpkit.models import load_model, load_tokenizer
from nlpkit import runs
from nlpkit.report import info

EVAL_ROWS = 64  # enough rows for a stable perplexity; a few seconds per model on CPU
EVAL_TOKENS = 256

# A causal LM in 4 bits: the layers whose rounding costs the most stay in bf16, as llama.cpp's Q4_K_M keeps
# attn_v and ffn_down at higher precision, and everything not quantized (embeddings, norms, these layers) is
# stored in bf16 rather than fp32: on SmolLM2-135M these layers carry most of nf4's perplexity cost, and bf16 itself
# costs nothing (the measurements: docs/adapters-and-quantization.md).
KEEP_16BIT_4BIT = ["k_proj", "v_proj", "down_proj"]


def run(model_ref: str, bits: int, quant_type: str, eval_data: str | None, output_dir: Path | None) -> dict:
    try:
        quant = QuantSection(bits=bits, quant_type=quant_type)
    except ValidationError as e:
        raise NlpkitError(f"--bits/--quant-type: {e.errors()[0]['msg'].lower()} (got --bits {bits} "
                          f"--quant-type {quant_type})") from None
    path = Path(model_ref)
    if (path / "adapter_config.json").is_file():
        raise NlpkitError(f"{model_ref}: an adapter run; merge it first (nlpkit merge {model_ref}) and quantize the "
                          "merged model, or train with --bits for QLoRA")
    if runs.is_run(path) and not runs.open_run(path).is_causal_lm:
        return _classifier_run(runs.open_run(path), quant, eval_data, output_dir)
    return _causal_lm(model_ref, quant, eval_data, output_dir)


def _causal_lm(model_ref: str, quant: QuantSection, eval_data: str | None, output_dir: Path | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model_cfg = ModelSection(name=model_ref)
    tokenizer = load_tokenizer(model_cfg)
    texts = lm_texts(eval_data, tokenizer) if eval_data else []
    probe = tokenizer("The quick brown fox jumps over the lazy dog. " * 16, return_tensors="pt").input_ids[:, :128]
    result = {"model": model_ref, "kind": "causal_lm", "bits": quant.bits,
              "quant_type": quant.quant_type if quant.bits == 4 else None}

    keep = KEEP_16BIT_4BIT if quant.bits == 4 else []
    if keep:
        result["kept_bf16"] = keep
    for label, quantized in (("fp32", None), ("quantized", quant)):
        dtype = torch.bfloat16 if quantized is not None and quant.bits == 4 else torch.float32
        model = place(load_model(AutoModelForCausalLM, model_cfg, quant=quantized, keep_modules=keep,
                                 dtype=dtype)).eval()
        result[f"footprint_mb_{label}"] = model.get_memory_footprint() / 2**20
        result[f"latency_ms_{label}"] = forward_latency_ms(model, probe)
        if quantized is not None:
            result["quantized_param_share"] = quantized_param_share(model)
        if texts:
            result[f"perplexity_{label}"] = perplexity(model, tokenizer, texts)
            result[f"perplexity_all_tokens_{label}"] = perplexity(model, tokenizer, texts, response_only=False)
            info(f"{label}: perplexity {result[f'perplexity_{label}']:.3f} on the responses of {len(texts)} rows")
    result["footprint_ratio"] = result["footprint_mb_quantized"] / result["footprint_mb_fp32"]
    if texts:
        result["perplexity_increase"] = result["perplexity_quantized"] / result["perplexity_fp32"] - 1
        result["perplexity_all_tokens_increase"] = (result["perplexity_all_tokens_quantized"]
                                                    / result["perplexity_all_tokens_fp32"] - 1)
        result["eval_rows"] = len(texts)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(output_dir, use_safetensors=True).eval()
        result["output_dir"] = str(output_dir)
        result["reloaded_footprint_mb"] = reloaded.get_memory_footprint() / 2**20
        if texts:
            result["reloaded_perplexity"] = perplexity(reloaded, tokenizer, texts)
    return result


def _classifier_run(run: runs.Run, quant: QuantSection, eval_data: str | None, output_dir: Path | None) -> dict:
    import torch

    from nlpkit.evaluate import classifier_metrics

    if run.stage != "classify":
        raise NlpkitError(f"{run.path}: a {run.stage} run; quantize takes a classify or sft run, or a model")
    tokenizer = runs.load_tokenizer(run)
    probe = tokenizer(["a short sentence to time the forward pass."] * 8, return_tensors="pt")
    result = {"model": str(run.path), "kind": "classifier", "bits": quant.bits}
    for label, quantized in (("fp32", None), ("quantized", quant)):
        model = runs.load_model(run, quant=quantized, **({} if quantized else {"dtype": torch.float32}))
        result[f"footprint_mb_{label}"] = model.get_memory_footprint() / 2**20
        result[f"latency_ms_{label}"] = forward_latency_ms(model, probe["input_ids"], probe["attention_mask"])
        if eval_data:
            metrics = classifier_metrics(run, eval_data, None, None, None, None, model=model)
            result[f"accuracy_{label}"] = metrics.get("eval_accuracy")
    result["footprint_ratio"] = result["footprint_mb_quantized"] / result["footprint_mb_fp32"]
    if eval_data and result["accuracy_fp32"] is not None:
        result["accuracy_change"] = result["accuracy_quantized"] - result["accuracy_fp32"]
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        reloaded = run.auto_class.from_pretrained(output_dir, use_safetensors=True)
        result["output_dir"] = str(output_dir)
        result["reloaded_footprint_mb"] = reloaded.get_memory_footprint() / 2**20
    return result


def lm_texts(source: str, tokenizer) -> list[tuple[str, str]]:
    """The first EVAL_ROWS rows as (prompt, full text) pairs, rendered as in training: a `text` row has no prompt;
    instruction/response rows go through the chat template, so the prompt is everything before the answer."""
    rows = open_source(source, "test", "--eval-data")
    pairs = []
    for i, row in enumerate(rows.rows[:EVAL_ROWS]):
        if isinstance(row.get("text"), str):
            pairs.append(("", row["text"]))
            continue
        prompt = row.get("instruction") or row.get("prompt") or row.get("question")
        answer = row.get("response") or row.get("completion") or row.get("output") or row.get("answer")
        if not (isinstance(prompt, str) and isinstance(answer, str)):
            raise NlpkitError(f"{rows.where(i)}: needs a text column, or instruction/response (prompt/completion, "
                              f"question/answer) columns; it has {', '.join(row)}")
        if tokenizer.chat_template:
            user = [{"role": "user", "content": prompt}]
            head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        else:
            head, full = f"{prompt}\n", f"{prompt}\n{answer}{tokenizer.eos_token or ''}"
        pairs.append((head, full))
    return pairs


def perplexity(model, tokenizer, texts: list[tuple[str, str]], response_only: bool = True) -> float:
    """exp(mean next-token NLL), one text at a time (no padding). response_only scores the tokens after the prompt,
    the same tokens SFT trains on and `nlpkit eval` reports; otherwise every token, the chat template's boilerplate
    (SmolLM2 adds a default system prompt to every row) included."""
    import torch

    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for head, full in texts:
            ids = tokenizer(full, return_tensors="pt", truncation=True, max_length=EVAL_TOKENS).input_ids
            ids = ids.to(model.device)
            labels = ids.clone()
            if response_only:
                labels[:, : len(tokenizer(head)["input_ids"])] = -100
            scored = int((labels[:, 1:] != -100).sum())
            if scored == 0:
                continue
            total_nll += model(input_ids=ids, labels=labels).loss.item() * scored
            total_tokens += scored
    if total_tokens == 0:
        raise NlpkitError(f"--eval-data: no token left to score within {EVAL_TOKENS} tokens per row")
    return math.exp(total_nll / total_tokens)


def quantized_param_share(model) -> float:
    """Share of the model's parameters held in 8 or 4 bits (the rest: heads, embeddings, norms, kept layers)."""
    import bitsandbytes as bnb

    quantized = total = 0
    seen = set()  # a tied embedding is one tensor under two modules
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            quantized += module.in_features * module.out_features
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return quantized / total


def forward_latency_ms(model, input_ids, attention_mask=None, repeats: int = 5) -> float:
    """Median wall time of one forward pass, after one warm-up pass."""
    import torch

    timings = []
    input_ids = input_ids.to(model.device)
    attention_mask = attention_mask.to(model.device) if attention_mask is not None else None
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=input_ids, attention_mask=attention_mask)
            if model.device.type == "cuda":
                torch.cuda.synchronize()  # kernels run asynchronously: time them to their end
            if i:
                timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)
