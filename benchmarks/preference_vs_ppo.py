"""RM + PPO against the preference family (DPO, KTO, ORPO, SimPO), row by row on the same held-out prompts.

    nlpkit finetune reward-hh && nlpkit rlhf rlhf-hh-ppo
    nlpkit finetune dpo-hh && nlpkit finetune kto-hh && nlpkit finetune orpo-hh
    python benchmarks/preference_vs_ppo.py runs/rlhf-hh-ppo runs/dpo-hh runs/kto-hh runs/orpo-hh [--samples 3]

Each run answered the same held-out prompts greedily before and after training (ppo.eval_prompts, dpo.eval_prompts:
the prompts an rlhf recipe on the same file and seed holds out; nlpkit/heldout.py), scored by the same reward model.
This reads their heldout.jsonl, metrics.json and nlpkit_run.json, refuses runs whose prompts differ, and prints a
Markdown table (reward-model score gain with its paired standard error; the gain on the prompts answered without a
refusal before and after, since the hh-only reward model pays for refusals; KL to the reference, EOS rate, length,
refusal rate overall and per prompt source, wall time and peak memory of the whole run) and the first --samples
answers of each run, before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean, stdev


def read_run(path: Path) -> dict:
    answers = path / "heldout.jsonl"
    if not answers.is_file():
        sys.exit(f"error: {answers} not found; train with ppo.eval_prompts or dpo.eval_prompts set (the hh recipes do)")
    manifest = json.loads((path / "nlpkit_run.json").read_text())
    return {"name": path.name, "stage": manifest["stage"], "metrics": json.loads((path / "metrics.json").read_text()),
            "wall_minutes": manifest["wall_seconds"] / 60, "peak_gb": manifest["peak_memory_mb"] / 1024,
            "rows": [json.loads(line) for line in answers.read_text().splitlines()]}


def gains(rows: list[dict]) -> tuple[str, str]:
    """Mean gain with its paired standard error, and the mean gain where neither answer is a refusal."""
    diffs = [row["score_after"] - row["score_before"] for row in rows]
    plain = [diff for diff, row in zip(diffs, rows) if not row["refusal_before"] and not row["refusal_after"]]
    return (f"{mean(diffs):+.3f} ± {stdev(diffs) / len(diffs) ** 0.5:.3f}",
            f"{mean(plain):+.3f} ({len(plain)})" if plain else "-")


def table(runs: list[dict]) -> str:
    sources = sorted({row.get("source", "") for row in runs[0]["rows"]} - {""})
    head = ["run", "stage", "RM score before -> after", "gain ± SE",
            "gain without refusals (prompts)", "KL (nats/answer)", "EOS rate", "length",
            "refusals", *[f"refusals: {s}" for s in sources], "pair acc.", "wall (min)", "peak (GB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        m = run["metrics"]
        by_before, by_after = (m.get(f"eval_refusal_rate_by_source_{when}", {}) for when in ("before", "after"))
        cells = [run["name"], run["stage"],
                 f"{m['eval_score_before']:+.3f} -> {m['eval_score_after']:+.3f}", *gains(run["rows"]),
                 f"{m['eval_kl_after']:.2f}", f"{m['eval_eos_rate_before']:.2f} -> {m['eval_eos_rate_after']:.2f}",
                 f"{m['eval_length_before']:.1f} -> {m['eval_length_after']:.1f}",
                 f"{m['eval_refusal_rate_before']:.2f} -> {m['eval_refusal_rate_after']:.2f}",
                 *[f"{by_before.get(s, 0):.2f} -> {by_after.get(s, 0):.2f}" for s in sources],
                 f"{m['eval_pair_accuracy']:.3f}" if "eval_pair_accuracy" in m else "-",
                 f"{run['wall_minutes']:.1f}", f"{run['peak_gb']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples(runs: list[dict], count: int) -> str:
    out = []
    for i in range(count):
        out.append(f"\n**{runs[0]['rows'][i]['prompt']!r}**\n")
        out.append(f"- before ({runs[0]['name']}'s start model): {runs[0]['rows'][i]['answer_before']!r}")
        out += [f"- {run['name']}: {run['rows'][i]['answer_after']!r} ({run['rows'][i]['score_after']:+.2f})"
                for run in runs]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=3, help="answers shown per run (the first held-out prompts)")
    args = parser.parse_args()
    runs = [read_run(path) for path in args.runs]
    prompts = [row["prompt"] for row in runs[0]["rows"]]
    for run in runs[1:]:
        if [row["prompt"] for row in run["rows"]] != prompts:
            sys.exit(f"error: {run['name']} answered other held-out prompts than {runs[0]['name']}; give both the "
                     "same prompt file and train.seed")
    print(f"{len(prompts)} held-out prompts, the same for every run\n")
    print(table(runs))
    print(samples(runs, min(args.samples, len(prompts))))


if __name__ == "__main__":
    main()
