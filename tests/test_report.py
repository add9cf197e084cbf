"""The end-of-run report on tiny models: loss.png, confusion_matrix.png, TensorBoard events, model card, summary."""

import json

import pytest
from test_classify import CASES, make_recipe
from test_sft import sft_recipe

from helpers import nlpkit
from nlpkit.report import best_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    """A PNG that decodes (magic bytes first, then matplotlib reads the pixels)."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    return pixels


def tensorboard_scalars(folder) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {folder}"
    scalars = {}
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
    return scalars


def test_classify_run_has_plots_events_card_and_summary(tmp_path, tiny_bert):
    out = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_bert, CASES["multiclass"][0], max_steps=20, eval_strategy="steps",
                         eval_steps=10)
    result = nlpkit("finetune", recipe, "--output-dir", out, "--json")
    assert result.code == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    read_png(out / "loss.png")
    pixels = read_png(out / "confusion_matrix.png")
    assert pixels[..., :3].std() > 0.05  # not a blank canvas

    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == pytest.approx([e["loss"] for e in log if "loss" in e], rel=1e-5)
    assert len(scalars["eval/loss"]) == 2  # evaluations at steps 10 and 20

    summary = metrics["summary"]
    assert summary["plots"] == ["loss.png", "confusion_matrix.png"]
    assert summary["final"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert summary["best"]["eval_loss"]["step"] in (10, 20)
    assert summary["best"]["eval_loss"]["value"] == min(e["eval_loss"] for e in log if "eval_loss" in e)
    assert summary["peak_memory_mb"] > 100 and summary["wall_seconds"] > 0
    assert summary["throughput"]["train_samples_per_second"] > 0
    assert result.json()["summary"] == summary  # --json carries the same summary

    # The human summary is on stderr, stdout holds only the JSON.
    for line in ("run summary", "best eval_loss", "peak memory (RSS)", "wall time", f"saved to {out}/",
                 f"next: nlpkit serve {out}"):
        assert line in result.stderr, line

    card = (out / "README.md").read_text()
    assert f"| eval_accuracy | {metrics['eval_accuracy']:.4f} |" in card
    assert "![loss](loss.png)" in card and "![confusion_matrix](confusion_matrix.png)" in card


def test_sft_run_has_loss_plot_events_and_card(tmp_path, tiny_llama):
    out = tmp_path / "run"
    result = nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "--output-dir", out)
    assert result.code == 0, result.stderr
    read_png(out / "loss.png")
    assert not (out / "confusion_matrix.png").exists()
    scalars = tensorboard_scalars(out / "tensorboard")
    assert len(scalars["train/loss"]) == 4  # 8 steps, logged every 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["final"]["eval_loss"] == metrics["eval_loss"]
    card = (out / "README.md").read_text()
    assert f"| eval_loss | {metrics['eval_loss']:.4f} |" in card and "nlpkit chat" in card
    assert "next: nlpkit chat" in result.stderr


def test_best_metrics_picks_lowest_loss_and_highest_score():
    log = [{"step": 5, "loss": 1.0}, {"step": 10, "eval_loss": 0.7, "eval_accuracy": 0.6, "eval_runtime": 1.0},
           {"step": 20, "eval_loss": 0.5, "eval_accuracy": 0.55}, {"step": 30, "eval_loss": 0.6, "eval_accuracy": 0.7}]
    assert best_metrics(log) == {"eval_loss": {"value": 0.5, "step": 20}, "eval_accuracy": {"value": 0.7, "step": 30}}
