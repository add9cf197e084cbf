"""Where a process stands: its rank, the world size, its device; gradient averaging; and several processes through
accelerate: `--num-processes N [--distributed ddp|zero2|zero3|fsdp]`.

    nlpkit finetune classify-sst2 --num-processes 2                    # DDP: one process per GPU
    nlpkit finetune sft-dolly-lora --num-processes 8 --distributed zero2
    accelerate launch --config_file my.yaml -m nlpkit finetune RECIPE               # several machines

The command checks the recipe and claims the output directory once, then runs itself again under `accelerate launch`
with a shipped preset (src/nlpkit/presets/). Inside the launched processes Trainer does the distribution; nlpkit
only keeps the run directory, console and results to the main process; nlpkit's own PPO loop uses the process group
helpers below. The bottom layer: it imports nothing of nlpkit but errors, so config and report can ask it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from nlpkit.errors import NlpkitError

PRESETS_DIR = Path(__file__).parent / "presets"
DISTRIBUTED = ("ddp", "zero2", "zero3", "fsdp")
EXIT_FILE = "NLPKIT_EXIT_FILE"  # where a launched main process leaves its exit code (2, 3) for the launcher


def in_launched_process() -> bool:
    return "LOCAL_RANK" in os.environ  # set by torchrun, which accelerate launch runs


def rank() -> int:
    """This process's number among the launched ones (torchrun's RANK); 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes run the stage (torchrun's WORLD_SIZE); 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Under `--num-processes N` every process runs the stage; only the first talks and writes."""
    return rank() == 0


def process_group():
    """(rank, world size, all_sum, gather) for this process. One process: (0, 1, None, [x]). Under
    `--num-processes N` accelerate launch set the group up (gloo on CPU, NCCL on GPUs); PartialState joins it."""
    import torch.distributed as dist

    if world_size() == 1:
        return 0, 1, None, lambda value: [value]
    from accelerate import PartialState

    PartialState()

    def all_sum(tensor):
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def gather(value) -> list:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    return dist.get_rank(), dist.get_world_size(), all_sum, gather


def process_device():
    """This process's GPU (LOCAL_RANK under accelerate launch) when there is one, else the CPU."""
    import torch

    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")


def place(model):
    """An inference model on this process's device. A quantized model stays where bitsandbytes put it (its
    device_map already names this process's GPU)."""
    if getattr(model, "hf_device_map", None) and getattr(model, "is_quantized", False):
        return model
    return model.to(process_device())  # looked up at call time: tests move every model to another device


def average_gradients(params, all_sum, world: int) -> None:
    """What DDP does after backward, for a loop without DDP: every process steps with the mean gradient."""
    for param in params:
        if param.grad is not None:
            param.grad = all_sum(param.grad) / world


def check(num_processes: int, distributed: str | None) -> None:
    """--num-processes and --distributed, before any process starts."""
    import torch

    if distributed is not None and distributed not in DISTRIBUTED:
        raise NlpkitError(f"--distributed {distributed}: choose one of {', '.join(DISTRIBUTED)}")
    if distributed in ("zero2", "zero3") and not torch.cuda.is_available():
        raise NlpkitError(f"--distributed {distributed}: DeepSpeed ZeRO needs CUDA GPUs and this machine has none; "
                          "use --distributed ddp (or fsdp) here, or run on a GPU machine")
    if num_processes < 1:
        raise NlpkitError(f"--num-processes {num_processes}: must be 1 or more (one process per GPU; on a CPU, "
                          "processes share its cores)")
    if distributed in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise NlpkitError(f"--distributed {distributed}: needs DeepSpeed, which is not installed; "
                          "pip install 'nlpkit[deepspeed]' (on a machine with CUDA)")


def check_split(cfg, processes: int) -> None:
    """The recipe's batches must split evenly over the processes (NlpkitError naming the key otherwise)."""
    cfg.train.per_device_batch(processes)
    if cfg.stage == "rlhf" and cfg.algo == "ppo" and cfg.ppo is not None:
        cfg.ppo.episodes_per_process(processes, cfg.train.gradient_accumulation_steps)


def relaunch(argv: list[str], num_processes: int, distributed: str | None) -> int:
    """Run `nlpkit ARGV` in num_processes processes under accelerate; the exit code of the main process."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(PRESETS_DIR / f"{distributed or 'ddp'}.yaml"),
        "--num_processes", str(num_processes),
        "--main_process_port", str(_free_port()),  # two runs on one machine must not share the default 29500
        "-m", "nlpkit", *argv,
    ]
    with tempfile.TemporaryDirectory() as scratch:
        exit_file = Path(scratch) / "exit.json"
        code = subprocess.call(command, env={**os.environ, EXIT_FILE: str(exit_file)})
        # accelerate turns any child failure into exit 1: the main process left the real code (bad input: 2).
        if code != 0 and exit_file.is_file():
            code = json.loads(exit_file.read_text())["exit_code"]
    return code


def finish() -> None:
    """End a launched process together with the others: the main process may still be evaluating or saving when
    the rest are done, and a process that exits with its communication threads running aborts (exit -6), which
    accelerate reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def record_exit(code: int) -> None:
    if EXIT_FILE in os.environ and is_main_process():
        Path(os.environ[EXIT_FILE]).write_text(json.dumps({"exit_code": code}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
