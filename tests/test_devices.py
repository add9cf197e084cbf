"""Device handling of every inference path, checked without a GPU.

The `on_meta` fixture makes the meta device this process's device, so every model a path loads is placed there,
then records the devices of the first tensors the path hands to a model (to `generate()`, or to a forward pass
through its token embedding) and stops the path. A path that leaves its inputs on the CPU beside a model on another
device (the bug that loses a GPU run at its last step) records "cpu" and fails here.
"""

import pytest
import torch
import transformers

from conftest import FIXTURES
from helpers import nlpkit
from nlpkit import distributed


class Reached(Exception):
    """The path handed tensors to a model: what was recorded is what counts."""


@pytest.fixture
def on_meta(monkeypatch):
    seen = []

    def record(tensors):
        seen.append(sorted({t.device.type for t in tensors}))
        raise Reached

    def generate(self, *args, **kwargs):
        record([v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)])

    def embedding_input(module, args):
        if isinstance(module, torch.nn.Embedding) and module.weight.device.type == "meta":
            record([args[0]])

    monkeypatch.setattr(distributed, "process_device", lambda: torch.device("meta"))
    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(embedding_input)
    yield seen
    handle.remove()


def first_call(seen, result=None) -> list[str]:
    assert seen, f"no tensor reached a model{': ' + result.stderr[-2000:] if result is not None else ''}"
    return seen[0]


def test_chat_sends_the_prompt_to_the_models_device(on_meta, tiny_llama):
    result = nlpkit("chat", tiny_llama, "--prompt", "hello")
    assert first_call(on_meta, result) == ["meta"]


def test_embed_sends_the_texts_to_the_models_device(on_meta, tiny_bert):
    result = nlpkit("embed", tiny_bert, "--similar", "good food", "great food")
    assert first_call(on_meta, result) == ["meta"]


def test_quantize_times_and_scores_on_the_models_device(on_meta, tiny_llama):
    result = nlpkit("quantize", tiny_llama, "--bits", "8", "--eval-data", FIXTURES / "instructions.jsonl")
    assert first_call(on_meta, result) == ["meta"]  # the full-precision model's latency probe comes first


def test_merge_checks_logits_on_the_models_device(tmp_path, tiny_bert, monkeypatch):
    from test_adapters import train_classifier

    out, _ = train_classifier(tmp_path, tiny_bert, "--lora", max_steps=2)  # trained on the CPU, before the fixture
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "process_device", lambda: torch.device("meta"))

        def embedding_input(module, args):
            if isinstance(module, torch.nn.Embedding) and module.weight.device.type == "meta":
                seen.append(sorted({args[0].device.type}))
                raise Reached

        handle = torch.nn.modules.module.register_module_forward_pre_hook(embedding_input)
        try:
            result = nlpkit("merge", out, "--output-dir", tmp_path / "merged")
        finally:
            handle.remove()
    assert first_call(seen, result) == ["meta"]


def test_serving_sends_classify_and_chat_inputs_to_the_models_device(on_meta, tiny_bert, tiny_llama, tmp_path):
    from test_classify import CASES, make_recipe

    from nlpkit.batching import ChatBatcher, ChatJob, classify_texts
    from nlpkit.serve import load_served

    with pytest.MonkeyPatch.context() as cpu:  # the classifier run is trained on the CPU
        cpu.setattr(distributed, "process_device", lambda: torch.device("cpu"))
        run = tmp_path / "run"
        assert nlpkit("finetune", make_recipe(tmp_path, tiny_bert, CASES["binary"][0], max_steps=2),
                      "--output-dir", run).code == 0
    with pytest.raises(Reached):
        classify_texts(load_served(str(run)), ["a good film"])
    served = load_served(str(tiny_llama))
    with pytest.raises(Reached):
        ChatBatcher(served, max_batch=4)._generate([ChatJob([1, 2, 3], 4, 0.0, 1.0, None)])
    assert on_meta == [["meta"], ["meta"]]


def test_sft_end_of_run_generation_uses_the_models_device(on_meta, tiny_llama):
    from nlpkit.models import chat_tokenizer
    from nlpkit.stages.sft import generate

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).to("meta")
    tokenizer = chat_tokenizer(transformers.AutoTokenizer.from_pretrained(tiny_llama), None)
    with pytest.raises(Reached):
        generate(model, tokenizer, [[{"role": "user", "content": "hi"}]], max_new_tokens=4, bf16=False)
    assert on_meta == [["meta"]]


def test_classifier_prediction_loop_and_reward_scores_use_the_models_device(on_meta, tiny_bert, toy_llama):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from nlpkit.data import tokenize_classification
    from nlpkit.evaluate import predict_logits
    from nlpkit.scoring import score_ids

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).to("meta")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    dataset = tokenize_classification({"text": ["good food"], "label": [1]}, tokenizer, 32)
    with pytest.raises(Reached):
        predict_logits(classifier, dataset, DataCollatorWithPadding(tokenizer), bf16=False, batch_size=4)
    reward_model = AutoModelForSequenceClassification.from_pretrained(toy_llama, num_labels=1).to("meta")
    with pytest.raises(Reached):
        score_ids(reward_model, [[4, 5, 2]], pad_id=0, bf16=False)
    assert on_meta == [["meta"], ["meta"]]
