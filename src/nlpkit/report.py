"""What a run leaves behind: nlpkit_run.json (manifest), metrics.json, train_log.jsonl, and a README.md model card.

Human output goes to stderr, so `--json` can own stdout. Files are written to a temporary name and renamed, so a
killed run never leaves a half-written JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

from rich.console import Console

from nlpkit.errors import NlpkitError

# soft_wrap: an error stays one line, whatever the width; emoji=False: "sst2:train" must not print as a train emoji
console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
PACKAGES = ("nlpkit", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes")
MANIFEST = "nlpkit_run.json"
# Names of keys and environment variables that hold secrets: HF_TOKEN, hub_token, WANDB_API_KEY, db_password.
SECRET_NAME = re.compile(r"(^|_)(token|secret|password|api_?key|access_key)$", re.IGNORECASE)


def is_main_process() -> bool:
    """Under `--num-processes N` every process runs the stage; only the first talks and writes (RANK: torchrun's)."""
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    if is_main_process():
        console.print(message, markup=False)  # messages hold label lists like ['a', 'b']: not markup


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"warning: {message}", style="yellow", markup=False)


def print_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    return trainable, total


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)} x{torch.cuda.device_count()})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(train_metrics: dict) -> dict:
    """The speed figures of Trainer.train()'s metrics that every run reports."""
    keys = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    return {k: train_metrics[k] for k in keys if k in train_metrics}


def write_json(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def redact(payload):
    """Secrets never reach a run directory: values under secret-looking keys (train.extra.hub_token=...) and any
    occurrence of a secret-looking environment variable's value (HF_TOKEN, WANDB_API_KEY) become "***"."""
    secrets = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8]

    def clean(value, key=""):
        if isinstance(value, dict):
            return {k: clean(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            if SECRET_NAME.search(key) and value:
                return "***"
            name, equals, _ = value.partition("=")  # a KEY=VALUE override in the command line
            if equals and SECRET_NAME.search(name.rsplit(".", 1)[-1]):
                return f"{name}=***"
            for secret in secrets:
                value = value.replace(secret, "***")
        return value

    return clean(payload)


def write_run(output_dir: Path, cfg, metrics: dict, *, task: dict, datasets: list, started: float) -> None:
    """Write metrics.json, the model card, and last the manifest: a run with a manifest is complete."""
    if not is_main_process():
        return
    write_json(output_dir / "metrics.json", metrics)
    manifest = {
        "nlpkit_version": versions()["nlpkit"],
        "stage": cfg.stage,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "config": cfg.model_dump(mode="json"),
        "task": task,
        "seed": cfg.train.seed,
        "datasets": [{"source": rows.name, "fingerprint": rows.fingerprint, "rows": len(rows.rows)}
                     for rows in datasets],
        "versions": versions(),
        "device": device_description(),
        "wall_seconds": round(time.time() - started, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "complete": True,
    }
    manifest = redact(manifest)
    (output_dir / "README.md").write_text(model_card(manifest, metrics))
    write_json(output_dir / MANIFEST, manifest)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise NlpkitError(f"{run_dir}: no {MANIFEST}; give the output directory of a finished `nlpkit finetune` run")
    return json.loads(path.read_text())


def model_card(manifest: dict, metrics: dict) -> str:
    cfg = manifest["config"]
    scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalar.items())
    labels = manifest["task"].get("labels")
    return f"""# {cfg['stage']} fine-tune of `{cfg['model']['name']}`

Trained with nlpkit {manifest['nlpkit_version']} on {manifest['device']} in {manifest['wall_seconds']} s.

- Training data: `{cfg['data']['train']}`; evaluation data: `{cfg['data'].get('eval') or 'the catalog eval split'}`
- Labels: {', '.join(labels) if labels else 'regression target'}
- Reproduce: `{' '.join(manifest['command'])}` (the full resolved config is in `nlpkit_run.json`)

## Metrics

| metric | value |
|---|---|
{rows}

## Use

```python
from transformers import pipeline
classifier = pipeline("text-classification", model="path/to/this/folder")
```
"""


def jsonl_log_callback(path: Path):
    """A TrainerCallback appending every log event (loss, lr, eval metrics) to train_log.jsonl on the main process.

    Build it after training.resume_point has cut the log back to the checkpoint: a resumed run then never writes a
    line for a step the log already holds (sft's step-0 evaluation of the base model, run again on resume).
    """
    from transformers import TrainerCallback

    lines = path.read_text().splitlines() if path.is_file() else []
    last_step = json.loads(lines[-1])["step"] if lines else 0

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and state.global_step >= last_step:
                with path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return JsonlLog()
