"""What every command shares: how a command body runs (exit codes, --json, errors as one line) and the options
several commands take."""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from nlpkit.errors import NlpkitError

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; everything else on stderr.")]


def execute(work: Callable[[], dict], as_json: bool, show: Callable[[dict], None] | None = None,
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
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, or a shipped recipe's name (`nlpkit recipes`).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE overrides, e.g. train.max_steps=50")]
LoraOpt = Annotated[bool, typer.Option("--lora", help="Train LoRA adapters: same as peft.method=lora.")]
BitsOpt = Annotated[Optional[int], typer.Option("--bits", help="Load the base in 4 or 8 bits: quant.bits=N.")]


def flag_overrides(lora: bool, bits: int | None) -> list[str]:
    """--lora and --bits are sugar for the overrides they stand for (finetune and plan)."""
    return (["peft.method=lora"] if lora else []) + ([f"quant.bits={bits}"] if bits is not None else [])
