"""What every Trainer-based stage shares: committed checkpoints, `--resume`, and the training watchdog.

Trainer writes `checkpoint-N/` in place, file by file, so a run killed mid-save leaves a folder that looks like a
checkpoint and cannot be loaded. We commit a checkpoint instead: once Trainer has written all of it (weights,
optimizer, scheduler, RNG states, trainer_state.json), `on_save` writes `nlpkit_checkpoint.json` into it, atomically
and last. `--resume` only considers committed checkpoints, so it never picks up a half-written one.

The watchdog looks at the gradients before every optimizer step: a NaN or inf stops the run before it reaches the
weights, so the last checkpoint and the model in memory stay good. A loss of exactly 0 over several logs means every
label is masked. Either stops the run (exit code 3) with what to change, or only warns (`train.watchdog: warn`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from nlpkit import report, runs
from nlpkit.distributed import world_size
from nlpkit.errors import NlpkitError, TrainingStopped

MARKER = "nlpkit_checkpoint.json"
# Keys that may change between a run and its --resume: they change when things are logged, saved or evaluated,
# never what is trained. Any other change would make the resumed run a different run.
RESUMABLE_CHANGES = {"train.logging_steps", "train.save_steps", "train.save_total_limit", "train.eval_steps",
                     "train.per_device_eval_batch_size", "train.watchdog", "generation.eos_check_prompts",
                     "generation.max_new_tokens"}
ZERO_LOSS_LOGS = 3  # consecutive logged losses of exactly 0 before the watchdog calls the labels masked


# ---------------------------------------------------------------------------------------------- trainer arguments


def trainer_kwargs(train, output_dir: Path, *, bf16: bool, has_eval: bool) -> dict:
    """The train: section as TrainingArguments keywords (SFTConfig and friends take the same), for every stage."""
    import torch

    copied = ("learning_rate", "num_train_epochs", "max_steps", "per_device_eval_batch_size",
              "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type", "seed",
              "train_sampling_strategy", "logging_steps", "eval_steps", "save_strategy", "save_steps")
    gpu = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir / "checkpoints"),
        **{name: getattr(train, name) for name in copied},
        "per_device_train_batch_size": train.per_device_batch(world_size()),
        "bf16": bf16,
        # GPUs without bf16 (T4, V100): fp16 autocast, with Trainer's loss scaling.
        "fp16": train.bf16 == "auto" and gpu and not torch.cuda.is_bf16_supported(including_emulation=False),
        "use_cpu": not gpu,  # transformers refuses CPU bf16 autocast without it
        "eval_strategy": train.eval_strategy if has_eval else "no",
        "report_to": "none",  # train.report_to's trackers come as callbacks: tracker_callbacks (PPO drives the same)
        # Trainer would delete old checkpoints before the new one is committed (training.py): we rotate after.
        "save_total_limit": None,
        "logging_nan_inf_filter": False,  # Trainer would log a NaN loss as the mean of earlier ones: show it
        # trl's configs turn activation checkpointing on: a second forward pass per step (about 30% of it) to
        # save memory models of this size rarely need. train.extra.gradient_checkpointing=true brings it back.
        "gradient_checkpointing": False,
        **train.extra,
    }


def classifier_arguments(cfg, output_dir: Path, *, bf16: bool, has_eval: bool):
    """TrainingArguments of a sequence classifier (classify; evaluation of a classify run)."""
    from transformers import TrainingArguments

    # Sequence-classification loss ignores num_items_in_batch: averaging tokens across devices would multiply
    # loss and gradients by the world size under DDP (docs/stack-notes.md trap 5).
    return TrainingArguments(**trainer_kwargs(cfg.train, output_dir, bf16=bf16, has_eval=has_eval),
                             average_tokens_across_devices=False)


def sft_config(cfg, output_dir: Path, *, bf16: bool, has_eval: bool):
    """trl's SFTConfig of a recipe (sft; evaluation of a causal LM). cfg None: a plain model evaluated."""
    from trl import SFTConfig

    from nlpkit.config import TrainSection

    if cfg is None:
        # Evaluating a plain model: batched as the shipped sft recipes batch their eval set (8 rows, length-grouped
        # with the default seed). Trainer's eval loss is a mean of per-batch means, so other batches give another
        # number, and this one reproduces a run's eval_loss_base.
        kwargs = trainer_kwargs(TrainSection(per_device_eval_batch_size=8), output_dir, bf16=bf16, has_eval=True)
        return SFTConfig(**kwargs, max_length=384)
    return SFTConfig(**trainer_kwargs(cfg.train, output_dir, bf16=bf16, has_eval=has_eval),
                     max_length=cfg.data.max_length, completion_only_loss=cfg.train.completion_only,
                     packing=cfg.train.packing)


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"  # trainer_kwargs points Trainer's output_dir here


def fit(trainer, cfg, checkpoint: Path | None, supervised: bool = True) -> dict:
    """trainer.train() with committed checkpoints and the watchdog, from `checkpoint` (see resume_point) if given.

    supervised=False (GRPO, RLOO): a loss of exactly 0 is normal there (a group whose completions all score alike
    has zero advantage), so it says nothing about masked labels.

    Returns train_loss over the whole run (Trainer's own covers only the steps since the resume) and throughput.
    """
    trainer.add_callback(commit_callback(cfg))
    trainer.add_callback(watchdog_callback(cfg.train.watchdog, zero_loss_is_masked=supervised))
    trainer.add_callback(epoch_seed_callback(cfg.train.seed))
    start_step = json.loads((checkpoint / MARKER).read_text())["step"] if checkpoint else 0
    args = trainer.args
    per_device, processes, accumulation = (args.per_device_train_batch_size, args.world_size,
                                           args.gradient_accumulation_steps)
    report.info(f"global batch {per_device * processes * accumulation} = {per_device} per process x {processes} "
                f"process(es) x {accumulation} accumulation step(s)")
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    steps = trainer.state.global_step
    # Loss summed before the checkpoint, from the logged windows (exact when checkpoints fall on logging steps).
    before = _logged_loss_sum(trainer.state.log_history, start_step)
    train_loss = (before + result.training_loss * (steps - start_step)) / max(steps, 1)
    return {"train_loss": train_loss, **report.throughput(result.metrics)}


# ---------------------------------------------------------------------------------------------- resume


def resume_point(output_dir: Path, cfg, resume: bool) -> Path | None:
    """With --resume, the newest committed checkpoint of output_dir, once the recipe is checked to describe the same
    run; call it before loading anything, so a refused resume answers at once. Drops what the killed run wrote
    after that checkpoint: partial checkpoints and log lines the resumed run writes again."""
    if not resume:
        return None
    if (output_dir / runs.MANIFEST).is_file():
        raise NlpkitError(f"--resume: {output_dir} holds a finished run; nothing to resume. Train into another "
                          "--output-dir to start again")
    checkpoints = committed(checkpoints_dir(output_dir))
    if not checkpoints:
        raise NlpkitError(f"--resume: {output_dir} has no complete checkpoint yet (train.save_strategy/save_steps "
                          "decide when one is written); run again without --resume into an empty --output-dir")
    latest = checkpoints[-1]
    marker = json.loads((latest / MARKER).read_text())
    now = report.redact(cfg.model_dump(mode="json"))
    changed = [key for key in _diff(marker["config"], now) if key not in RESUMABLE_CHANGES]
    if changed:
        shown = ", ".join(changed[:5])
        raise NlpkitError(f"--resume: the recipe changed since {latest.name} ({shown}); resume with the recipe the "
                          "run started with (see its checkpoint's nlpkit_checkpoint.json), or train into a new "
                          "--output-dir")
    step = marker["step"]
    if report.is_main_process():  # one process tidies up; the others only read
        for partial in checkpoints_dir(output_dir).glob("checkpoint-*"):
            if not (partial / MARKER).is_file():  # written when the run was killed: never loadable, never picked
                shutil.rmtree(partial, ignore_errors=True)
        truncate_log(output_dir / "train_log.jsonl", step)
    report.info(f"resuming from {latest} (step {step})")
    return latest


def write_marker(folder: Path, cfg, step: int) -> None:
    """Commit a checkpoint folder: the marker, written last and atomically, says everything else is there."""
    runs.write_json(folder / MARKER, {"step": step, "config": report.redact(cfg.model_dump(mode="json"))})


def rotate(checkpoints: Path, keep: int | None) -> None:
    """Only once a newer checkpoint is committed may old ones go (train.save_total_limit)."""
    for old in committed(checkpoints)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def committed(checkpoints: Path) -> list[Path]:
    """Checkpoints whose commit marker exists, oldest first."""
    found = [p for p in checkpoints.glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: json.loads((p / MARKER).read_text())["step"])


def _diff(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix]
    keys = sorted(set(old) | set(new))
    return [k for key in keys for k in _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)]


def truncate_log(path: Path, step: int, key: str = "step") -> None:
    """Drop log lines written after the checkpoint: the resumed run writes them again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)[key] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _logged_loss_sum(log_history: list[dict], up_to_step: int) -> float:
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= up_to_step:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total


# ---------------------------------------------------------------------------------------------- callbacks


def commit_callback(cfg):
    from transformers import TrainerCallback

    class CommitCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every process has written its part (its RNG state) before the checkpoint counts
            if state.is_world_process_zero:
                write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}", cfg, state.global_step)
                rotate(Path(args.output_dir), cfg.train.save_total_limit)

    return CommitCheckpoint()


def epoch_seed_callback(seed: int):
    """Draw each epoch's length-grouped batch order from seed + epoch, not from the global RNG.

    Trainer's LengthGroupedSampler shuffles with the global RNG, whose state at an epoch's start depends on every step
    before it; a run resumed mid-epoch restores the RNG of the checkpoint instead and would see other batches.
    Seeding by epoch (as accelerate does for random sampling) makes the order a function of the epoch alone.
    """
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    def samplers(loader):
        for holder in (loader, getattr(loader, "batch_sampler", None)):
            for name in ("sampler", "batch_sampler"):
                found = getattr(holder, name, None)
                yield found
                yield getattr(found, "sampler", None)

    class EpochSeed(TrainerCallback):
        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            epoch = math.floor((state.epoch or 0) + 1e-6)  # resumed mid-epoch: 3.33 -> 3; fresh: 3.0 -> 3
            for sampler in samplers(train_dataloader):
                if isinstance(sampler, LengthGroupedSampler):
                    sampler.generator = torch.Generator().manual_seed(seed + epoch)

    return EpochSeed()


def watchdog_callback(mode: str, zero_loss_is_masked: bool = True):
    import torch
    from transformers import TrainerCallback

    def trip(message: str):
        if mode == "stop":
            raise TrainingStopped(message)
        report.warn(message)

    class Watchdog(TrainerCallback):
        zero_logs = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
            if not math.isfinite(norm):
                trip(f"gradient norm is {norm} at step {state.global_step + 1}, so the weights were not updated. "
                     f"Train again into a new --output-dir with a lower train.learning_rate, or check the data of "
                     f"that step; {last_checkpoint(args.output_dir)}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                trip(f"training loss is {loss} at step {state.global_step}; lower train.learning_rate or check "
                     f"the data; {last_checkpoint(args.output_dir)}")
            self.zero_logs = self.zero_logs + 1 if loss == 0.0 and zero_loss_is_masked else 0
            if self.zero_logs == ZERO_LOSS_LOGS:
                trip(f"training loss has been exactly 0 for {ZERO_LOSS_LOGS} logs (step {state.global_step}): no "
                     "label is trained on. Check the label column, or for sft train.completion_only and "
                     "data.max_length (`nlpkit data check`)")

    return Watchdog()


def last_checkpoint(checkpoints: str) -> str:
    saved = committed(Path(checkpoints))
    return f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before this step"


# ---------------------------------------------------------------------------------------------- logging


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


def tracker_callbacks(train, output_dir: Path) -> list:
    """train.report_to as transformers' own integration callbacks, which every Trainer stage passes to its Trainer (the
    PPO loop: LoopTrackers, with the same defaults). Nothing waits on a network unless you ask for one:
    - tensorboard: events in OUTPUT_DIR/tensorboard (Trainer's default is under the checkpoints);
    - mlflow: MLflow's own default store, sqlite `mlflow.db` in the working directory, unless MLFLOW_TRACKING_URI
      (and MLFLOW_EXPERIMENT_NAME) say otherwise;
    - wandb: WANDB_MODE=offline unless set (`wandb sync` uploads later); trackio: its local store unless
      TRACKIO_SPACE_ID names a Space.
    recipes.check_recipe has already refused a tracker that is not installed (exit 2 naming the extra)."""
    import os

    from transformers.integrations import INTEGRATION_TO_CALLBACK

    if "wandb" in train.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
    callbacks = [INTEGRATION_TO_CALLBACK[name]() for name in train.report_to]
    for callback in callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(output_dir / "tensorboard")
    return callbacks


class LoopTrackers:
    """train.report_to for the loop we own (PPO), through each tracker's own API: transformers' callbacks need
    TrainingArguments, whose import brings peft and bitsandbytes (~50 MB a full-weight PPO run never uses). The same
    defaults as tracker_callbacks; the parameters are the resolved recipe, flattened (ppo.kl_coef, train.seed, ...)."""

    def __init__(self, cfg, output_dir: Path):
        import importlib
        import os

        self.report_to = cfg.train.report_to
        params = _flatten(cfg.model_dump(mode="json"))
        name = output_dir.name
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        if "mlflow" in self.report_to:
            import mlflow

            if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
            mlflow.start_run(run_name=name)
            mlflow.log_params(params)
        for tracker in {"wandb", "trackio"} & set(self.report_to):  # the same API: init, log, finish
            if tracker == "wandb":
                os.environ.setdefault("WANDB_MODE", "offline")
            module = importlib.import_module(tracker)
            module.init(project=os.environ.get(f"{tracker.upper()}_PROJECT", "nlpkit"), name=name, config=params)

    def log(self, step: int, stats: dict) -> None:
        stats = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "tensorboard" in self.report_to:
            for key, value in stats.items():
                self.writer.add_scalar(key, value, step)
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.log_metrics(stats, step=step)
        for tracker in {"wandb", "trackio"} & set(self.report_to):
            __import__(tracker).log(stats, step=step)

    def close(self) -> None:
        if "tensorboard" in self.report_to:
            self.writer.close()
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.end_run()
        for tracker in {"wandb", "trackio"} & set(self.report_to):
            __import__(tracker).finish()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
