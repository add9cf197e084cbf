"""SFT throughput: nlpkit's default against trl's SFTTrainer with its own defaults, same model, data, LoRA and steps.

    NLPKIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/sft_vs_trl.py [--steps 24]

Both train LoRA (r=16, all linear layers) on SmolLM2-135M-Instruct over the same Dolly rows for the same number of
steps at batch 8, and are evaluated on the same 50 test rows. The peer is `SFTTrainer(model, SFTConfig(...))` with
trl's defaults for everything we do not need to match (gradient checkpointing on, random batch order, max_length
1024); ours is `nlpkit finetune sft-dolly-lora` (length-grouped batches, no checkpointing: memory is
not the limit at this size). Throughput counts non-pad tokens (trl's `num_tokens`). One run each; ratio printed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ours(steps: int, rows: int, scratch: Path) -> dict:
    out = scratch / "ours"
    command = [sys.executable, "-m", "nlpkit", "finetune", str(ROOT / "recipes" / "sft-dolly-lora.yaml"),
               f"train.max_steps={steps}", f"data.max_train_samples={rows}", "data.max_eval_samples=50",
               "generation.eos_check_prompts=0", "train.logging_steps=1", "--output-dir", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    tokens = max(row.get("num_tokens", 0) for row in log)
    return {"tokens_per_s": tokens / metrics["train_runtime"], "eval_loss": metrics["eval_loss"], "tokens": tokens}


def peer(steps: int, rows: int, scratch: Path) -> dict:
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from nlpkit.data import open_source
    from nlpkit.models import resolve_model
    from nlpkit.data import sft_dataset
    from nlpkit.models import chat_tokenizer
    from transformers import AutoTokenizer

    train = sft_dataset(open_source("dolly", "train", "benchmark"), "alpaca", rows, seed=42)
    test = sft_dataset(open_source("dolly:test", "test", "benchmark"), "alpaca", 50, seed=42)
    path = resolve_model("smollm2-135m")
    tokenizer = chat_tokenizer(AutoTokenizer.from_pretrained(path), None)  # same distinct pad as ours
    args = SFTConfig(output_dir=str(scratch / "peer"), use_cpu=not torch.cuda.is_available(), max_steps=steps,
                     per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=2e-4,
                     logging_steps=1, report_to="none", save_strategy="no")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=path, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
                         peft_config=lora)
    start = time.perf_counter()
    result = trainer.train()
    elapsed = result.metrics.get("train_runtime", time.perf_counter() - start)
    tokens = max(row.get("num_tokens", 0) for row in trainer.state.log_history)
    return {"tokens_per_s": tokens / elapsed, "eval_loss": trainer.evaluate()["eval_loss"], "tokens": tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rows", type=int, default=192, help="Dolly train rows (a seeded random slice)")
    args = parser.parse_args()
    if not os.environ.get("NLPKIT_DATA_DIR"):
        raise SystemExit("set NLPKIT_DATA_DIR to the data mirror (../shared/data in this repository's checks)")
    with tempfile.TemporaryDirectory() as scratch:
        theirs = peer(args.steps, args.rows, Path(scratch))
        mine = ours(args.steps, args.rows, Path(scratch))
    print(f"SmolLM2-135M + LoRA r16, {args.steps} steps x batch 8 on {args.rows} Dolly rows; eval on 50 test rows")
    print(f"trl SFTTrainer defaults: {theirs['tokens_per_s']:7.1f} non-pad tokens/s  eval_loss {theirs['eval_loss']:.4f}")
    print(f"nlpkit default:          {mine['tokens_per_s']:7.1f} non-pad tokens/s  eval_loss {mine['eval_loss']:.4f}")
    print(f"ratio: {mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
