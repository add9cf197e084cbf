"""`nlpkit plan RECIPE`: the resolved config, parameter counts and a peak-memory estimate, without training.

    nlpkit plan recipes/sft-dolly-lora.yaml
    nlpkit plan recipes/classify-sst2.yaml --memory 1GB          # suggestions when it will not fit
    nlpkit plan recipes/classify-sst2.yaml --num-processes 2      # global batch and per-process memory under DDP

The estimate adds up, from first principles, what a training process holds at its peak (the first steps: Trainer's
length-grouped sampler serves the longest batch first):

- framework: the resident memory of this very process after importing what the stage imports (torch,
  transformers, datasets, trl), measured, not guessed;
- data: the rows as read (measured while plan reads them: the real run reads them the same way) and their
  tokenized copy (tokens x columns x 8 bytes, Arrow int64);
- weights: parameters x bytes per parameter (fp32 4; 8-bit linear weights 1; 4-bit 0.5 plus block scales);
- gradients (fp32, trainable parameters) and AdamW's two fp32 moments (8 bytes per trainable parameter);
- bf16 autocast's cache: a bf16 copy of every trainable weight that goes through a matmul;
- activations kept for the backward pass: per layer, the tensors each op saves (norm inputs, projections, attention
  output, MLP intermediates, dropout masks, LoRA's dropped-out inputs), for the longest batch (batch x max_length);
- for causal LMs the logits: batch x length x vocabulary, in the autocast dtype, its fp32 upcast for the loss, the
  log-softmax saved by cross entropy, and its gradient.

Not modelled: allocator fragmentation and library caches; the figure is an estimate to compare with a budget, and
`nlpkit_run.json`'s `peak_memory_mb` is the measured truth.
"""

from __future__ import annotations

import re

from nlpkit.config import PROMPT_METHODS, Recipe
from nlpkit.errors import NlpkitError
from nlpkit.models import HEAD_MODULES, bf16_is_fast, resolve_model

MB = 1024 * 1024


def plan(cfg: Recipe, *, num_processes: int = 1, memory_mb: float | None = None) -> dict:
    """Resolved config, parameter counts and the memory estimate (with suggestions when over `memory_mb`)."""
    framework_mb = _import_stage_libraries(cfg.stage)
    data = _data_footprint(cfg)
    shape = model_shape(cfg, data["num_labels"])
    bf16 = bf16_is_fast() if cfg.train.bf16 == "auto" else cfg.train.bf16
    estimate = estimate_memory(cfg, shape, framework_mb=framework_mb, data_mb=data["mb"], bf16=bf16,
                               num_processes=num_processes)
    train = cfg.train
    result = {
        "config": cfg.model_dump(mode="json"),
        "parameters": {"total": shape["total"], "trainable": shape["trainable"],
                       "trainable_percent": round(100 * shape["trainable"] / shape["total"], 3)},
        "batch": {"per_device": train.per_device_train_batch_size, "num_processes": num_processes,
                  "gradient_accumulation_steps": train.gradient_accumulation_steps,
                  "global": train.per_device_train_batch_size * num_processes * train.gradient_accumulation_steps},
        "precision": "bf16 autocast" if bf16 else "fp32",
        "data": {"train_rows": data["rows"], "mean_tokens": round(data["mean_tokens"], 1)},
        "memory_mb": estimate,
    }
    if memory_mb is not None:
        result["budget_mb"] = memory_mb
        result["fits"] = estimate["total"] <= memory_mb
        if not result["fits"]:
            result["suggestions"] = suggestions(cfg, shape, framework_mb, data["mb"], bf16, num_processes, memory_mb)
    return result


# ---------------------------------------------------------------------------------------------- the estimate


def estimate_memory(cfg: Recipe, shape: dict, *, framework_mb: float, data_mb: float, bf16: bool,
                    num_processes: int = 1) -> dict:
    """Per-process peak memory in MB, by component."""
    trainable, matmul_trainable = shape["trainable"], shape["trainable_matmul"]
    weights = shape["weight_bytes"]
    grads = 4 * trainable
    optimizer = 8 * trainable  # AdamW: exp_avg and exp_avg_sq in fp32
    autocast_cache = 2 * matmul_trainable if bf16 else 0  # frozen weights are re-cast per op and freed, not cached
    # DDP keeps its gradient buckets beside .grad: one more fp32 copy of the trainable parameters.
    ddp_buckets = 4 * trainable if num_processes > 1 else 0
    tokens = cfg.train.per_device_train_batch_size * cfg.data.max_length
    activations = shape["num_layers"] * layer_activation_bytes(cfg, shape, tokens, bf16)
    logits = lm_logit_bytes(shape, tokens, bf16) if cfg.stage == "sft" else 0
    parts = {
        "framework": framework_mb,
        "data": data_mb,
        "weights": weights / MB,
        "gradients": grads / MB,
        "optimizer": optimizer / MB,
        "autocast_cache": autocast_cache / MB,
        "activations": activations / MB,
        "logits": logits / MB,
        "ddp_buckets": ddp_buckets / MB,
    }
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 1)
    return parts


def layer_activation_bytes(cfg: Recipe, shape: dict, tokens: int, bf16: bool) -> float:
    """Bytes one transformer layer saves for backward, for `tokens` = batch x length positions.

    Autograd keeps a matmul's input only when its weight trains: a frozen base (LoRA) keeps instead what LoRA's A
    needs, the dropped-out input of each adapted layer. Norms run in fp32 under autocast, so their inputs are kept in
    fp32; other tensors are kept in the autocast dtype. Nonlinearities keep their inputs (GELU; SiLU and the gate
    product of a gated MLP). Attention keeps q, k, v, its output and a logsumexp per head and position; with attention
    dropout the CPU kernel is the math path, which also keeps the probabilities and the mask (`attention_matrix`).
    """
    p = 2 if bf16 else 4
    h, i, kv, heads = shape["hidden"], shape["intermediate"], shape["kv_hidden"], shape["heads"]
    full = cfg.peft is None
    gated = shape["gated_mlp"]
    per_token = 2 * 4 * h * (2 if gated and full else 1)  # two norms' fp32 inputs (RMSNorm's scaled input too)
    per_token += p * (h + 2 * kv) + p * h + 4 * heads  # attention: q, k, v, output, logsumexp
    per_token += p * i if not gated else 3 * p * i  # GELU input, or SiLU input + act(gate) and up for the product
    if full:  # inputs of q/k/v (shared), out, up/gate (shared), down
        per_token += p * (3 * h + i)
    elif cfg.peft.method == "lora" and cfg.peft.dropout > 0:
        # Per adapted layer: dropout's 1-byte mask, and A's input (the dropped-out copy cast to the autocast dtype).
        per_token += shape["lora_input_width"] * (1 + p)
    elif cfg.peft.method == "lora":  # dropout 0: A keeps the layer's own input, as a trained matmul would
        per_token += p * (3 * h + i)
    if shape["hidden_dropout"] > 0:
        per_token += 2 * h  # 1-byte masks after attention and after the MLP
    per_layer = per_token * tokens
    if shape["attention_dropout"] > 0:
        per_layer += attention_matrix(cfg.train.per_device_train_batch_size, heads, cfg.data.max_length, p)
    return per_layer


def attention_matrix(batch: int, heads: int, seq: int, p: int) -> float:
    """The math attention path keeps the softmax probabilities, the dropout mask and the dropped-out probabilities."""
    return batch * heads * seq * seq * (p + 1 + p)


def lm_logit_bytes(shape: dict, tokens: int, bf16: bool) -> float:
    """Logits in the autocast dtype, the fp32 upcast the loss uses, cross entropy's saved log-softmax, and the
    logits' fp32 gradient, all alive at the start of the backward pass."""
    p = 2 if bf16 else 4
    return tokens * shape["vocab"] * (p + 4 + 4 + 4)


# ---------------------------------------------------------------------------------------------- the model


def model_shape(cfg: Recipe, num_labels: int) -> dict:
    """Parameter counts and the dimensions the estimate needs, from the config alone (weights on the meta device)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    source = resolve_model(cfg.model.name, cfg.model.allow_pickle)
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = AutoModelForCausalLM if cfg.stage == "sft" else AutoModelForSequenceClassification
    if cfg.stage == "classify":
        config.num_labels = max(num_labels, 1)
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()  # a tied LM head shares the embedding: one tensor, counted once
    total = sum(p.numel() for p in model.parameters())
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    heads = {name for name in linear if name.rsplit(".", 1)[-1] in HEAD_MODULES}
    body_linear = sum(m.weight.numel() for name, m in linear.items() if name not in heads)
    adapter, lora_inputs, targeted = _adapter(cfg, config, linear, heads)
    head = sum(p.numel() for name in heads for p in linear[name].parameters())
    if cfg.peft is None:
        trainable = total
        trainable_matmul = body_linear + head  # a tied LM head is the embedding, cast for its matmul
    else:
        trainable = adapter + (head if cfg.stage == "classify" else 0)  # peft trains a classifier head in full
        trainable_matmul = trainable
        total += adapter + (head if cfg.stage == "classify" else 0)  # modules_to_save keeps the original head too
    weight_bytes = 4 * total
    if cfg.quant is not None:  # linear layers (not heads) quantized; everything else stays fp32
        per_param = 1.0 if cfg.quant.bits == 8 else 0.5 + (0.127 if cfg.quant.double_quant else 0.5) / 8
        weight_bytes -= (4 - per_param) * body_linear
    return {
        "total": total, "trainable": trainable, "trainable_matmul": trainable_matmul, "weight_bytes": weight_bytes,
        "num_layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
        "kv_hidden": config.hidden_size * getattr(config, "num_key_value_heads", config.num_attention_heads)
        // config.num_attention_heads,
        "vocab": config.vocab_size, "gated_mlp": any(n.endswith("gate_proj") for n in linear),
        "hidden_dropout": getattr(config, "hidden_dropout_prob", 0.0) or 0.0,
        "attention_dropout": getattr(config, "attention_probs_dropout_prob", None)
        or getattr(config, "attention_dropout", 0.0) or 0.0,
        "lora_input_width": lora_inputs, "adapted_layers": targeted, "num_labels": num_labels,
    }


def _adapter(cfg: Recipe, config, linear: dict, heads: set) -> tuple[int, int, int]:
    """(adapter parameters, summed input width of adapted layers per layer, number of adapted modules)."""
    if cfg.peft is None:
        return 0, 0, 0
    method = cfg.peft.method
    if method in PROMPT_METHODS:
        virtual = cfg.peft.num_virtual_tokens
        if method == "prompt_tuning":
            return virtual * config.hidden_size, 0, 0
        return virtual * config.num_hidden_layers * 2 * config.hidden_size, 0, 0
    wanted = cfg.peft.target_modules
    chosen = [(name, m) for name, m in linear.items() if name not in heads and (
        wanted == "all-linear" or any(re.fullmatch(rf"(.*\.)?{re.escape(t)}", name) for t in wanted))]
    if not chosen:
        raise NlpkitError(f"peft.target_modules {wanted}: match no linear layer of {cfg.model.name}")
    if method == "ia3":
        return sum(m.out_features for _, m in chosen), 0, len(chosen)
    r = cfg.peft.r
    params = sum(r * (m.in_features + m.out_features) for _, m in chosen)
    if cfg.peft.use_dora:
        params += sum(m.out_features for _, m in chosen)
    width = sum(m.in_features for _, m in chosen) // config.num_hidden_layers
    return params, width, len(chosen)


# ---------------------------------------------------------------------------------------------- measured parts


def _rss_mb() -> float:
    """Current resident memory of this process (the real run's peak is its high-water mark)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / MB


def _import_stage_libraries(stage: str) -> float:
    """Import what a training run of this stage imports, then measure: the framework share of every run."""
    import datasets  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    if stage == "sft":
        from trl import SFTTrainer  # noqa: F401
    return _rss_mb()


def _data_footprint(cfg: Recipe) -> dict:
    """Read the training rows as the run does (measuring what they take), count labels and tokens."""
    from nlpkit.data import infer_label_space, open_source, resolve_columns

    data = cfg.data
    before = _rss_mb()
    rows = open_source(data.train, "train", "data.train", data.mirror)
    read_mb = max(_rss_mb() - before, 0.0)
    num_labels = 0
    texts = []
    if cfg.stage == "classify":
        text_col, pair_col, label_col = resolve_columns(rows, data.text_column, data.text_pair_column,
                                                        data.label_column)
        names = data.label_names or (rows.catalog.label_names if rows.catalog else None)
        num_labels = infer_label_space(rows, label_col, data.problem_type, names).num_labels
        texts = [str(row.get(text_col, "")) + " " + str(row.get(pair_col, "") if pair_col else "")
                 for row in rows.rows]
        columns = 4  # input_ids, token_type_ids, attention_mask, length
    else:
        texts = [" ".join(str(v) for v in row.values()) for row in rows.rows]
        columns = 3
    kept = min(len(texts), data.max_train_samples or len(texts))
    # Words x 1.3 approximates sub-word tokens without loading a tokenizer: a data-size term, not the peak's driver.
    mean_tokens = min(sum(len(t.split()) for t in texts) / max(len(texts), 1) * 1.3 + 2, data.max_length)
    tokenized = kept * mean_tokens * columns * 8
    return {"rows": len(rows.rows), "num_labels": num_labels, "mean_tokens": mean_tokens,
            "mb": read_mb + tokenized / MB}


# ---------------------------------------------------------------------------------------------- suggestions


def suggestions(cfg: Recipe, shape: dict, framework_mb: float, data_mb: float, bf16: bool, num_processes: int,
                budget_mb: float) -> list[dict]:
    """Changes that shrink the estimate, each with its override and the new total (computed, not guessed)."""
    from nlpkit.config import validate_recipe

    raw = cfg.model_dump(mode="json")
    train = cfg.train
    candidates = []
    if train.per_device_train_batch_size > 1:
        half = train.per_device_train_batch_size // 2
        candidates.append(({"train.per_device_train_batch_size": half,
                            "train.gradient_accumulation_steps": train.gradient_accumulation_steps * 2},
                           "halve the batch, double accumulation: the same global batch"))
    if cfg.data.max_length > 64:
        candidates.append(({"data.max_length": cfg.data.max_length // 2}, "halve the sequence length"))
    if not bf16 and bf16_is_fast():
        candidates.append(({"train.bf16": True}, "bf16 autocast: half-size activations"))
    if cfg.peft is None:
        candidates.append(({"peft.method": "lora"}, "train LoRA adapters (--lora): no full gradients or Adam states"))
    elif cfg.quant is None:
        candidates.append(({"quant.bits": 4}, "QLoRA (--bits 4): a 4-bit base"))
    current = estimate_memory(cfg, shape, framework_mb=framework_mb, data_mb=data_mb, bf16=bf16,
                              num_processes=num_processes)["total"]
    found = []
    for changes, why in candidates:
        changed = _with(raw, changes)
        new_cfg = validate_recipe(changed, source="plan")
        new_shape = model_shape(new_cfg, shape["num_labels"]) if "peft.method" in changes or "quant.bits" in changes \
            else shape
        total = estimate_memory(new_cfg, new_shape, framework_mb=framework_mb, data_mb=data_mb, bf16=bf16 or
                                changes.get("train.bf16", False), num_processes=num_processes)["total"]
        override = " ".join(f"{k}={v}" for k, v in changes.items())
        if total >= current:  # e.g. bf16's weight cache outweighs its activation savings on a tiny model
            continue
        found.append({"override": override, "why": why, "estimate_mb": total, "fits": total <= budget_mb})
    return sorted(found, key=lambda s: s["estimate_mb"])


def _with(raw: dict, changes: dict) -> dict:
    import copy

    changed = copy.deepcopy(raw)
    for key, value in changes.items():
        section, field = key.split(".")
        if changed.get(section) is None:
            changed[section] = {}
        changed[section][field] = value
    return changed


def parse_memory(text: str) -> float:
    """'8GB', '1.5G', '900MB', '900' (MB) -> MB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match:
        raise NlpkitError(f"--memory {text!r}: give a size such as 8GB, 1.5G or 900MB")
    value, unit = float(match.group(1)), match.group(2) or "mb"
    return value * 1024 if unit.startswith("g") else value
