"""How many sequences one generate() call should hold on a CPU: `nlpkit eval` and `nlpkit sample`'s generation
(sample.generate) at two batch sizes, or two budgets of padded prompt tokens a call, side by side on the same model
and the same MBPP prompts, in one process.

    python benchmarks/generation_batch.py smollm2-135m --problems 64 --sizes 16 64
    python benchmarks/generation_batch.py smollm2-135m --problems 16 --samples 8 --sizes 16 64
    python benchmarks/generation_batch.py smollm2-135m --problems 52 --longest --sizes 64 --budgets 1000000 16384

--longest takes the test set's longest prompts instead of its first: the last call of an eval on all 500, where one
prompt of 1,768 tokens pads the others (a budget of 1,000,000 tokens is the batching without a budget).

Greedy (the default) prints each size's wall time, the ratio to the first size, and how many answers equal the first
size's (left padding differs between batch sizes, so a near-tie can break the other way); with --samples K, K sampled
answers per prompt at temperature 0.8 (their text is not compared: another batch size draws other random numbers).
Reads mbpp:test through the data mirror ($NLPKIT_DATA_DIR).
"""

from __future__ import annotations

import argparse
import time

import torch

from nlpkit import runs
from nlpkit.models import bf16_is_fast
from nlpkit.sample import PADDED_TOKENS, generate, load_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[PADDED_TOKENS])
    parser.add_argument("--longest", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = runs.load_causal_lm(args.model)
    records = load_records("mbpp:test", None if args.longest else args.problems)
    prompts = [r["prompt"] for r in records]
    if args.longest:
        prompts = sorted(prompts, key=len)[-args.problems:]
    temperature = 0.8 if args.samples > 1 else 0.0
    results = []
    for size in args.sizes:
        for budget in args.budgets:
            torch.manual_seed(0)
            start = time.perf_counter()
            answers = generate(model, tokenizer, prompts, args.samples, args.max_new_tokens, temperature,
                               bf16_is_fast(), batch_size=size, padded_tokens=budget)
            results.append((f"batch {size:4d}, budget {budget:7d}", time.perf_counter() - start, answers))
    first, first_wall, first_answers = results[0]
    tokens = sum(len(tokenizer(a)["input_ids"]) for group in first_answers for a in group)
    print(f"{len(prompts)} problems x {args.samples}, {tokens} answer tokens at {first}")
    for name, wall, answers in results:
        line = f"{name}: {wall:7.1f} s  x{first_wall / wall:.2f} vs {first}"
        if args.samples == 1:  # sampled answers draw from different random streams at another batch size
            same = sum(a[0] == b[0] for a, b in zip(answers, first_answers))
            line += f"  answers equal to the first's: {same}/{len(prompts)}"
        print(line)


if __name__ == "__main__":
    main()
