"""PPO checkpoints: everything the next update depends on, so `nlpkit rlhf --resume` continues a killed run where it
stopped and ends where an unbroken run would have (tests/test_rlhf.py checks both).

A checkpoint is checkpoints/checkpoint-<update>/ with ppo_state.pt (trainable weights, optimiser, schedule, prompt
order, random states, episode count, prompt pool, KL coefficient) and training.py's marker, which --resume reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nlpkit import training
from nlpkit.config import Recipe
from nlpkit.errors import NlpkitError


def save_checkpoint(output_dir: Path, cfg: Recipe, update: int, episode: int, pool: list[dict], *, policy,
                    value_model, optimizer, scheduler, order, generator, kl_coef: float) -> None:
    """Everything the next update depends on, written to a temporary folder and renamed: a checkpoint appears whole
    or not at all. Policy and value are their trainable parameters (with LoRA: the adapters and the value head, not
    the frozen bases the recipe loads again); kl_coef is the adaptive controller's current value (the recipe's,
    which --resume checks is unchanged, when it is off)."""
    import torch

    folder = training.checkpoints_dir(output_dir) / f"checkpoint-{update}"
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = {"policy": trainable_weights(policy), "value_model": trainable_weights(value_model),
             "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "order": order.getstate(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(), "episode": episode, "pool": pool, "kl_coef": kl_coef}
    torch.save(state, staging / "ppo_state.pt")
    training.write_marker(staging, cfg, update)
    os.replace(staging, folder)
    training.rotate(training.checkpoints_dir(output_dir), cfg.train.save_total_limit)


def load_checkpoint(folder: Path, *, policy, value_model, optimizer, scheduler, order, generator, kl_coef: float):
    """Restore a save_checkpoint folder; returns the next update, the episode count, the prompt pool and the KL
    coefficient (the given one for a checkpoint written before the adaptive controller existed)."""
    import torch

    state = torch.load(folder / "ppo_state.pt", weights_only=True)
    for name, model in (("policy", policy), ("value_model", value_model)):
        trainable = trainable_weights(model)
        if state[name].keys() != trainable.keys():
            odd = sorted(state[name].keys() ^ trainable.keys())[0]
            raise NlpkitError(f"--resume: {folder} holds other {name} weights than this recipe trains ({odd}, ...); "
                              "resume with the recipe the run started with")
        model.load_state_dict(state[name], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    order.setstate(_as_tuples(state["order"]))
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    update = json.loads((folder / training.MARKER).read_text())["step"]
    return update + 1, state["episode"], state["pool"], state.get("kl_coef", kl_coef)


def trainable_weights(model) -> dict:
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
