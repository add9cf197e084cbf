"""`nlpkit sample`: K sampled completions per prompt, each scored by reward functions and/or a reward model; the best
and the worst completion of a prompt become a preference pair, with no human in the loop.

    nlpkit sample smollm2-135m --data mbpp:train --limit 50 --num-samples 8 --reward unit_test_fraction \
        --output-dir runs/mbpp-samples
    nlpkit finetune recipes/reward-hh.yaml data.train=runs/mbpp-samples/pairs.jsonl   # a reward model on the pairs

Writes to --output-dir:
- samples.jsonl: one row per completion: prompt (the user turn), completion, scores (each source's unweighted score:
  "reward_model", then each --reward), total (their sum), and on a code set `passed` (every assert passed);
- pairs.jsonl: one row per prompt whose best and worst totals differ: prompt, chosen (best), rejected (worst), the
  preference rows `stage: reward` reads (data/formats.py) and DPO's columns. The prompt is the text the model was
  given, rendered by its chat template, so a reward model or DPO trains on exactly what the policy saw.
On a code set (rows with test_list: MBPP) it reports pass@1 (the mean over samples) and pass@k, k = --num-samples,
with the unbiased estimator of Chen et al. (2021). Nothing here imports a training stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nlpkit import report, runs
from nlpkit.config import RewardSection
from nlpkit.data import open_source, prompt_column, prompt_records
from nlpkit.distributed import process_device
from nlpkit.errors import NlpkitError
from nlpkit.models import autocast, bf16_is_fast
from nlpkit.rewards import load_reward_function, unit_test_pass
from nlpkit.scoring import Scorer

SCORE_BATCH = 64  # completions scored together: one reward-model batch, one round of parallel sandboxes
PADDED_TOKENS = 64 * 256  # sequences x padded prompt tokens in one generate() call: 64 of MBPP's prompts fit


def run(model_ref: str, data_spec: str, num_samples: int, rewards: list[str], reward_model: str | None,
        output_dir: Path, limit: int | None = None, temperature: float = 0.8, max_new_tokens: int = 256,
        seed: int = 0) -> dict:
    from transformers import set_seed

    check_num_samples(num_samples)
    if not rewards and reward_model is None:
        raise NlpkitError("--reward: nothing scores the samples; give --reward NAME (e.g. unit_test_fraction) and/or "
                          "--reward-model RUN_DIR")
    for name in rewards:  # a misspelt name answers before a model loads
        load_reward_function(name, "--reward")
    if temperature <= 0:
        raise NlpkitError(f"--temperature {temperature}: sampling needs a temperature > 0 (0.8 is a good start)")
    records = load_records(data_spec, limit)
    model, tokenizer = runs.load_causal_lm(model_ref)
    bf16 = bf16_is_fast()
    scorer = Scorer(RewardSection(model=reward_model, function=list(rewards)), bf16, process_device())
    set_seed(seed)
    completions = generate(model, tokenizer, [r["prompt"] for r in records], num_samples, max_new_tokens,
                           temperature, bf16)
    flat = [(record, completion) for record, group in zip(records, completions) for completion in group]
    parts: dict[str, list[float]] = {}
    for start in range(0, len(flat), SCORE_BATCH):
        chunk = flat[start:start + SCORE_BATCH]
        for name, values in scorer.components([r for r, _ in chunk], [c for _, c in chunk]).items():
            parts.setdefault(name, []).extend(values)
    totals = [sum(values) for values in zip(*parts.values())]
    passed = code_passes(flat) if "test_list" in records[0] else None

    output_dir.mkdir(parents=True, exist_ok=True)
    samples = [{"prompt": record["prompt"], "completion": completion,
                "scores": {name: values[i] for name, values in parts.items()}, "total": totals[i]}
               | ({"passed": passed[i]} if passed else {}) for i, (record, completion) in enumerate(flat)]
    write_jsonl(output_dir / "samples.jsonl", samples)
    pairs = best_worst_pairs(samples, num_samples, [render_prompt(tokenizer, r["prompt"]) for r in records])
    if not pairs:
        raise NlpkitError(f"--output-dir {output_dir}: no prompt of {len(records)} produced two different scores "
                          f"over its {num_samples} samples, so there is no pair (samples.jsonl was written); sample "
                          "more (--num-samples), at a higher --temperature, or add partial credit (--reward "
                          "unit_test_fraction, --reward compiles)")
    write_jsonl(output_dir / "pairs.jsonl", pairs)
    result = {"prompts": len(records), "samples": len(samples), "pairs": len(pairs),
              "mean_total": sum(totals) / len(totals)}
    if passed:
        counts = [sum(passed[i:i + num_samples]) for i in range(0, len(passed), num_samples)]
        result |= pass_rates(counts, num_samples)
    report.info(f"{len(pairs)} of {len(records)} prompts gave a pair; wrote {output_dir / 'samples.jsonl'} and "
                f"{output_dir / 'pairs.jsonl'}")
    return result | {"output_dir": str(output_dir)}


def check_num_samples(num_samples: int) -> None:
    if num_samples < 1:
        raise NlpkitError(f"--num-samples {num_samples}: give at least 1 completion per prompt (8 makes pairs "
                          "likely; pass@k needs k samples)")


def load_records(data_spec: str, limit: int | None) -> list[dict]:
    """The prompt rows (a code set's rendered with one assert each, with their tests), the first `limit` of them."""
    if limit is not None and limit < 1:
        raise NlpkitError(f"--limit {limit}: give at least 1 prompt, or leave it out for all")
    rows = open_source(data_spec, "train", "--data")
    return prompt_records(rows, prompt_column(rows, None))[:limit]


def code_passes(flat: list[tuple[dict, str]]) -> list[bool]:
    """Every assert passed: the sandbox's results are cached, so the unit-test rewards' runs are not repeated."""
    columns = {key: [record[key] for record, _ in flat] for key in ("test_list", "test_setup_code")}
    return [score == 1.0 for score in unit_test_pass([r["prompt"] for r, _ in flat], [c for _, c in flat], **columns)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with c of n samples passing: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    the chance that k of the n samples, drawn without replacement, hold at least one that passes."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_rates(counts: list[int], n: int) -> dict:
    """pass@1 and pass@n, each averaged over problems, from each problem's count of passing samples out of n."""
    rates = {"pass@1": sum(pass_at_k(n, c, 1) for c in counts) / len(counts)}
    if n > 1:
        rates[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in counts) / len(counts)
    return rates


def best_worst_pairs(samples: list[dict], num_samples: int, rendered: list[str]) -> list[dict]:
    """For each prompt's group of samples: chosen = the highest total, rejected = the lowest, where they differ."""
    pairs = []
    for prompt, start in zip(rendered, range(0, len(samples), num_samples)):
        group = samples[start:start + num_samples]
        best = max(group, key=lambda s: s["total"])
        worst = min(group, key=lambda s: s["total"])
        if best["total"] > worst["total"]:
            pairs.append({"prompt": prompt, "chosen": best["completion"], "rejected": worst["completion"]})
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------- generation


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model reads: the user turn through its chat template (plain text for a model without one)."""
    if not tokenizer.chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompts: list[str], num_samples: int, max_new_tokens: int, temperature: float,
             bf16: bool, batch_size: int = 64, padded_tokens: int = PADDED_TOKENS) -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when temperature is 0), each cut at its EOS: one generate() call
    per `batch_size` sequences and at most `padded_tokens` sequences x padded prompt tokens (prompt_batches),
    num_return_sequences completions of each prompt in it, left-padded. 64: a CPU decodes more sequences a step for
    little more time than 16 (benchmarks/generation_batch.py, docs/code-rlhf.md)."""
    import torch

    per_call = max(1, batch_size // num_samples)
    count = num_samples if temperature > 0 else 1
    sampling = {"do_sample": True, "temperature": temperature, "num_return_sequences": num_samples} \
        if temperature > 0 else {"do_sample": False}
    ids = tokenizer([render_prompt(tokenizer, p) for p in prompts], add_special_tokens=not tokenizer.chat_template)
    ids = ids["input_ids"]  # tokenized once: the batching reads the lengths, each call pads its rows
    answers: list[list[str]] = [[] for _ in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    done = 0
    try:
        for rows in prompt_batches([len(row) for row in ids], per_call, padded_tokens // count):
            batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(model.device)
            with torch.no_grad(), autocast(bf16, model.device):
                out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
            decoded = [decode_until_eos(tokenizer, row.tolist()) for row in out[:, batch["input_ids"].shape[1]:]]
            for k, i in enumerate(rows):
                answers[i] = decoded[k * count:(k + 1) * count]
            done += len(rows)
            report.info(f"generated for {done}/{len(prompts)} prompts")
    finally:
        tokenizer.padding_side = side
    return answers


def prompt_batches(lengths: list[int], per_call: int, max_padded: int) -> list[list[int]]:
    """The prompts' indices grouped into generate() calls, shortest first: at most `per_call` prompts a call, and at
    most `max_padded` prompt tokens once each is padded to the call's longest (a prompt longer than that alone gets a
    call of its own). Every row of a call is padded to its longest prompt and decoded over that context, so one far
    longer prompt (MBPP test task 493: 1,768 tokens with the chat template, the next longest 229) would make a whole
    call of 64 as slow as 64 copies of it."""
    calls: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not calls or len(calls[-1]) == per_call or (len(calls[-1]) + 1) * lengths[i] > max_padded:
            calls.append([])
        calls[-1].append(i)
    return calls


def decode_until_eos(tokenizer, ids: list[int]) -> str:
    end = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
