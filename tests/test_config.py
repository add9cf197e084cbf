"""The schema: overrides, all errors at once, and every shipped recipe validates."""

import pytest

from nlpkit.recipes import validate_recipe
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


def test_a_shipped_recipe_is_found_by_name_and_a_path_still_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the name must resolve to the package's copy
    by_name = load_recipe("classify-sst2")
    assert by_name.model.name == "minilm" and by_name.data.train == "sst2"
    own = tmp_path / "mine.yaml"
    own.write_text((recipes_dir() / "classify-sst2.yaml").read_text().replace("minilm", "./my-model"))
    assert load_recipe(own).model.name == "./my-model"  # a file wins over the shipped names


def test_an_unknown_recipe_name_is_exit_2_with_the_closest_shipped_name(tmp_path, monkeypatch):
    from helpers import nlpkit

    monkeypatch.chdir(tmp_path)
    result = nlpkit("finetune", "clasify-sst2-lora", "train.max_steps=1")
    assert result.code == 2
    assert "no shipped recipe of that name; did you mean 'classify-sst2-lora'?" in result.stderr
    unknown = nlpkit("finetune", "no-such-recipe")
    assert unknown.code == 2 and "shipped recipes: classify-agnews, classify-sst2-lora" in unknown.stderr


def test_recipes_lists_names_and_copy_writes_one_out_once(tmp_path):
    from helpers import nlpkit

    listed = nlpkit("recipes", "--json").json()["recipes"]
    assert set(listed) == {p.stem for p in recipes_dir().glob("*.yaml")} and "sft-dolly-lora" in listed
    copied = nlpkit("recipes", "--copy", "sft-dolly-lora", tmp_path / "mine", "--json")
    assert copied.code == 0, copied.stderr
    target = tmp_path / "mine" / "sft-dolly-lora.yaml"
    assert copied.json() == {"copied": str(target)}
    assert target.read_text() == (recipes_dir() / "sft-dolly-lora.yaml").read_text()
    again = nlpkit("recipes", "--copy", "sft-dolly-lora", tmp_path / "mine")
    assert again.code == 2 and "already exists" in again.stderr
    assert nlpkit("recipes", "--copy", "sft-doly-lora").code == 2
