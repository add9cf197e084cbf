"""The commands that train or plan a run: finetune, rlhf, plan, recipes."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlpkit.cli.common import (BitsOpt, DistributedOpt, JsonOpt, LoraOpt, OutputOpt, OverridesArg, ProcessesOpt,
                               RecipeArg, ResumeOpt, execute, flag_overrides)
from nlpkit.errors import NlpkitError
from nlpkit.runs import claim_output_dir

STAGES = {  # a recipe's stage (rlhf: with its algo) -> the module whose run(cfg, output_dir, resume) trains it
    "classify": "nlpkit.stages.classify",
    "sft": "nlpkit.stages.sft",
    "reward": "nlpkit.stages.reward",
    "rlhf/ppo": "nlpkit.stages.ppo",  # nlpkit's own loop
    "rlhf/grpo": "nlpkit.stages.grpo",  # trl's GRPOTrainer and RLOOTrainer, with nlpkit's scoring
    "rlhf/rloo": "nlpkit.stages.grpo",
    **dict.fromkeys(("dpo", "kto", "orpo", "simpo"), "nlpkit.stages.dpo"),  # trl's preference trainers
}



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
    sugar = flag_overrides(lora, bits) + (["model.allow_pickle=true"] if allow_pickle else [])
    _train("finetune", recipe, sugar + (overrides or []), output_dir, resume, num_processes, distributed, as_json)


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

        execute(check_then_claim, as_json=False)
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

    execute(work, as_json)  # the stage printed the run summary on stderr


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
        cfg = load_recipe(recipe, flag_overrides(lora, bits) + (overrides or []))
        if device not in (None, "cpu", "cuda"):
            raise NlpkitError(f"--device {device}: plan for cpu or cuda")
        return planning.plan(cfg, num_processes=num_processes, memory_mb=budget, device=device)

    def show(result):
        from nlpkit.plan import print_plan

        print_plan(result)

    execute(work, as_json, show=show)


def recipes(copy: Annotated[Optional[str], typer.Option("--copy", help="Write this shipped recipe out to edit.")] = None,
            to: Annotated[Optional[Path], typer.Argument(help="With --copy: a folder or FILE.yaml (default: .)")] = None,
            as_json: JsonOpt = False):
    """List the shipped recipes (`nlpkit finetune NAME` runs one), or copy one out with --copy NAME [DIR]."""
    from nlpkit import recipes as files  # yaml and pydantic: light

    work = lambda: {"copied": str(files.copy_recipe(copy, to))} if copy else {"recipes": files.shipped()}  # noqa: E731
    execute(work, as_json, show=lambda r: [print(f"{k:24s} {v}") for k, v in r.get("recipes", r).items()])


