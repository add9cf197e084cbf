"""Generating with a LoRA run: its adapter attached (PeftModel) against folded into the base (merge_and_unload, what
runs.load_causal_lm gives `nlpkit eval`, `sample`, `chat` and `serve`), side by side on the same MBPP prompts, in one
process, greedy.

    python benchmarks/generation_adapter.py runs/dpo-mbpp --problems 64

Prints each one's wall time, the ratio, and how many answers are equal (folding rounds the weights once, so a
near-tie can break the other way). Reads mbpp:test through the data mirror ($NLPKIT_DATA_DIR).
"""

from __future__ import annotations

import argparse
import time

from nlpkit import runs
from nlpkit.models import bf16_is_fast
from nlpkit.sample import generate, load_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    run = runs.open_run(args.run)
    tokenizer = runs.load_tokenizer(run)
    prompts = [r["prompt"] for r in load_records("mbpp:test", args.problems)]
    results = {}
    loaders = {"adapter": lambda: runs.load_model(run), "folded": lambda: runs.load_causal_lm(args.run)[0]}
    for name, load in loaders.items():
        model = load()
        start = time.perf_counter()
        answers = generate(model, tokenizer, prompts, 1, args.max_new_tokens, 0.0, bf16_is_fast())
        results[name] = (time.perf_counter() - start, answers)
    (adapter_wall, adapter_answers), (folded_wall, folded_answers) = results["adapter"], results["folded"]
    same = sum(a == b for a, b in zip(adapter_answers, folded_answers))
    print(f"{args.run}: {args.problems} problems, greedy, at most {args.max_new_tokens} new tokens")
    print(f"adapter attached: {adapter_wall:7.1f} s")
    print(f"folded in:        {folded_wall:7.1f} s  x{adapter_wall / folded_wall:.2f}  answers equal: "
          f"{same}/{args.problems}")


if __name__ == "__main__":
    main()
