"""The peft: section -> a peft config, applied to a model (with k-bit preparation for QLoRA); merging a run's adapter.

LoRA trains h = W0·x + (alpha/r)·B·A·x on chosen linear layers, with B = 0 at the start, so training begins exactly
at the base model and only A, B (and the task head) move. IA3 learns per-channel scales; prefix and prompt tuning
learn virtual tokens and leave every layer as it was.
"""

from __future__ import annotations

from pathlib import Path

from nlpkit import report, runs
from nlpkit.config import PROMPT_METHODS, PeftSection
from nlpkit.errors import NlpkitError
from nlpkit.models import keep_4bit_weights_unpacked

# Inputs for merge's logits check, by what the run's model reads: varied lengths, one text each.
MERGE_CHECK_TEXTS = {
    "classify": ["a gripping, beautifully acted film.", "the plot is thin and the jokes fall flat.",
                 "Stocks rallied after the central bank held rates steady.",
                 "The team clinched the title with a late goal in extra time."],
    "reward": ["Human: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then let it rise.",
               "Human: Tell me a joke.\n\nAssistant: No."],
    "sft": ["What is the capital of France?", "Give me three tips for staying healthy."],
}
for _stage in ("rlhf", "dpo", "kto", "orpo", "simpo"):  # causal LMs, like sft's
    MERGE_CHECK_TEXTS[_stage] = MERGE_CHECK_TEXTS["sft"]


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
        keep_4bit_weights_unpacked(model, training=True)
    try:
        model = get_peft_model(model, peft_config(section, task_type))
    except NoMatchingPeftModuleError:
        raise NlpkitError(
            f"peft.target_modules {section.target_modules}: match no layer of this model; its linear layers are "
            f"{', '.join(linear_layer_names(model))} (or use all-linear)"
        ) from None
    refuse_untrainable(model, section.method)
    trainable_in_fp32(model)  # peft upcasts LoRA weights over a bf16 base, not the head copies it trains
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


def linear_layer_names(model) -> list[str]:
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def merge_run(run: runs.Run, output_dir: Path) -> dict:
    """Fold a run's LoRA/IA3 adapter into its base, save a plain model, and measure how far its logits moved.

    A quantized base is dequantized first, so the merged weights equal what the adapter was trained against.
    """
    import torch

    cfg = run.recipe
    if not run.has_adapter or cfg.peft is None:
        raise NlpkitError(f"{run.path}: no adapter in this run (a full fine-tune): the folder already holds a plain "
                          "model; merge is for runs trained with a peft: section or --lora")
    refuse_unmergeable(run)
    tokenizer = runs.load_tokenizer(run)
    inputs = tokenizer(MERGE_CHECK_TEXTS[run.stage], padding=True, truncation=True, max_length=128,
                       return_tensors="pt")
    with torch.inference_mode():
        adapter = runs.load_model(run)
        adapter_logits = adapter(**inputs.to(adapter.device)).logits.float().cpu()
        del adapter
        merged = runs.load_model(run, dequantize=True).merge_and_unload()
        merged_logits = merged(**inputs.to(merged.device)).logits.float().cpu()
        merged.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        reloaded = run.auto_class.from_pretrained(output_dir, use_safetensors=True).eval()  # on the CPU
        reloaded_logits = reloaded(**inputs.to("cpu")).logits.float()
    # The merged folder is a plain run of the same task: `nlpkit eval` and `quantize` take it like any other.
    manifest = {**run.manifest, "config": run.manifest["config"] | {"peft": None, "quant": None},
                "merged_from": str(run.path)}
    runs.write_manifest(output_dir, manifest)
    return {
        "output_dir": str(output_dir),
        "base_quantized_bits": cfg.quant.bits if cfg.quant else None,
        "max_abs_logits_diff": float((adapter_logits - merged_logits).abs().max()),
        "reload_max_abs_logits_diff": float((merged_logits - reloaded_logits).abs().max()),
        "inputs": len(MERGE_CHECK_TEXTS[run.stage]),
    }


def refuse_unmergeable(run: runs.Run) -> None:
    """Prompt and prefix tuning learn virtual tokens, not weights: nothing can fold them into a plain model (merge,
    export)."""
    if run.has_adapter and run.recipe.peft is not None and run.recipe.peft.method in PROMPT_METHODS:
        raise NlpkitError(f"{run.path}: a {run.recipe.peft.method} adapter adds virtual tokens and changes no weight, "
                          "so nothing can fold it into a plain model; use the run directory as it is (chat, serve, eval)")


def trainable_in_fp32(model) -> None:
    """Adapters and head copies train in fp32 over a bf16 base (AdamW updates vanish in bf16's 8-bit mantissa)."""
    import torch

    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
