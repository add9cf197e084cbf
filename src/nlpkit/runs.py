"""A finished run directory: what it holds, read from its manifest, and the one way to load its model.

Every command that takes a run (eval, chat, serve, quantize, merge, and rlhf's reward.model) opens it here. A run
directory holds the model (or an adapter with the base's config), the tokenizer and `nlpkit_run.json`, which is
written last: a folder with a manifest is a complete run.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nlpkit import models
from nlpkit.config import ModelSection, Recipe
from nlpkit.recipes import validate_recipe
from nlpkit.distributed import is_main_process, place, process_device
from nlpkit.errors import NlpkitError

MANIFEST = "nlpkit_run.json"
# What each stage's model is, as a transformers auto class: an rlhf run saves its policy, a causal LM like sft's.
AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "reward": "AutoModelForSequenceClassification",
                "sft": "AutoModelForCausalLM", "rlhf": "AutoModelForCausalLM", "dpo": "AutoModelForCausalLM",
                "kto": "AutoModelForCausalLM", "orpo": "AutoModelForCausalLM", "simpo": "AutoModelForCausalLM"}
CAUSAL_LM_STAGES = ("sft", "rlhf", "dpo", "kto", "orpo", "simpo")


@dataclass(frozen=True)
class Run:
    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def task(self) -> dict:
        """What training decided about the data: columns, labels, max_length, bf16, format."""
        return self.manifest["task"]

    @functools.cached_property
    def recipe(self) -> Recipe:
        return validate_recipe(self.manifest["config"], source=f"{self.path}/{MANIFEST}")

    @property
    def has_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    @property
    def is_causal_lm(self) -> bool:
        return self.stage in CAUSAL_LM_STAGES

    @property
    def auto_class(self):
        import transformers

        return getattr(transformers, AUTO_CLASSES[self.stage])


def claim_output_dir(out: Path) -> None:
    """Never train over an earlier run: its model and metrics would be lost."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NlpkitError(f"--output-dir {out}: already holds files; choose another --output-dir, delete it, or add "
                          "--resume to continue its run")
    out.mkdir(parents=True, exist_ok=True)


def is_run(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_run(path: str | Path) -> Run:
    path = Path(path)
    if not is_run(path):
        raise NlpkitError(f"{path}: no {MANIFEST}; give the output directory of a finished `nlpkit finetune` run")
    return Run(path, json.loads((path / MANIFEST).read_text()))


def write_manifest(output_dir: Path, manifest: dict) -> None:
    """Written last: a folder with a manifest is a complete run."""
    write_json(Path(output_dir) / MANIFEST, manifest)


def write_json(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_causal_lm(trainer, output_dir: Path, adapter: bool) -> None:
    """The trained model (with LoRA, only the adapter) and the tokenizer, then what an adapter save leaves out:
    config.json, which load_model reads to rebuild the base, and the generation settings the run used."""
    trainer.save_model(str(output_dir))
    if is_main_process():
        model = trainer.model.get_base_model() if adapter else trainer.model
        model.generation_config.save_pretrained(output_dir)
        if adapter:
            model.config.save_pretrained(output_dir)


def load_model(run: Run, *, quant=None, dequantize: bool = False, **kwargs):
    """The run's model in eval mode. An adapter run: its base (quantized as in training, or dequantized to fp32 with
    `dequantize`) with the adapter attached. A full fine-tune: the saved model, quantized on load with `quant`.
    Other keywords go to from_pretrained (quantize's baseline asks for dtype=float32)."""
    if not run.has_adapter:
        return place(models.load_model(run.auto_class, ModelSection(name=str(run.path)), quant=quant,
                                       frozen=True, **kwargs)).eval()
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, GenerationConfig

    cfg = run.recipe
    config = AutoConfig.from_pretrained(run.path)  # the run's labels and head size
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the recipe's quant section says how the base loads
    # Merging (dequantize) folds the adapter into fp32 weights, so the merged model equals what was trained.
    base = load_start(cfg.model, run.auto_class, quant=cfg.quant, frozen=True, config=config,
                      **({"dtype": torch.float32} if dequantize else {}) | kwargs)
    if dequantize and cfg.quant is not None:
        base = base.dequantize(dtype=torch.float32)
    if (run.path / "generation_config.json").is_file():  # the run's generation settings, not the base model's
        base.generation_config = GenerationConfig.from_pretrained(run.path)
    return place(PeftModel.from_pretrained(base, run.path)).eval()


def load_start(model_cfg, auto_class, *, quant=None, frozen: bool = False, **kwargs):
    """The model a run starts from: model.name as any reference (models.load_model), or a finished run of the same
    model class, with its adapter merged in. Merged, that run's model is the new run's base: its adapter (dpo on an
    sft run) trains on top and is disabled to give exactly the starting model, the reference. A causal LM run without
    an adapter (a full fine-tune or a merge) may also start a score-head model, as the reward stage loads it."""
    if not is_run(model_cfg.name):
        return models.load_model(auto_class, model_cfg, quant=quant, frozen=frozen, **kwargs)
    start = open_run(model_cfg.name)
    grows_a_head = start.is_causal_lm and not start.has_adapter and auto_class.__name__ == AUTO_CLASSES["reward"]
    if (start.auto_class is not auto_class and not grows_a_head) or quant is not None:
        raise NlpkitError(f"model.name {model_cfg.name}: a {start.stage} run, which cannot start this one"
                          f"{' with quant (merge it first: nlpkit merge)' if quant is not None else ''}")
    if not start.has_adapter:
        return models.load_model(auto_class, ModelSection(name=str(start.path)), frozen=frozen, **kwargs)
    kwargs.pop("config", None)  # the merged model's own config: the started run's
    dtype = kwargs.pop("dtype", None) or models.weights_dtype(model_cfg.dtype, frozen, process_device().type)
    model = load_model(start, dequantize=True, **kwargs).merge_and_unload()  # in fp32, then as the recipe says
    return model.to(dtype).requires_grad_(not frozen)


def load_tokenizer(run: Run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run.path)


def load_causal_lm(ref: str, **kwargs):
    """A causal LM to generate with and its tokenizer: an sft or rlhf run (full, or its adapter folded into the base
    unless the base is quantized), or any model reference (alias, directory, hub id) with a chat template and a pad
    token that is not its EOS. Other keywords go to from_pretrained (export asks for dtype=float32)."""
    from transformers import AutoModelForCausalLM

    if is_run(ref):
        run = open_run(ref)
        if not run.is_causal_lm:
            raise NlpkitError(f"{ref}: a {run.stage} run, not a causal LM (sft or rlhf) run")
        model = load_model(run, **kwargs)
        if run.has_adapter and run.recipe.quant is None:
            model = model.merge_and_unload()  # only generated with: no adapter matmuls per layer and token
        return model, load_tokenizer(run)
    model_cfg = ModelSection(name=ref)
    tokenizer = models.chat_tokenizer(models.load_tokenizer(model_cfg), None)
    return place(models.load_model(AutoModelForCausalLM, model_cfg, frozen=True, **kwargs)).eval(), tokenizer
