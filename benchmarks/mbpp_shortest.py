"""The N MBPP test problems with the shortest reference solutions, as a code set `nlpkit eval` reads.

    python benchmarks/mbpp_shortest.py 100 runs/mbpp-test-short100.jsonl
    nlpkit eval runs/sft-mbpp-lora --data runs/mbpp-test-short100.jsonl --json

issue 17's fallback when a 135M model cannot move the full test set: the problems whose solutions are shortest are
the ones a small model has a chance at. Reads $NLPKIT_DATA_DIR/mbpp/test.jsonl (the data mirror); ties by task_id.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def shortest(rows: list[dict], n: int) -> list[dict]:
    return sorted(rows, key=lambda row: (len(row["code"]), row["task_id"]))[:n]


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python benchmarks/mbpp_shortest.py N OUTPUT.jsonl")
    source = Path(os.environ.get("NLPKIT_DATA_DIR", "../shared/data")) / "mbpp" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    picked = shortest(rows, int(sys.argv[1]))
    out = Path(sys.argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in picked))
    print(f"{out}: {len(picked)} of {len(rows)} problems, reference solutions of "
          f"{len(picked[0]['code'])}-{len(picked[-1]['code'])} characters")
