"""train.report_to: experiment trackers through transformers' integrations, offline by default (docs/outside.md)."""

import importlib.util

import pytest

from conftest import FIXTURES
from helpers import nlpkit


def sst2_on_fixtures(model) -> list[str]:
    """The shipped classify-sst2 recipe, by name, pointed at the tiny model and the fixture files."""
    return ["classify-sst2", f"model.name={model}", f"data.train={FIXTURES / 'sentiment_train.csv'}",
            f"data.eval={FIXTURES / 'sentiment_eval.csv'}", "train.logging_steps=1", "train.save_strategy='no'"]


def test_mlflow_gets_the_params_and_every_logged_step_in_its_local_store(tmp_path, tiny_bert, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the dev extra installs mlflow-skinny (make test does)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store: sqlite mlflow.db in the working directory
    result = nlpkit("finetune", *sst2_on_fixtures(tiny_bert), "train.max_steps=5", "train.report_to=[mlflow]",
                    "--output-dir", tmp_path / "run")
    assert result.code == 0, result.stderr
    assert not (tmp_path / "run" / "tensorboard").exists()  # report_to replaces the default, it does not add to it
    assert "also logged to: mlflow" in result.stderr

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert float(params["learning_rate"]) == 1e-4 and params["max_steps"] == "5"  # the recipe's train: section
    assert params["model_type"] == "bert" and params["hidden_size"] == "64", sorted(params)  # and the model config
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5]
    assert all(m.value > 0 for m in losses)
    evals = [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval_accuracy")]
    assert evals[-1] == 5 and evals == sorted(evals)  # every epoch's evaluation, the last at the last step


def test_a_tracker_that_is_not_installed_is_exit_2_naming_the_extra(tmp_path, tiny_bert, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = nlpkit("finetune", *sst2_on_fixtures(tiny_bert), "train.report_to=[tensorboard, wandb]",
                    "--output-dir", tmp_path / "run")
    assert result.code == 2
    assert 'train.report_to: wandb is not installed; pip install "nlpkit[wandb]"' in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_tracker_is_exit_2_with_the_choices(tmp_path, tiny_bert):
    result = nlpkit("plan", *sst2_on_fixtures(tiny_bert)[:3], "train.report_to=[mlfow]")
    assert result.code == 2 and "train.report_to" in result.stderr and "'mlflow'" in result.stderr
