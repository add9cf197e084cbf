"""nlpkit serve through FastAPI's TestClient: every endpoint on a tiny chat model and a tiny classifier, every 4xx."""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from nlpkit.serve import create_app, load_served

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def tiny_classifier(tiny_bert, tmp_path_factory):
    """The tiny BERT with a 2-label head, saved like a hub classifier (no training needed to test serving)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_served(tiny_llama):
    return load_served(str(tiny_llama))


@pytest.fixture(scope="module")
def chat_client(chat_served):
    return TestClient(create_app(chat_served, max_tokens_limit=16, max_request_bytes=2000))


@pytest.fixture(scope="module")
def classify_client(tiny_classifier):
    return TestClient(create_app(load_served(str(tiny_classifier)), max_request_bytes=2000, max_batch=4))


def ask(client, **body):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello there"}],
                                                     **body})


def error_of(response) -> dict:
    return response.json()["error"]


# ---------------------------------------------------------------------------------------------- endpoints


def test_health_and_page(chat_client, classify_client):
    health = chat_client.get("/health").json()
    assert health["task"] == "chat" and health["max_tokens_limit"] == 16 and health["api_key_required"] is False
    health = classify_client.get("/health").json()
    assert health["task"] == "classify" and health["labels"] == LABELS
    page = chat_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="input"' in page.text and "/v1/chat/completions" in page.text and "/v1/classify" in page.text


def test_classify_scores_every_label(classify_client, tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a gripping, beautifully acted film", "the plot is thin"]
    response = classify_client.post("/v1/classify", json={"input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    # The same probabilities as the model run by hand.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    batch = AutoTokenizer.from_pretrained(tiny_classifier)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.softmax(-1)
    for result, probs in zip(data, expected):
        scores = {s["label"]: s["score"] for s in result["scores"]}
        assert set(scores) == set(LABELS)
        assert scores == pytest.approx({label: p for label, p in zip(LABELS, probs.tolist())}, abs=1e-5)
        assert result["label"] == LABELS[int(probs.argmax())] and result["score"] == max(scores.values())
    single = classify_client.post("/v1/classify", json={"input": texts[0]}).json()["data"]
    assert len(single) == 1 and single[0]["label"] == data[0]["label"]
    assert single[0]["score"] == pytest.approx(data[0]["score"], abs=1e-5)  # padding in a batch changes nothing


def test_chat_completion_is_the_models_greedy_answer(chat_client, chat_served):
    response = ask(chat_client, max_tokens=8)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")

    tokenizer, model = chat_served.tokenizer, chat_served.model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[0, prompt["input_ids"].shape[1]:]
    assert choice["message"]["content"] == tokenizer.decode(out, skip_special_tokens=True)
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt["input_ids"].shape[1]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("stop" if tokenizer.eos_token_id in out.tolist() else "length")


def test_chat_streams_openai_server_sent_events(chat_client):
    plain = ask(chat_client, max_tokens=8).json()["choices"][0]
    with chat_client.stream("POST", "/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8,
                                  "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["message"]["content"]  # greedy: the stream and the plain answer agree


def test_sampling_with_a_seed_repeats_and_temperature_samples(chat_client):
    def answer(**settings):
        return ask(chat_client, max_tokens=8, **settings).json()["choices"][0]["message"]["content"]

    assert answer(temperature=1.0, seed=3) == answer(temperature=1.0, seed=3)
    # And it does sample: a server that ignored the temperature would answer greedily every time.
    greedy = answer(temperature=0.0)
    assert any(answer(temperature=1.0, seed=seed) != greedy for seed in range(4))


# ---------------------------------------------------------------------------------------------- 4xx


def test_bad_json_is_400(chat_client, classify_client):
    for client, path in ((chat_client, "/v1/chat/completions"), (classify_client, "/v1/classify")):
        response = client.post(path, content=b'{"input": "unterminated', headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert error_of(response)["code"] == "json_invalid" and "not valid JSON" in error_of(response)["message"]


def test_too_large_is_413(chat_client, classify_client):
    response = classify_client.post("/v1/classify", json={"input": "word " * 1000})
    assert response.status_code == 413 and "2000 bytes" in error_of(response)["message"]
    # Without a Content-Length header (chunked upload), the body is read up to the limit and refused there.
    response = chat_client.post("/v1/chat/completions", content=iter([b'{"messages": "' + b"x" * 1500, b"x" * 1500]))
    assert response.status_code == 413


def test_max_tokens_over_the_limit_is_400(chat_client):
    response = ask(chat_client, max_tokens=17)
    assert response.status_code == 400
    assert error_of(response)["param"] == "max_tokens" and "limit of 16" in error_of(response)["message"]
    assert ask(chat_client, max_completion_tokens=100).status_code == 400
    assert ask(chat_client, max_tokens=0).status_code == 400


def test_prompt_longer_than_the_context_is_400(chat_client):
    # The tiny Llama has a 128-token context.
    response = chat_client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "tech news " * 60}], "max_tokens": 8})
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded"


def test_wrong_endpoint_for_the_model_is_400(chat_client, classify_client):
    response = chat_client.post("/v1/classify", json={"input": "hello"})
    assert response.status_code == 400 and "/v1/chat/completions" in error_of(response)["message"]
    response = ask(classify_client)
    assert response.status_code == 400 and "/v1/classify" in error_of(response)["message"]


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
])
def test_invalid_chat_fields_are_400_naming_the_field(chat_client, body, param):
    response = chat_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param and error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": 3}, {"input": "x", "inputs": "y"},
                                  {"input": ["a", "b", "c", "d", "e"]}])
def test_invalid_classify_bodies_are_400(classify_client, body):
    assert classify_client.post("/v1/classify", json=body).status_code == 400


def test_api_key(tiny_classifier):
    client = TestClient(create_app(load_served(str(tiny_classifier)), api_key="s3cret"))
    body = {"input": "a fine film"}
    assert client.post("/v1/classify", json=body).status_code == 401
    wrong = client.post("/v1/classify", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and error_of(wrong)["type"] == "authentication_error"
    assert wrong.headers["www-authenticate"] == "Bearer"
    # The key is checked before the body: a bad body without the key is still 401, not 400.
    assert client.post("/v1/classify", content=b"{", headers={"content-type": "application/json"}).status_code == 401
    assert client.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/v1/classify", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200  # the page asks for it


def test_unknown_path_is_404(chat_client):
    response = chat_client.get("/v1/models/none")
    assert response.status_code == 404 and "error" in response.json()


def test_embeddings_of_an_encoder_and_of_a_classifier_run_are_nlpkit_embeds(tiny_bert, tiny_classifier):
    """An encoder without a head serves /v1/embeddings (OpenAI's shape); a classifier run serves them from its own
    encoder. The vectors are `nlpkit embed`'s: mean-pooled over real tokens, unit length."""
    from nlpkit.embed import embed, load_encoder

    texts = ["good food", "a much longer sentence about the weather today"]
    encoder_client = TestClient(create_app(load_served(str(tiny_bert))))
    assert encoder_client.get("/health").json()["task"] == "embed"
    response = encoder_client.post("/v1/embeddings", json={"input": texts, "model": "any"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] > len(texts)
    expected = embed(*load_encoder(str(tiny_bert)), texts)
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)

    classifier_client = TestClient(create_app(load_served(str(tiny_classifier))))
    single = classifier_client.post("/v1/embeddings", json={"input": "good food"}).json()["data"]
    batched = classifier_client.post("/v1/embeddings", json={"input": texts}).json()["data"]
    assert len(single) == 1 and torch.allclose(torch.tensor(single[0]["embedding"]),
                                               torch.tensor(batched[0]["embedding"]), atol=1e-5)


@pytest.mark.parametrize("body, message", [
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input: 1 to"),
    ({"input": "fine", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "fine", "dimensions": 8}, "dimensions: not supported by nlpkit serve"),
])
def test_bad_embeddings_requests_are_400(classify_client, body, message):
    response = classify_client.post("/v1/embeddings", json=body)
    assert response.status_code == 400 and message in error_of(response)["message"], response.text


def test_embeddings_of_a_causal_lm_point_to_chat(chat_client):
    response = chat_client.post("/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 400 and "/v1/chat/completions" in error_of(response)["message"]


def test_concurrent_classify_requests_share_forward_passes(tiny_classifier):
    from nlpkit.batching import TextBatcher, classify_texts

    served = load_served(str(tiny_classifier))
    requests = [["good food"], ["the team won", "tech news"], ["bad"], ["a fine film", "dull", "great"]]
    alone = [classify_texts(served, texts) for texts in requests]
    passes = []
    served.model.register_forward_hook(lambda module, args, kwargs_or_out: passes.append(1))
    batcher = TextBatcher(served, classify_texts, max_batch=64)
    with served.lock:  # the model is busy: every request queues up meanwhile
        futures = [batcher.submit(texts) for texts in requests]
    results = [f.result(timeout=60) for f in futures]
    assert len(passes) <= 2  # the first request alone (taken before the lock was seen), then the rest together
    for got, expected in zip(results, alone):
        assert [r["label"] for r in got] == [r["label"] for r in expected]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_concurrent_chat_answers_are_generated_together_and_each_stops_on_its_own(chat_served):
    from nlpkit.batching import ChatBatcher

    tokenizer, model = chat_served.tokenizer, chat_served.model
    questions = [("hello there", 8), ("good food and tech news today", 3), ("the team", 12)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for q, _ in questions]
    alone = []
    for prompt, (_, limit) in zip(prompts, questions):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=limit, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        alone.append(out[0, len(prompt):].tolist())
    passes = []
    original = model.generate
    model.generate = lambda *a, **k: passes.append(k["input_ids"].shape[0]) or original(*a, **k)
    try:
        batcher = ChatBatcher(chat_served, max_batch=16)
        with chat_served.lock:  # the model is busy: all three queue up and go in one batch
            jobs = [batcher.submit(p, limit, 0.0, 1.0, None) for p, (_, limit) in zip(prompts, questions)]
        answers = ["".join(job) for job in jobs]
    finally:
        model.generate = original
    assert sum(passes) == 3 and len(passes) <= 2  # one alone at most (taken before the lock), then together
    for job, answer, tokens, (_, limit) in zip(jobs, answers, alone, questions):
        eos = tokenizer.eos_token_id
        expected = tokens[:tokens.index(eos)] if eos in tokens else tokens
        assert answer == tokenizer.decode(expected, skip_special_tokens=True)  # left padding changes nothing
        assert job.finish_reason == ("stop" if eos in tokens else "length")
        assert job.completion_tokens == min(len(tokens), limit) and job.completion_tokens <= limit


def test_a_template_that_refuses_the_messages_is_400(tiny_llama):
    served = load_served(str(tiny_llama))
    served.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                      "{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}"
                                      "{% endfor %}")
    client = TestClient(create_app(served))
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "be brief"}]})
    assert response.status_code == 400 and "no system messages" in error_of(response)["message"]


def stream_events(client, **body) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hello there"}], "stream": True, **body}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in events[:-1]]


def test_models_list_names_the_served_model(chat_client, chat_served):
    listed = chat_client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [chat_served.name]


def test_stop_sequences_end_the_answer_before_them_plain_and_streamed(chat_client):
    full = ask(chat_client, max_tokens=16).json()["choices"][0]
    text = full["message"]["content"]
    assert len(text) >= 4, text  # greedy, 16 tokens of a random model: enough text to cut in the middle
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)]
    cut = ask(chat_client, max_tokens=16, stop=[stop, "never in this answer"]).json()["choices"][0]
    assert cut["message"]["content"] == expected and cut["finish_reason"] == "stop"
    chunks = stream_events(chat_client, max_tokens=16, stop=stop)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_usage_when_asked_and_harmless_fields_accepted(chat_client):
    plain = ask(chat_client, max_tokens=8, user="a lab script").json()
    chunks = stream_events(chat_client, max_tokens=8, stream_options={"include_usage": True})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all("usage" not in c for c in stream_events(chat_client, max_tokens=8))


def test_stop_sequence_helpers():
    from nlpkit.batching import held_back, stop_index

    assert stop_index("one two. three", (".", "two")) == 4 and stop_index("abc", ("x",)) is None
    assert held_back("the answer is\n", ("\n\n",)) == 1 and held_back("abc", ("\n\n",)) == 0



def test_an_adapter_run_is_served_with_its_adapter_folded_in(tmp_path, tiny_llama):
    """A LoRA run answers as its base plus adapter, merged at load: no adapter layers left to run per token."""
    from transformers import AutoModelForCausalLM

    from helpers import nlpkit
    from nlpkit.runs import load_model, open_run
    from test_sft import sft_recipe

    run = tmp_path / "run"
    assert nlpkit("finetune", sft_recipe(tmp_path, tiny_llama), "--lora", "--output-dir", run).code == 0
    served = load_served(str(run))
    assert served.task == "chat" and not hasattr(served.model, "peft_config")
    dtype = served.model.dtype
    ids = torch.tensor([[5, 17, 40, 3, 99, 12]])
    with torch.inference_mode():
        merged = served.model(ids).logits.float()
        with_adapter = load_model(open_run(run), dtype=dtype)(ids).logits.float()
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)(ids).logits.float()
    folding = (merged - with_adapter).abs().max()
    assert folding <= (3e-2 if dtype == torch.bfloat16 else 1e-4)  # bf16 rounds the merged weights once
    assert (merged - base).abs().max() > 5 * folding  # the adapter is in the served weights
