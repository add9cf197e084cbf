"""`nlpkit plan RECIPE`: the resolved config, parameter counts and a peak-memory estimate, without training.

    nlpkit plan sft-dolly-lora
    nlpkit plan classify-sst2 --memory 1GB          # suggestions when it will not fit
    nlpkit plan classify-sst2 --num-processes 2      # global batch and per-process memory under DDP
    nlpkit plan sft-dolly-lora --device cuda --memory 24GB   # GPU memory, weights as a GPU loads them

The estimate adds up, from first principles, what a training process holds at its peak (the first steps: Trainer's
length-grouped sampler serves the longest batch first):

- framework (CPU only): this very process's resident memory after importing what the stage imports, measured;
- data (CPU only): the rows as read (measured) and their tokenized copy (tokens x columns x 8 bytes);
- weights: parameters x bytes per parameter in the dtype a run loads them in (models.weights_dtype; 8-bit linear
  weights 1; 4-bit 0.5 plus block scales);
- gradients of the trainable parameters and AdamW's two moments, in the trainable parameters' dtype;
- bf16 autocast's cache: a bf16 copy of every trainable weight that goes through a matmul;
- activations kept for the backward pass: per layer, the tensors each op saves (norm inputs, projections, attention
  output, MLP intermediates, dropout masks, LoRA's dropped-out inputs), for the longest batch (batch x max_length);
  with activation checkpointing (trl's SFTConfig turns it on by default) only each layer's input, plus one layer
  recomputed at a time in the backward pass;
- for causal LMs the LM head: trl's fused head computes log-probabilities tile by tile (at most 4,096 positions x
  32,768 vocabulary entries), never the whole batch x length x vocabulary logits; the tile's backward temporaries
  are what it adds at the peak.

Not modelled: allocator fragmentation and library caches (why the estimate runs short with activation checkpointing
on). How close it comes, measured: docs/results.md; a run's `peak_memory_mb` is the measured truth.
"""

from __future__ import annotations

import re

from nlpkit import report
from nlpkit.config import PREFERENCE_STAGES, PROMPT_METHODS, Recipe
from nlpkit.errors import NlpkitError
from nlpkit.models import HEAD_MODULES, bf16_is_fast, resolve_model, weights_dtype

LM_STAGES = ("sft", *PREFERENCE_STAGES)  # causal LMs; a preference row is estimated as one sequence, not two

MB = 1024 * 1024


def plan(cfg: Recipe, *, num_processes: int = 1, memory_mb: float | None = None, device: str | None = None) -> dict:
    """Resolved config, parameter counts and the memory estimate (with suggestions when over `memory_mb`), for a
    process on `device` (cpu or cuda; default: this machine's). On cuda the estimate is GPU memory (what PyTorch's
    allocator holds: the CUDA context is not in it), with weights in the dtypes a run there loads them in."""
    import torch

    framework_mb = _import_stage_libraries(cfg.stage)
    data = _data_footprint(cfg)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = model_shape(cfg, data["num_labels"], device)
    # Planned for a GPU from elsewhere: one with bf16 (every GPU since the A100), as the usual case.
    gpu_bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if torch.cuda.is_available() else True
    bf16 = (gpu_bf16 if device == "cuda" else bf16_is_fast()) if cfg.train.bf16 == "auto" else cfg.train.bf16
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
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda" and torch.cuda.is_available()
        else device,
        "precision": f"weights {shape['weights_dtype']}, {'bf16 autocast' if bf16 else 'no autocast'}",
        "data": {"train_rows": data["rows"], "mean_tokens": round(data["mean_tokens"], 1)},
        "memory_mb": estimate,
    }
    if device == "cuda":  # what the process holds on the host besides the GPU's share
        result["host_memory_mb"] = {"framework": round(framework_mb, 1), "data": round(data["mb"], 1)}
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
    grads = shape["trained_bytes"] * trainable
    optimizer = 2 * shape["trained_bytes"] * trainable  # AdamW: exp_avg and exp_avg_sq, in the parameters' dtype
    autocast_cache = 2 * matmul_trainable if bf16 else 0  # frozen weights are re-cast per op and freed, not cached
    # DDP keeps its gradient buckets beside .grad: one more fp32 copy of the trainable parameters.
    ddp_buckets = 4 * trainable if num_processes > 1 else 0
    tokens = cfg.train.per_device_train_batch_size * cfg.data.max_length
    layer = layer_activation_bytes(cfg, shape, tokens, bf16)
    logits = lm_head_bytes(shape, tokens, bf16) if cfg.stage in LM_STAGES else 0
    recompute = 0.0
    if checkpointing(cfg):
        # Each layer keeps only its fp32 input; backward recomputes one layer at a time. The head's tiles are freed
        # before the first recompute, so the peak holds the larger of the two, not both.
        activations = shape["num_layers"] * 4 * tokens * shape["hidden"]
        recompute, logits = (layer, 0.0) if layer > logits else (0.0, logits)
    else:
        activations = shape["num_layers"] * layer
    # On a GPU the framework and the rows stay in host memory: the estimate is what the GPU holds.
    host = {} if shape["device"] == "cuda" else {"framework": framework_mb, "data": data_mb}
    parts = {
        **host,
        "weights": weights / MB,
        "gradients": grads / MB,
        "optimizer": optimizer / MB,
        "autocast_cache": autocast_cache / MB,
        "activations": activations / MB,
        "layer_recompute": recompute / MB,
        "lm_head": logits / MB,
        "ddp_buckets": ddp_buckets / MB,
    }
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 1)
    return parts


def checkpointing(cfg: Recipe) -> bool:
    """Activation checkpointing: as train.extra sets it; off otherwise (training.trainer_kwargs)."""
    extra = cfg.train.extra
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if key in extra:
            return bool(extra[key])
    return False


def layer_activation_bytes(cfg: Recipe, shape: dict, tokens: int, bf16: bool) -> float:
    """Bytes one transformer layer keeps for backward, for `tokens` = batch x length positions.

    The rules, each checked against the tensors autograd actually saves (torch.autograd.graph.saved_tensors_hooks)
    on MiniLM and SmolLM2:
    - a matmul keeps its input only when its weight trains; under autocast every linear casts its fp32 input to
      bf16 itself, so q, k and v each keep their own copy (in fp32 they share one);
    - LoRA's A keeps its dropped-out input (cast to the autocast dtype), and dropout keeps a mask in fp32 (peft
      casts the input to the adapter's fp32 dtype first), for every adapted layer; B keeps A's output;
    - norms keep their fp32 input; GELU keeps its input; a gated MLP keeps the gate, act(gate) and up;
    - attention without dropout goes through SDPA's fused kernel (q, k, v, the output, a logsumexp per head); with
      attention dropout (BERT in training) the CPU takes the math path in fp32, keeping q, k, v and three
      batch x heads x length x length tensors (probabilities, dropout mask, dropped probabilities);
    - hidden dropout keeps a mask in the autocast dtype after attention and after the MLP.
    """
    p = 2 if bf16 else 4
    h, i, kv, heads = shape["hidden"], shape["intermediate"], shape["kv_hidden"], shape["heads"]
    batch, seq = cfg.train.per_device_train_batch_size, cfg.data.max_length
    full, gated = cfg.peft is None, shape["gated_mlp"]
    per_token = 2 * 4 * h  # two norms' fp32 inputs
    per_token += 3 * p * i if gated else p * i  # gate, act(gate), up; or GELU's input
    if full:  # linear inputs: q/k/v (a cast each under autocast), out, up (and gate), down
        qkv, up = (3, 2 if gated else 1) if bf16 else (1, 1)
        per_token += p * ((qkv + 1 + up) * h + i)
    elif cfg.peft.method == "lora":
        width = shape["lora_input_width"]
        mask = 0 if cfg.peft.dropout == 0 else 4 * width
        per_token += p * width + mask + p * cfg.peft.r * shape["adapted_per_layer"]
    if shape["attention_dropout"] > 0:
        per_token += 3 * 4 * h
        per_layer_extra = 3 * 4 * batch * heads * seq * seq
    else:
        per_token += p * (h + 2 * kv) + p * h + 4 * heads
        per_layer_extra = 0
    if shape["hidden_dropout"] > 0:
        per_token += 2 * p * h
    return per_token * tokens + per_layer_extra


def lm_head_bytes(shape: dict, tokens: int, bf16: bool) -> float:
    """trl's SFTTrainer never builds the full logits: its fused LM head walks tiles of at most 4,096 positions x
    32,768 vocabulary entries (trl/kernels/chunked_logprob.py). On CPU the backward of one tile holds, at once, the
    matmul buffer (autocast dtype), five fp32 tiles (the logits, scaled logits, log-probabilities, probabilities,
    the gradient), the target mask (1 byte) and two fp32 temporaries of the gradient update; plus the fp32
    gradient of the hidden states."""
    p = 2 if bf16 else 4
    tile = min(tokens, 4096) * min(shape["vocab"], 32768)
    return tile * (p + 5 * 4 + 1 + 2 * 4) + tokens * shape["hidden"] * 4


# ---------------------------------------------------------------------------------------------- the model


def model_shape(cfg: Recipe, num_labels: int, device: str = "cpu") -> dict:
    """Parameter counts, weight bytes as a run on `device` loads them (models.weights_dtype), and the dimensions the
    estimate needs, from the config alone (weights on the meta device)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    source = resolve_model(cfg.model.name, cfg.model.allow_pickle)
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = AutoModelForCausalLM if cfg.stage in LM_STAGES else AutoModelForSequenceClassification
    if cfg.stage == "classify":
        config.num_labels = max(num_labels, 1)
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()  # a tied LM head shares the embedding: one tensor, counted once
    total = sum(p.numel() for p in model.parameters())
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    heads = {name for name in linear if name.rsplit(".", 1)[-1] in HEAD_MODULES}
    body_linear = sum(m.weight.numel() for name, m in linear.items() if name not in heads)
    adapter, chosen, targeted = _adapter(cfg, config, linear, heads)
    layers = config.num_hidden_layers
    head = sum(p.numel() for name in heads for p in linear[name].parameters())
    if cfg.peft is None:
        trainable = total
        trainable_matmul = body_linear + head  # a tied LM head is the embedding, cast for its matmul
    else:
        trainable = adapter + (head if cfg.stage == "classify" else 0)  # peft trains a classifier head in full
        trainable_matmul = trainable
        total += adapter + (head if cfg.stage == "classify" else 0)  # modules_to_save keeps the original head too
    frozen_dtype = weights_dtype(cfg.model.dtype, frozen=True, device_type=device)
    # Full fine-tuning trains the loaded weights; peft keeps adapters (and the heads it trains) in fp32.
    trained_dtype = weights_dtype(cfg.model.dtype, frozen=False, device_type=device) if cfg.peft is None \
        else torch.float32
    frozen_bytes, trained_bytes = frozen_dtype.itemsize, trained_dtype.itemsize
    weight_bytes = trained_bytes * trainable + frozen_bytes * (total - trainable)
    if cfg.quant is not None:  # linear layers (not heads) quantized; everything else as the frozen dtype
        per_param = 1.0 if cfg.quant.bits == 8 else 0.5 + (0.127 if cfg.quant.double_quant else 0.5) / 8
        weight_bytes -= (frozen_bytes - per_param) * body_linear
    return {
        "total": total, "trainable": trainable, "trainable_matmul": trainable_matmul, "weight_bytes": weight_bytes,
        "trained_bytes": trained_bytes, "device": device,
        "weights_dtype": str(frozen_dtype if cfg.peft is not None else trained_dtype).removeprefix("torch."),
        "num_layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
        "kv_hidden": config.hidden_size * getattr(config, "num_key_value_heads", config.num_attention_heads)
        // config.num_attention_heads,
        "vocab": config.vocab_size, "gated_mlp": any(n.endswith("gate_proj") for n in linear),
        "hidden_dropout": getattr(config, "hidden_dropout_prob", 0.0) or 0.0,
        "attention_dropout": getattr(config, "attention_probs_dropout_prob", None)
        or getattr(config, "attention_dropout", 0.0) or 0.0,
        "lora_input_width": sum(m.in_features for _, m in chosen) // layers, "adapted_per_layer": targeted // layers,
        "num_labels": num_labels,
    }


def _adapter(cfg: Recipe, config, linear: dict, heads: set) -> tuple[int, int, int]:
    """(adapter parameters, the adapted (name, linear) pairs for LoRA, number of adapted modules)."""
    if cfg.peft is None:
        return 0, [], 0
    method = cfg.peft.method
    if method in PROMPT_METHODS:
        virtual = cfg.peft.num_virtual_tokens
        if method == "prompt_tuning":
            return virtual * config.hidden_size, [], 0
        return virtual * config.num_hidden_layers * 2 * config.hidden_size, [], 0
    wanted = cfg.peft.target_modules
    chosen = [(name, m) for name, m in linear.items() if name not in heads and (
        wanted == "all-linear" or any(re.fullmatch(rf"(.*\.)?{re.escape(t)}", name) for t in wanted))]
    if not chosen:
        raise NlpkitError(f"peft.target_modules {wanted}: match no linear layer of {cfg.model.name}")
    if method == "ia3":
        return sum(m.out_features for _, m in chosen), [], len(chosen)
    r = cfg.peft.r
    params = sum(r * (m.in_features + m.out_features) for _, m in chosen)
    if cfg.peft.use_dora:
        params += sum(m.out_features for _, m in chosen)
    return params, chosen, len(chosen)


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
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - every run writes TensorBoard events
    from transformers import Trainer  # noqa: F401

    if stage in LM_STAGES:
        from trl import SFTTrainer  # noqa: F401 - the preference trainers import as much
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
    import copy

    from nlpkit.recipes import validate_recipe
    from nlpkit.recipes import apply_override

    raw = {section: value for section, value in cfg.model_dump(mode="json").items() if value is not None}
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
    if not checkpointing(cfg):
        candidates.append(({"train.extra.gradient_checkpointing": True},
                           "activation checkpointing: keep layer inputs only, recompute in backward (slower)"))
    if cfg.peft is None:
        candidates.append(({"peft.method": "lora"}, "train LoRA adapters (--lora): no full gradients or Adam states"))
    elif cfg.quant is None:
        candidates.append(({"quant.bits": 4}, "QLoRA (--bits 4): a 4-bit base"))
    current = estimate_memory(cfg, shape, framework_mb=framework_mb, data_mb=data_mb, bf16=bf16,
                              num_processes=num_processes)["total"]
    found = []
    for changes, why in candidates:
        changed = copy.deepcopy(raw)
        for key, value in changes.items():
            apply_override(changed, f"{key}={value}")
        new_cfg = validate_recipe(changed, source="plan")
        reshaped = "peft.method" in changes or "quant.bits" in changes
        new_shape = model_shape(new_cfg, shape["num_labels"], shape["device"]) if reshaped else shape
        total = estimate_memory(new_cfg, new_shape, framework_mb=framework_mb, data_mb=data_mb, bf16=bf16 or
                                changes.get("train.bf16", False), num_processes=num_processes)["total"]
        override = " ".join(f"{k}={v}" for k, v in changes.items())
        if total >= current:  # e.g. bf16's weight cache outweighs its activation savings on a tiny model
            continue
        found.append({"override": override, "why": why, "estimate_mb": total, "fits": total <= budget_mb})
    return sorted(found, key=lambda s: s["estimate_mb"])


def parse_memory(text: str) -> float:
    """'8GB', '1.5G', '900MB', '900' (MB) -> MB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match:
        raise NlpkitError(f"--memory {text!r}: give a size such as 8GB, 1.5G or 900MB")
    value, unit = float(match.group(1)), match.group(2) or "mb"
    return value * 1024 if unit.startswith("g") else value


def print_plan(result: dict) -> None:
    """The plan as a person reads it, on stderr (--json prints the dict instead)."""
    import yaml

    report.info(yaml.safe_dump(result["config"], sort_keys=False).rstrip())
    params, batch, memory = result["parameters"], result["batch"], result["memory_mb"]
    report.info(f"parameters: {params['trainable']:,} trainable of {params['total']:,} ({params['trainable_percent']}%)")
    report.info(f"batch: {batch['per_device']} per device x {batch['num_processes']} process(es) x "
                f"{batch['gradient_accumulation_steps']} accumulation = {batch['global']} global")
    report.info(f"device: {result['device']}; precision: {result['precision']}; train rows: "
                f"{result['data']['train_rows']:,}")
    per = " per process" if batch["num_processes"] > 1 else ""
    where = " on the GPU (allocator; the CUDA context comes on top)" if "host_memory_mb" in result else ""
    report.info(f"estimated peak memory{per}{where}: {memory['total']:,.0f} MB")
    for key, value in memory.items():
        if key != "total" and value:
            report.info(f"  {key:16s} {value:9,.0f} MB")
    if "fits" in result:
        report.info(f"budget {result['budget_mb']:,.0f} MB: {'fits' if result['fits'] else 'does NOT fit'}")
    for s in result.get("suggestions", []):
        report.info(f"  try {s['override']:60s} ~{s['estimate_mb']:,.0f} MB{' (fits)' if s['fits'] else ''}: {s['why']}")
