"""Recipe files: YAML read into THE schema (config.py), KEY=VALUE overrides applied first, the rules that span
sections (`check_recipe`), and the shipped recipes. Every problem is collected and reported at once as
`dotted.key: problem (got X); did you mean Y?` (the wording: errors.py).

The shipped recipes are the YAML files beside this module: package data, so a wheel install has them too.
`nlpkit finetune classify-sst2` (a bare name) finds one; `nlpkit recipes --copy NAME` writes one out to edit (as
torchtune's `tune cp`). In a source checkout, the top-level `recipes` is a symlink to this folder, so the paths the
docs used (`recipes/classify-sst2.yaml`) still work.

`nlpkit finetune RECIPE key=value ...` applies the overrides to the parsed YAML *before* validation, so an override is
checked exactly like a key written in the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import shutil
from pathlib import Path

import yaml
from pydantic import ValidationError

from nlpkit.config import (LOSS_TYPES, PREFERENCE_STAGES, PROMPT_METHODS, DPOSection, GRPOSection, PeftSection,
                           PPOSection, Recipe, TrainSection)
from nlpkit.errors import NlpkitError, describe_validation, did_you_mean


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted KEY=VALUE overrides, validate everything, return the typed config."""
    path = find_recipe(path)
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


def recipes_dir() -> Path:
    """The shipped recipes: this package's folder (in a source checkout and in a wheel install alike)."""
    return Path(__file__).resolve().parent


def shipped() -> dict[str, str]:
    """The shipped recipes: name (what `nlpkit finetune NAME` takes) -> its first comment line."""
    listed = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        listed[path.stem] = first[1:].strip()
    return listed


def find_recipe(reference: str | Path) -> Path:
    """A recipe file: the path as given where it exists, else the shipped recipe of that name (`classify-sst2`)."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and (recipes_dir() / f"{name}.yaml").is_file():
        return recipes_dir() / f"{name}.yaml"
    raise NlpkitError(f"recipe {reference}: no such file, and no shipped recipe of that name; {_closest(name)} "
                      "(`nlpkit recipes` lists them)")


def copy_recipe(name: str, destination: Path | None = None) -> Path:
    """Write a shipped recipe out to edit: into DESTINATION (a folder, default the working directory) as NAME.yaml,
    or to DESTINATION itself where it ends in .yaml. Never overwrites."""
    name = name.removesuffix(".yaml")
    if name not in shipped():
        raise NlpkitError(f"recipes --copy {name}: not a shipped recipe; {_closest(name)}")
    destination = Path(destination or ".").expanduser()
    target = destination if destination.suffix in (".yaml", ".yml") else destination / f"{name}.yaml"
    if target.exists():
        raise NlpkitError(f"recipes --copy {name}: {target} already exists; remove it or name another folder or file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipes_dir() / f"{name}.yaml", target)
    return target


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name, list(shipped()), n=1)
    return f"did you mean {close[0]!r}?" if close else f"shipped recipes: {', '.join(shipped())}"


# ---------------------------------------------------------------------------------------------- validation


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        cfg = Recipe.model_validate(raw)
    except ValidationError as e:
        raise NlpkitError("\n".join(f"{source}: {line}" for line in describe_validation(e, Recipe))) from None
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
    if train.global_batch_size is not None and "per_device_train_batch_size" in train.model_fields_set:
        problems.append("train.global_batch_size: set it or train.per_device_train_batch_size, not both (the "
                        "per-device batch follows from the global one)")
    if train.save_strategy == "steps" and train.save_steps is None:
        problems.append("train.save_steps: required when train.save_strategy is 'steps' (e.g. train.save_steps=500)")
    if cfg.data.problem_type == "regression" and cfg.data.label_names:
        problems.append("data.label_names: a regression target has no label names; remove it or change data.problem_type")
    if cfg.model.dtype == "float16" and cfg.peft is None:
        problems.append("model.dtype: float16 weights cannot be trained directly (fp16 gradients underflow and the "
                        "loss scaler refuses them); use bfloat16 or auto, or train an adapter (--lora)")
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
    missing = [name for name in train.report_to if importlib.util.find_spec(name) is None]  # installed, not imported
    if missing:
        problems.append(f"train.report_to: {missing[0]} is not installed; pip install \"nlpkit[{missing[0]}]\"")
    problems += _check_rlhf(cfg) + _check_preference(cfg)
    problems += _check_extra(train.extra, modeled=set(TrainSection.model_fields), stage=cfg.stage)
    return problems


def _check_rlhf(cfg: Recipe) -> list[str]:
    problems = []
    if cfg.stage != "rlhf":
        for name in ("reward", "ppo", "grpo"):
            if getattr(cfg, name) is not None:
                problems.append(f"{name}: only used by stage: rlhf (this recipe is stage: {cfg.stage}); remove it")
        return problems
    if cfg.reward is None or (cfg.reward.model is None and not cfg.reward.function):
        problems.append("reward: rlhf needs a reward; set reward.model (a `stage: reward` run) and/or "
                        "reward.function (module:function)")
    weights = cfg.reward.function_weight if cfg.reward is not None else None
    if isinstance(weights, list) and len(weights) != len(cfg.reward.function):
        problems.append(f"reward.function_weight: {len(weights)} weights for {len(cfg.reward.function)} functions; "
                        "give one weight per reward.function, in order (or one number for all)")
    if cfg.quant is not None:
        problems.append("quant: rlhf trains in full precision here; remove quant")
    if cfg.peft is not None and cfg.peft.method != "lora":
        problems.append(f"peft.method: rlhf takes lora (the reference is the disabled adapter), got {cfg.peft.method}")
    if cfg.algo != "ppo":
        if cfg.ppo is not None:
            problems.append(f"ppo: settings of algo ppo, but algo is {cfg.algo}; use the grpo: section")
        generations = (cfg.grpo or GRPOSection()).num_generations
        if cfg.train.per_device_train_batch_size % generations:
            problems.append(f"train.per_device_train_batch_size: {cfg.train.per_device_train_batch_size} is not a "
                            f"multiple of grpo.num_generations {generations} (each prompt's completions form a group)")
        return problems
    if cfg.grpo is not None:
        problems.append("grpo: settings of algo grpo/rloo, but algo is ppo; use the ppo: section or set algo")
    ppo = cfg.ppo or PPOSection()
    if ppo.batch_size % ppo.num_mini_batches:
        problems.append(f"ppo.num_mini_batches: {ppo.num_mini_batches} does not divide ppo.batch_size "
                        f"{ppo.batch_size}; every minibatch must be the same size (e.g. ppo.batch_size="
                        f"{ppo.num_mini_batches * max(1, ppo.batch_size // ppo.num_mini_batches)})")
    elif (ppo.batch_size // ppo.num_mini_batches) % cfg.train.gradient_accumulation_steps:
        problems.append(f"train.gradient_accumulation_steps: {cfg.train.gradient_accumulation_steps} does not divide "
                        f"the minibatch size {ppo.batch_size // ppo.num_mini_batches} (ppo.batch_size / "
                        "ppo.num_mini_batches)")
    if ppo.kl_target is not None and ppo.kl_coef == 0:
        problems.append("ppo.kl_target: the adaptive controller scales ppo.kl_coef, which is 0 and would stay 0; "
                        "start it above 0 (e.g. ppo.kl_coef=0.05)")
    if cfg.train.extra:
        key = next(iter(cfg.train.extra))
        hint = "use ppo.max_grad_norm" if key == "max_grad_norm" else "remove it"
        problems.append(f"train.extra.{key}: algo ppo is nlpkit's own loop, not a transformers Trainer, and reads no "
                        f"train.extra field; {hint}")
    if ppo.whiten_rewards and ppo.batch_size // ppo.num_mini_batches < 8:
        problems.append("ppo.whiten_rewards: needs at least 8 episodes per minibatch (ppo.batch_size / "
                        "ppo.num_mini_batches); raise ppo.batch_size or turn it off")
    return problems


def _check_preference(cfg: Recipe) -> list[str]:
    if cfg.stage not in PREFERENCE_STAGES:
        return [f"dpo: only used by stages {', '.join(PREFERENCE_STAGES)} (this recipe is stage: {cfg.stage}); "
                "remove it"] if cfg.dpo is not None else []
    given, allowed = (cfg.dpo or DPOSection()).loss_type, LOSS_TYPES[cfg.stage]
    if given is not None and not allowed:
        return [f"dpo.loss_type: stage {cfg.stage} has one loss, no choice of it (got {given!r}); remove it"]
    unknown = [name for name in ([given] if isinstance(given, str) else given or []) if name not in allowed]
    return [f"dpo.loss_type: {name!r} is not a loss of stage {cfg.stage} (trl's: {', '.join(allowed)})"
            f"{did_you_mean(name, allowed)}" for name in unknown[:1]]


TRAINER_CONFIGS = {"reward": "trl:RewardConfig", "dpo": "trl:DPOConfig", "kto": "trl:KTOConfig",
                   "orpo": "trl.experimental.orpo:ORPOConfig", "simpo": "trl.experimental.cpo:CPOConfig"}


def _check_extra(extra: dict, modeled: set[str], stage: str) -> list[str]:
    if not extra:
        return []
    module, name = TRAINER_CONFIGS.get(stage, "transformers:TrainingArguments").split(":")
    target = getattr(importlib.import_module(module), name)  # a heavy import, only when extra keys are given
    allowed = {f.name for f in dataclasses.fields(target) if f.init}
    problems = []
    for key in extra:
        if key in modeled:
            problems.append(f"train.extra.{key}: set it as train.{key}, not under train.extra")
        elif key not in allowed:
            problems.append(f"train.extra.{key}: not a {target.__name__} field{did_you_mean(key, allowed)}")
    return problems
