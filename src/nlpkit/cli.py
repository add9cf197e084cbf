"""The nlpkit command line: a table of thin commands; the work lives in importable modules.

Exit codes: 0 success; 2 bad input (one line naming the key, file or row and the fix); 1 an internal error.
With --json, stdout holds one JSON object and nothing else: everything else, library chatter and progress bars
included, goes to stderr. No torch import at module top, so `nlpkit --help` and bad recipes answer at once.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from nlpkit.errors import NlpkitError
from nlpkit.report import print_metrics, print_tree
from nlpkit.runs import claim_output_dir

app = typer.Typer(
    name="nlpkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Fine-tune Hugging Face models from YAML recipes: classification, adapters, quantization, instruction SFT, reward models and RLHF (PPO).",
)

STAGES = {  # a recipe's stage (rlhf: with its algo) -> the module whose run(cfg, output_dir, resume) trains it
    "classify": "nlpkit.stages.classify",
    "sft": "nlpkit.stages.sft",
    "reward": "nlpkit.stages.reward",
    "rlhf/ppo": "nlpkit.stages.ppo",  # nlpkit's own loop
    "rlhf/grpo": "nlpkit.stages.grpo",  # trl's GRPOTrainer and RLOOTrainer, with nlpkit's scoring
    "rlhf/rloo": "nlpkit.stages.grpo",
}

# A full disk or a read-only or forbidden output directory: the user's to fix, not a bug.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; everything else on stderr.")]


def _execute(work: Callable[[], dict], as_json: bool, show: Callable[[dict], None] | None = None,
             stdout_is_result: bool = True) -> None:
    """Run a command body: NlpkitError -> one line + exit 2 (3); anything else -> traceback + exit 1."""
    from nlpkit import distributed, report

    try:
        # Libraries print (Trainer logs): keep stdout for the result, unless the command writes it as it goes (chat).
        with contextlib.redirect_stdout(sys.stderr) if stdout_is_result else contextlib.nullcontext():
            result = work()
    except NlpkitError as e:  # exit 2 bad input; 3 the watchdog stopped training
        if report.is_main_process():  # every process of a launched run meets the same error: say it once
            report.console.print(f"error: {e}", style="red", markup=False)
        distributed.record_exit(e.exit_code)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        report.console.print(f"error: writing {e.filename or 'the output'} failed: {e.strerror}; free space or choose "
                             "another --output-dir (nothing was marked complete)", style="red", markup=False)
        distributed.record_exit(2)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        report.console.print("interrupted", markup=False)
        raise typer.Exit(130) from None
    except Exception:
        traceback.print_exc()
        report.console.print("This is a bug in nlpkit, not in your input: please report it with the traceback above "
                             "and the output of `nlpkit env`.", style="red", markup=False)
        raise typer.Exit(1) from None
    if not report.is_main_process():
        return  # under --num-processes the main process prints the one result
    if as_json:
        print(json.dumps(result, default=str))
    elif show:
        show(result)


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its last complete "
                                         "checkpoint (same recipe).")]
ProcessesOpt = Annotated[Optional[int], typer.Option("--num-processes", help="Train in N processes (one per GPU) "
                                                     "through accelerate.")]
DistributedOpt = Annotated[Optional[str], typer.Option("--distributed", help="With --num-processes: ddp (default), "
                                                       "zero2, zero3 (DeepSpeed) or fsdp.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output-dir", help="Default: runs/<recipe name>.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML (see `nlpkit recipes`).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. train.max_steps=50")]
LoraOpt = Annotated[bool, typer.Option("--lora", help="Train LoRA adapters: same as peft.method=lora.")]
BitsOpt = Annotated[Optional[int], typer.Option("--bits", help="Load the base in 4 or 8 bits: quant.bits=N.")]


@app.command()
def finetune(
    recipe: RecipeArg, overrides: OverridesArg = None, lora: LoraOpt = False, bits: BitsOpt = None,
    output_dir: OutputOpt = None,
    resume: ResumeOpt = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load .bin/.pt weights (pickle can run code): "
                                               "model.allow_pickle=true.")] = False,
    num_processes: ProcessesOpt = None,
    distributed: DistributedOpt = None,
    as_json: JsonOpt = False,
):
    """Fine-tune a model as the recipe's `stage:` says, and write a run directory.

    Exit codes: 0 done; 2 bad input; 3 the watchdog stopped training (NaN/inf gradients, loss stuck at 0); 1 a bug."""
    sugar = _flag_overrides(lora, bits) + (["model.allow_pickle=true"] if allow_pickle else [])
    _train("finetune", recipe, sugar + (overrides or []), output_dir, resume, num_processes, distributed, as_json)


@app.command()
def rlhf(
    recipe: Annotated[Path, typer.Argument(help="An rlhf recipe (stage: rlhf), e.g. recipes/rlhf-hh-ppo.yaml.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. ppo.kl_coef=0.1")] = None,
    output_dir: OutputOpt = None,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    distributed: DistributedOpt = None,
    as_json: JsonOpt = False,
):
    """Train a policy against a reward model and/or reward functions with nlpkit's own PPO (or trl's GRPO/RLOO).

    Exit codes: 0 done; 2 bad input; 3 the watchdog stopped training (NaN, runaway KL, collapsed entropy); 1 a bug."""
    _train("rlhf", recipe, overrides or [], output_dir, resume, num_processes, distributed, as_json)


def _train(command: str, recipe: Path, overrides: list[str], output_dir: Path | None, resume: bool,
           num_processes: int | None, distributed: str | None, as_json: bool) -> None:
    """finetune and rlhf: load the recipe, claim the output directory, run its stage, here or in N processes."""
    # `distributed` is the --distributed option here, so the module goes by another name
    from nlpkit import distributed as launcher

    out = output_dir or Path("runs") / recipe.stem

    def load():
        from nlpkit.recipes import load_recipe

        cfg = load_recipe(recipe, overrides)
        if command == "rlhf" and cfg.stage != "rlhf":
            raise NlpkitError(f"recipe {recipe}: stage is {cfg.stage!r}; `nlpkit rlhf` runs stage: rlhf recipes "
                              f"(use `nlpkit finetune {recipe}`)")
        return cfg

    if (num_processes is not None or distributed) and not launcher.in_launched_process():
        processes = 1 if num_processes is None else num_processes

        def check_then_claim():  # bad input answers here, once, before any process starts
            launcher.check(processes, distributed)
            launcher.check_split(load(), processes)
            if not resume:
                claim_output_dir(out)
            return {}

        _execute(check_then_claim, as_json=False)
        argv = [command, str(recipe), *overrides, "--output-dir", str(out)]
        argv += ["--resume"] * resume + ["--json"] * as_json
        raise typer.Exit(launcher.relaunch(argv, processes, distributed))

    def work():
        from nlpkit.report import is_main_process

        cfg = load()
        if not resume and is_main_process():  # launched processes: the launcher claimed it already
            claim_output_dir(out)
        stage = importlib.import_module(STAGES[f"rlhf/{cfg.algo}" if cfg.stage == "rlhf" else cfg.stage])
        metrics = stage.run(cfg, out, resume=resume)
        launcher.finish()
        return {"output_dir": str(out), **metrics}

    _execute(work, as_json)  # the stage printed the run summary on stderr


@app.command("eval")
def eval_(
    run_dir: Annotated[str, typer.Argument(help="A finished run, or any causal LM (alias, directory, hub id).")],
    data: Annotated[str, typer.Option("--data", help="File, folder, catalog name (sst2:validation) or hub id.")],
    text_column: Annotated[Optional[str], typer.Option(help="Default: the column the run trained on.")] = None,
    text_pair_column: Annotated[Optional[str], typer.Option(help="Default: as in training.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Default: as in training.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Code sets: also pass@K of K sampled answers.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Code sets: the first N problems only.")] = None,
    temperature: TemperatureOpt = 0.8,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Code sets: longest answer (default: the run's "
                                                          "generation.max_new_tokens, else 256).")] = None,
    as_json: JsonOpt = False,
):
    """Evaluate a run (or a causal LM) on a file: the same metric keys as the run's metrics.json.

    Reward runs: pair accuracy and mean margin on a preference file. Classifiers: accuracy, F1, per-class scores on a
    labeled file. Causal LMs: loss and perplexity on the trained-on (answer) tokens of an instruction file, so a base
    model and a tuned run compare on the same file; on a code set (mbpp), pass@1 of greedy answers by unit tests."""

    def work():
        from nlpkit.evaluate import evaluate

        return evaluate(run_dir, data, text_column, text_pair_column, label_column, num_samples, limit, temperature,
                        max_new_tokens)

    _execute(work, as_json, show=print_metrics)


@app.command()
def sample(
    model: Annotated[str, typer.Argument(help="A causal-LM run, or any causal LM (alias, directory, hub id).")],
    data: Annotated[str, typer.Option("--data", help="Prompt rows: file, catalog name (mbpp:train) or hub id.")],
    num_samples: Annotated[int, typer.Option("--num-samples", help="Completions per prompt.")],
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Writes samples.jsonl and pairs.jsonl here.")],
    reward: Annotated[Optional[list[str]], typer.Option("--reward", help="A reward function (unit_test_fraction, "
                                                        "compiles, module:function); repeatable.")] = None,
    reward_model: Annotated[Optional[str], typer.Option("--reward-model", help="A reward run.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="The first N prompts only.")] = None,
    temperature: TemperatureOpt = 0.8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion, in tokens.")] = 256,
    as_json: JsonOpt = False,
):
    """Sample K completions per prompt, score them, and pair each prompt's best with its worst (no human labels)."""

    def work():
        from nlpkit import sample as sample_module

        claim_output_dir(output_dir)
        return sample_module.run(model, data, num_samples, reward or [], reward_model, output_dir, limit,
                                 temperature, max_new_tokens)

    _execute(work, as_json, show=print_metrics)


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
            claim_output_dir(output_dir)
        return quantize_module.run(model, bits, quant_type, eval_data, output_dir)

    _execute(work, as_json, show=print_metrics)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run trained with an adapter (peft: section or --lora).")],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Default: <run_dir>-merged.")] = None,
    as_json: JsonOpt = False,
):
    """Fold a run's adapter into its base model (dequantizing a quantized base) and check the logits agree."""

    def work():
        from nlpkit import runs
        from nlpkit.adapters import merge_run

        run = runs.open_run(run_dir)
        out = output_dir or run_dir.with_name(run_dir.name + "-merged")
        claim_output_dir(out)
        return merge_run(run, out)

    _execute(work, as_json, show=print_metrics)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="An sft run directory, or a causal LM (alias, directory, hub id).")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Answer this once and exit; without it, a "
                                                  "conversation on stdin (empty line or Ctrl-D ends it).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
):
    """Talk to a causal LM with its own chat template; answers stream to stdout and stop at EOS."""

    def work():
        from nlpkit.chat import converse

        converse(model, prompt, max_new_tokens)
        return {}

    _execute(work, as_json=False, stdout_is_result=False)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="A classify or sft run directory, or a model (alias, directory).")],
    host: Annotated[str, typer.Option("--host", help="Loopback by default: only this machine can connect.")] =
    "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="NLPKIT_API_KEY",
                                                   help="Require `Authorization: Bearer KEY` on /v1/*.")] = None,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", min=1,
                                                  help="Most tokens one chat answer may ask for.")] = 512,
    max_request_kb: Annotated[int, typer.Option("--max-request-kb", min=1,
                                                help="Larger request bodies get 413.")] = 64,
):
    """Serve a model over HTTP: OpenAI-style /v1/chat/completions or /v1/classify, /health, and a page at /."""

    def work():
        from nlpkit import serve as serving

        served = serving.load_served(model)
        serving.run_server(served, host, port, api_key=api_key, max_tokens_limit=max_tokens_limit,
                           max_request_bytes=max_request_kb * 1024)
        return {}

    _execute(work, as_json=False, stdout_is_result=False)


@app.command()
def embed(
    model: Annotated[str, typer.Argument(help="An encoder: alias (minilm), model directory, or a classify run.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="The texts (--similar) or the words A B C (--analogy).",
                                                         show_default=False)] = None,
    similar: Annotated[bool, typer.Option("--similar", help="Rank TEXT 2..n by cosine similarity to TEXT 1.")] = False,
    analogy: Annotated[bool, typer.Option("--analogy", help="Words closest to A - B + C (king man woman).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Analogy candidates to list.")] = 10,
    as_json: JsonOpt = False,
):
    """Sentence similarity and word analogies with an encoder's mean-pooled embeddings (the embeddings lab)."""

    def work():
        from nlpkit.embed import run

        return run(model, texts or [], similar, analogy, top_k)

    def show(result):
        from nlpkit.embed import print_result

        print_result(result)

    _execute(work, as_json, show=show)


data_app = typer.Typer(help="Dataset tools.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    source: Annotated[str, typer.Argument(help="File, folder, catalog name (dolly) or hub id.")],
    format: Annotated[str, typer.Option("--format", help="auto, alpaca, messages, prompt_completion, text.")] = "auto",
    model: Annotated[str, typer.Option("--model", help="Whose tokenizer and chat template render it.")] = "smollm2-135m",
    max_length: Annotated[int, typer.Option("--max-length", min=1)] = 512,
    as_json: JsonOpt = False,
):
    """Dataset doctor: detect the format, validate every row, show a rendered example with the trained-on span."""

    def work():
        from nlpkit.data import mirror_dir
        from nlpkit.data.check import data_check as check

        mirror = mirror_dir(None)
        return check(source, format, model, max_length, str(mirror) if mirror else None)

    def show(result):
        from nlpkit import report

        report.info(result.pop("example"))
        print_tree(result)

    _execute(work, as_json, show=show)


@app.command()
def plan(
    recipe: RecipeArg, overrides: OverridesArg = None, lora: LoraOpt = False, bits: BitsOpt = None,
    memory: Annotated[Optional[str], typer.Option("--memory", help="A budget (8GB, 900MB): suggestions when the "
                                                  "estimate is over it.")] = None,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Data-parallel processes: global "
                                               "batch and per-process memory.")] = 1,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda: plan for that device (default: "
                                                  "this machine's); cuda estimates GPU memory.")] = None,
    as_json: JsonOpt = False,
):
    """Preflight without training: resolved config, parameter counts, and a peak-memory estimate by component."""

    def work():
        from nlpkit import plan as planning
        from nlpkit.recipes import load_recipe

        budget = planning.parse_memory(memory) if memory is not None else None
        cfg = load_recipe(recipe, _flag_overrides(lora, bits) + (overrides or []))
        if device not in (None, "cpu", "cuda"):
            raise NlpkitError(f"--device {device}: plan for cpu or cuda")
        return planning.plan(cfg, num_processes=num_processes, memory_mb=budget, device=device)

    def show(result):
        from nlpkit.plan import print_plan

        print_plan(result)

    _execute(work, as_json, show=show)


@app.command()
def recipes(as_json: JsonOpt = False):
    """List the shipped recipes with what each trains."""

    def work():
        from nlpkit.recipes import shipped

        return {"recipes": shipped()}

    _execute(work, as_json, show=lambda r: [print(f"{k:40s} {v}") for k, v in r["recipes"].items()])


@app.command()
def env(as_json: JsonOpt = False):
    """Versions, device, embedded models present, data mirror."""

    def work():
        from nlpkit.report import environment

        return environment()

    _execute(work, as_json, show=print_tree)


# ---------------------------------------------------------------------------------------------- helpers


def _flag_overrides(lora: bool, bits: int | None) -> list[str]:
    """--lora and --bits are sugar for the overrides they stand for (finetune and plan)."""
    return (["peft.method=lora"] if lora else []) + ([f"quant.bits={bits}"] if bits is not None else [])
