"""The nlpkit command line: a table of thin commands; the work lives in importable modules.

Exit codes: 0 success; 2 bad input (one line naming the key, file or row and the fix); 1 an internal error.
With --json, stdout holds one JSON object and nothing else: everything else, library chatter and progress bars
included, goes to stderr. No torch import at module top, so `nlpkit --help` and bad recipes answer at once.
The commands live in cli/train.py (finetune, rlhf, plan, recipes) and cli/use.py (everything that uses a model or a
finished run); cli/common.py runs a command body and holds the shared options.
"""

import typer

from nlpkit.cli import train, use

app = typer.Typer(
    name="nlpkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Fine-tune Hugging Face models from YAML recipes: classification, adapters, quantization, instruction SFT, "
         "preference optimization, reward models and RLHF (PPO).",
)
data_app = typer.Typer(help="Dataset tools.", no_args_is_help=True)

COMMANDS = {  # name -> function, in the order `nlpkit --help` lists them
    "finetune": train.finetune, "rlhf": train.rlhf, "eval": use.eval_, "sample": use.sample, "quantize": use.quantize, "merge": use.merge,
    "export": use.export, "chat": use.chat, "serve": use.serve, "embed": use.embed, "plan": train.plan,
    "recipes": train.recipes, "env": use.env,
}
for name, command in COMMANDS.items():
    app.command(name)(command)
data_app.command("check")(use.data_check)
app.add_typer(data_app, name="data")
