"""The schema: overrides, all errors at once, and every shipped recipe validates."""

import pytest

from nlpkit.config import validate_recipe
from nlpkit.recipes import apply_override, load_recipe, recipes_dir
from nlpkit.errors import NlpkitError


def test_overrides_parse_yaml_scalars_and_create_sections():
    raw = {"stage": "classify", "data": {"train": "x.csv"}}
    for override in ("train.learning_rate=3e-5", "train.bf16=false", "data.eval=null", "train.extra.max_grad_norm=0.5",
                     "data.label_names={0: neg, 1: pos}"):
        apply_override(raw, override)
    cfg = validate_recipe(raw)
    assert cfg.train.learning_rate == 3e-5 and cfg.train.bf16 is False and cfg.data.eval is None
    assert cfg.train.extra == {"max_grad_norm": 0.5}
    assert cfg.data.label_names == {"0": "neg", "1": "pos"}


def test_every_problem_is_reported_at_once():
    raw = {"stage": "classify", "data": {"train": "x.csv", "max_lenght": 3}, "train": {"learning_rate": -1, "sead": 1}}
    with pytest.raises(NlpkitError) as error:
        validate_recipe(raw, source="r.yaml")
    lines = str(error.value).splitlines()
    assert lines == [
        "r.yaml: data.max_lenght: unknown key; did you mean 'max_length'?",
        "r.yaml: train.learning_rate: input should be greater than 0 (got -1)",
        "r.yaml: train.sead: unknown key; did you mean 'seed'?",
    ]


@pytest.mark.parametrize("path", sorted(recipes_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_document_themselves(path):
    cfg = load_recipe(path)
    header = path.read_text().splitlines()[:4]
    assert header[0].startswith("# ") and any(line.startswith("# Run:") for line in header)
    assert cfg.stage in ("classify", "sft", "reward", "rlhf", "dpo", "kto", "orpo", "simpo")
