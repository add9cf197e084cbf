"""The peft: section -> a peft config, applied to a model (with k-bit preparation for QLoRA); merging a run's adapter.

LoRA trains h = W0·x + (alpha/r)·B·A·x on chosen linear layers, with B = 0 at the start, so training begins exactly
at the base model and only A, B (and the task head) move. IA3 learns per-channel scales; prefix and prompt tuning
learn virtual tokens and leave every layer as it was.
"""

from __future__ import annotations

from pathlib import Path

from nlpkit import report
from nlpkit.config import PROMPT_METHODS, PeftSection, validate_recipe
from nlpkit.errors import NlpkitError
from nlpkit.models import load_model
from nlpkit.report import MANIFEST, read_manifest, write_json


def peft_config(section: PeftSection, task_type: str):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    extra_trained = section.modules_to_save or None  # SEQ_CLS adds the classifier head by itself
    if section.method == "lora":
        return LoraConfig(
            task_type=task_type, r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
            target_modules=section.target_modules, modules_to_save=extra_trained,
            use_dora=section.use_dora, use_rslora=section.use_rslora,
        )
    if section.method == "ia3":
        # Default: peft's per-architecture attention + feed-forward choice. With an explicit list, every module
        # gets an output scale (feed-forward modules would scale inputs; we cannot tell them apart by name).
        explicit = section.target_modules != "all-linear"
        return IA3Config(task_type=task_type, target_modules=section.target_modules if explicit else None,
                         feedforward_modules=[] if explicit else None, modules_to_save=extra_trained)
    config_class = PrefixTuningConfig if section.method == "prefix_tuning" else PromptTuningConfig
    return config_class(task_type=task_type, num_virtual_tokens=section.num_virtual_tokens,
                        modules_to_save=extra_trained)


def apply_peft(model, section: PeftSection, task_type: str):
    """Wrap the model with the adapter; base weights are frozen. Quantized models get k-bit preparation first."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from peft.utils.error import NoMatchingPeftModuleError

    if getattr(model, "is_quantized", False):
        # Freezes the base, upcasts norms to fp32 and lets inputs carry grads; checkpointing off: on CPU it costs
        # a second forward and memory is rarely the limit at these sizes.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_unpacked(model)
    try:
        model = get_peft_model(model, peft_config(section, task_type))
    except NoMatchingPeftModuleError:
        raise NlpkitError(
            f"peft.target_modules {section.target_modules}: match no layer of this model; its linear layers are "
            f"{', '.join(linear_layer_names(model))} (or use all-linear)"
        ) from None
    refuse_untrainable(model, section.method)
    report.print_parameters(model)
    return model


def refuse_untrainable(model, method: str) -> None:
    """Prefix tuning reaches every layer through the model's past-key-values input, and peft refuses model classes
    where it finds none (BERT-style classifiers under transformers 5.24, which renamed it to `cache`). That would fail
    in the first training step: a two-token forward finds out before training starts."""
    import torch

    if method != "prefix_tuning":
        return
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long, device=model.device))
    except ValueError as e:
        base = type(model.get_base_model()).__name__
        raise NlpkitError(f"peft.method=prefix_tuning: cannot train {base} (model type {model.config.model_type}): "
                          f"{e} Use prompt_tuning (virtual tokens in the input), lora or ia3") from None


def keep_4bit_weights_unpacked(model) -> None:
    """bitsandbytes on avx512_bf16 CPUs repacks a 4-bit weight in place on its first eval-mode, no-grad forward;
    after that, training goes through gemv_4bit, which has no autograd kernel, and LoRA gradients come out wrong
    with only a warning (STACK.md trap 2). Keeping weights unpacked makes every forward take the exact path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_layer_names(model) -> list[str]:
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def load_adapter_run(run_dir: Path, auto_class, *, dequantize: bool = False):
    """A run's base model (quantized as in training, or dequantized to fp32) with the run's adapter attached."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, GenerationConfig

    cfg = validate_recipe(read_manifest(run_dir)["config"], source=f"{run_dir}/{MANIFEST}")
    config = AutoConfig.from_pretrained(run_dir)  # the run's labels and head size
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the recipe's quant section says how the base loads
    base = load_model(auto_class, cfg.model, quant=cfg.quant, config=config)
    if dequantize and cfg.quant is not None:
        base = base.dequantize(dtype=torch.float32)
    if (run_dir / "generation_config.json").is_file():  # the run's generation settings, not the base model's
        base.generation_config = GenerationConfig.from_pretrained(run_dir)
    return PeftModel.from_pretrained(base, run_dir).eval()


def merge_run(run_dir: Path, output_dir: Path, auto_class, sample_texts: list[str]) -> dict:
    """Fold a run's LoRA/IA3 adapter into its base, save a plain model, and measure how far its logits moved.

    A quantized base is dequantized first, so the merged weights equal what the adapter was trained against.
    """
    import torch
    from transformers import AutoTokenizer

    cfg = validate_recipe(read_manifest(run_dir)["config"], source=f"{run_dir}/{MANIFEST}")
    if not (run_dir / "adapter_config.json").is_file() or cfg.peft is None:
        raise NlpkitError(f"{run_dir}: no adapter in this run (a full fine-tune): the folder already holds a plain "
                          "model; merge is for runs trained with a peft: section or --lora")
    if cfg.peft.method in PROMPT_METHODS:
        raise NlpkitError(f"{run_dir}: a {cfg.peft.method} adapter adds virtual tokens and changes no weight, so "
                          "there is nothing to merge; use the run directory as it is")
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    inputs = tokenizer(sample_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        adapter_logits = load_adapter_run(run_dir, auto_class)(**inputs).logits.float()
        merged = load_adapter_run(run_dir, auto_class, dequantize=True).merge_and_unload()
        merged_logits = merged(**inputs).logits.float()
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        reloaded = auto_class.from_pretrained(output_dir, use_safetensors=True).eval()
        reloaded_logits = reloaded(**inputs).logits.float()
    # The merged folder is a plain run of the same task: `nlpkit eval` and `quantize` take it like any other.
    manifest = read_manifest(run_dir)
    manifest["config"] |= {"peft": None, "quant": None}
    manifest["merged_from"] = str(run_dir)
    write_json(output_dir / MANIFEST, manifest)
    return {
        "output_dir": str(output_dir),
        "base_quantized_bits": cfg.quant.bits if cfg.quant else None,
        "max_abs_logits_diff": float((adapter_logits - merged_logits).abs().max()),
        "reload_max_abs_logits_diff": float((merged_logits - reloaded_logits).abs().max()),
        "inputs": len(sample_texts),
    }


def trainable_in_fp32(model) -> None:
    """Adapters and head copies train in fp32 over a bf16 base (AdamW updates vanish in bf16's 8-bit mantissa)."""
    import torch

    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
