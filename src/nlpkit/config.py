"""THE schema: one pydantic model for every stage, recipe loading, KEY=VALUE overrides, did-you-mean.

A recipe is YAML. `nlpkit finetune RECIPE key=value ...` applies the overrides to the parsed YAML *before*
validation, so an override is checked exactly like a key written in the file. Every problem is collected and
reported at once as `dotted.key: problem (got X); did you mean Y?`.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nlpkit.errors import NlpkitError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name: str = "minilm"  # embedded alias (`nlpkit env` lists them), local directory, or hub id
    revision: str | None = None  # hub revision; ignored for local directories and aliases
    trust_remote_code: bool = False  # runs Python shipped with the model: only for models you trust
    allow_pickle: bool = False  # .bin/.pt weights can run code when loaded; safetensors only by default


class DataSection(Section):
    train: str  # catalog name (sst2, ag_news, ...), file, folder, or hub id; "NAME:split" picks a split
    eval: str | None = None  # same forms; default: the catalog's eval split, else no evaluation
    mirror: str | None = None  # local copy of catalog datasets (default: $NLPKIT_DATA_DIR)
    text_column: str | None = None  # default: the catalog's, else text/sentence/content/review
    text_pair_column: str | None = None  # second segment for pair tasks (NLI, QA relevance)
    label_column: str | None = None  # default: the catalog's, else label/labels
    label_names: dict[str, str] | None = None  # raw label value -> display name, e.g. {"0": negative}
    problem_type: Literal["auto", "single_label", "multi_label", "regression"] = "auto"
    max_length: int = Field(128, gt=0)  # tokens; longer inputs are truncated
    max_train_samples: int | None = Field(None, gt=0)  # seeded random subset, for quick runs
    max_eval_samples: int | None = Field(None, gt=0)
    # sft: how rows become conversations; auto detects from the columns (DESIGN.md section 5).
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = "auto"
    chat_template: str | None = None  # sft: a Jinja chat template (or a file holding one); default: the model's

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value):
        # YAML reads `{0: negative}` with int keys; labels are matched as text ("0"), as in the data files.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class TrainSection(Section):
    # Names copy transformers.TrainingArguments so what users know carries over.
    learning_rate: float = Field(5e-5, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = Field(32, gt=0)
    per_device_eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: float = Field(0.06, ge=0)  # < 1 is a fraction of all steps (transformers 5 semantics)
    lr_scheduler_type: str = "linear"
    seed: int = 42
    # bf16 autocast: "auto" turns it on where the hardware runs bf16 fast (CUDA with bf16, CPUs with avx512_bf16/AMX).
    bf16: Literal["auto"] | bool = "auto"
    # group_by_length batches similar lengths together: with dynamic padding, far less padding computed.
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "group_by_length"
    logging_steps: int = Field(50, gt=0)
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    eval_steps: int | None = Field(None, gt=0)
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(1, gt=0)
    completion_only: bool = True  # sft: loss on the answer (and its EOS) only; false trains on the prompt too
    packing: bool = False  # sft: pack examples into full-length rows (faster, mixes examples in one row)
    # NaN/inf gradients or a loss stuck at exactly 0: stop (exit 3, last good checkpoint kept) or only warn.
    watchdog: Literal["stop", "warn"] = "stop"
    # Other TrainingArguments fields, passed through as they are; names are checked against the class.
    extra: dict[str, Any] = Field(default_factory=dict)

    def trainer_kwargs(self, output_dir: Path, *, bf16: bool, has_eval: bool) -> dict:
        """This section as TrainingArguments keywords (SFTConfig and friends take the same), for every stage."""
        import torch

        copied = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "per_device_eval_batch_size", "gradient_accumulation_steps", "weight_decay", "warmup_steps",
                  "lr_scheduler_type", "seed", "train_sampling_strategy", "logging_steps", "eval_steps",
                  "save_strategy", "save_steps")
        return {
            "output_dir": str(output_dir / "checkpoints"),
            **{name: getattr(self, name) for name in copied},
            "bf16": bf16,
            "use_cpu": not torch.cuda.is_available(),  # transformers refuses CPU bf16 autocast without it
            "eval_strategy": self.eval_strategy if has_eval else "no",
            "report_to": "none",
            # Trainer would delete old checkpoints before the new one is committed (training.py): we rotate after.
            "save_total_limit": None,
            "logging_nan_inf_filter": False,  # Trainer would log a NaN loss as the mean of earlier ones: show it
            **self.extra,
        }


class PeftSection(Section):
    # Names copy peft's configs (LoraConfig.r, lora_alpha -> alpha, lora_dropout -> dropout).
    method: Literal["lora", "ia3", "prefix_tuning", "prompt_tuning"] = "lora"
    r: int = Field(8, gt=0)  # LoRA rank: higher = more capacity and memory
    alpha: float = Field(16, gt=0)  # LoRA scale is alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Default "all-linear": every attention and MLP linear layer (never the output head).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full and saved; a classifier head always is
    use_dora: bool = False  # weight-decomposed LoRA
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    num_virtual_tokens: int = Field(20, gt=0)  # prefix_tuning and prompt_tuning


PROMPT_METHODS = ("prefix_tuning", "prompt_tuning")


class QuantSection(Section):
    # bitsandbytes loading; names copy BitsAndBytesConfig (bnb_4bit_quant_type -> quant_type, ...).
    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"  # 4-bit matmuls; fp16 is slow on CPU


class GenerationSection(Section):
    max_new_tokens: int = Field(256, gt=0)  # end-of-run samples, `nlpkit chat`
    eos_check_prompts: int = Field(50, ge=0)  # held prompts generated after sft to measure the EOS stop rate


class Recipe(Section):
    stage: Literal["classify", "sft"]
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    peft: PeftSection | None = None  # absent: full fine-tuning
    quant: QuantSection | None = None  # absent: full precision
    generation: GenerationSection = Field(default_factory=GenerationSection)


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted KEY=VALUE overrides, validate everything, return the typed config."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.stem for p in recipes_dir().glob("*.yaml")) if recipes_dir().is_dir() else []
        hint = f"; shipped recipes: {', '.join(shipped)}" if shipped else ""
        raise NlpkitError(f"recipe {path}: no such file{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise NlpkitError(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise NlpkitError(f"recipe {path}: must be a mapping of sections (stage:, model:, data:, train:)")
    for override in overrides or []:
        apply_override(raw, override)
    return validate_recipe(raw, source=str(path))


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw recipe dict; the value is parsed as a YAML scalar (3e-5, true, null, [a, b])."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise NlpkitError(f"override {override!r}: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=3e-5")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise NlpkitError(f"override {override!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        cfg = Recipe.model_validate(raw)
    except ValidationError as e:
        raise NlpkitError("\n".join(f"{source}: {line}" for line in _describe(e))) from None
    problems = check_recipe(cfg)
    if problems:
        raise NlpkitError("\n".join(f"{source}: {p}" for p in problems))
    return cfg


def check_recipe(cfg: Recipe) -> list[str]:
    """Rules that span fields or sections. Returns every problem; never changes the config."""
    problems = []
    train = cfg.train
    if train.eval_strategy == "steps" and train.eval_steps is None:
        problems.append("train.eval_steps: required when train.eval_strategy is 'steps' (e.g. train.eval_steps=200)")
    if train.save_strategy == "steps" and train.save_steps is None:
        problems.append("train.save_steps: required when train.save_strategy is 'steps' (e.g. train.save_steps=500)")
    if cfg.data.problem_type == "regression" and cfg.data.label_names:
        problems.append("data.label_names: a regression target has no label names; remove it or change data.problem_type")
    if cfg.quant is not None and cfg.peft is None:
        problems.append("quant: quantized weights cannot be trained directly; add an adapter (a peft: section, or "
                        "--lora) for QLoRA, or remove quant")
    if cfg.peft is not None and cfg.peft.method != "lora" and (cfg.peft.use_dora or cfg.peft.use_rslora):
        problems.append(f"peft.use_dora/use_rslora: LoRA options, but peft.method is {cfg.peft.method!r}")
    if cfg.peft is not None and cfg.peft.method in PROMPT_METHODS:
        # Prompt learning adds virtual tokens; it wraps no layer, so layer options would be silently ignored.
        layer_options = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora")
        ignored = [f for f in layer_options if getattr(cfg.peft, f) != PeftSection.model_fields[f].default]
        if ignored:
            problems.append(f"peft.{ignored[0]}: has no effect with peft.method={cfg.peft.method} (it adds virtual "
                            "tokens, it wraps no layer); remove it or use lora/ia3")
    if cfg.quant is not None and cfg.quant.bits == 8 and cfg.quant.quant_type == "fp4":
        problems.append("quant.quant_type: fp4 is a 4-bit type; use bits=4 or drop quant_type")
    problems += _check_extra(train.extra, modeled=set(TrainSection.model_fields))
    return problems


def _check_extra(extra: dict, modeled: set[str]) -> list[str]:
    from transformers import TrainingArguments  # heavy import, only when extra keys are given

    allowed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    problems = []
    for key in extra:
        if key in modeled:
            problems.append(f"train.extra.{key}: set it as train.{key}, not under train.extra")
        elif key not in allowed:
            problems.append(f"train.extra.{key}: not a TrainingArguments field{_did_you_mean(key, allowed)}")
    return problems


def _describe(error: ValidationError) -> list[str]:
    lines = []
    for err in error.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            lines.append(f"{key}: unknown key{_did_you_mean(loc[-1], known)}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})")
    return lines


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def recipes_dir() -> Path:
    """The shipped recipes/ folder of a source checkout (installs with `pip install -e .` keep it)."""
    return Path(__file__).resolve().parents[2] / "recipes"
