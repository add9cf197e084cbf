"""The commands that use a model or a finished run: eval, sample, quantize, merge, export, chat, serve, embed, data
check, env. None of them imports training code (tests/test_layout.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlpkit.cli.common import JsonOpt, execute

TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
from nlpkit.report import print_metrics, print_tree
from nlpkit.runs import claim_output_dir


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

    execute(work, as_json, show=print_metrics)


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

    execute(work, as_json, show=print_metrics)


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

    execute(work, as_json, show=print_metrics)


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

    execute(work, as_json, show=print_metrics)


def export(
    model: Annotated[str, typer.Argument(help="An sft or rlhf run (its adapter merged first), or a Llama-family "
                                         "causal LM (alias, directory).")],
    format: Annotated[str, typer.Option("--format", help="gguf: for llama.cpp and Ollama.")] = "gguf",
    outtype: Annotated[str, typer.Option("--outtype", help="f16, q8_0 or f32 (unrounded: twice f16's size).")] = "f16",
    output: Annotated[Optional[Path], typer.Option("--output", help="Default: <model>-<outtype>.gguf.")] = None,
    as_json: JsonOpt = False,
):
    """Write a GGUF file, read it back with transformers and report the largest logits difference; Ollama lines."""

    def work():
        from nlpkit.export import export as export_gguf

        return export_gguf(model, format, outtype, output)

    execute(work, as_json, show=lambda result: importlib.import_module("nlpkit.export").print_result(result))


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

    execute(work, as_json=False, stdout_is_result=False)


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

    execute(work, as_json=False, stdout_is_result=False)


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

    execute(work, as_json, show=show)



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

    execute(work, as_json, show=show)



def env(as_json: JsonOpt = False):
    """Versions, device, embedded models present, data mirror."""

    def work():
        from nlpkit.report import environment

        return environment()

    execute(work, as_json, show=print_tree)


