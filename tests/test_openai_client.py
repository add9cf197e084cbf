"""The official `openai` client (a dev dependency) against a live `nlpkit serve` on loopback, as users point it: the
models list, plain and streamed answers, stop sequences, refused fields, embeddings, and a soak of mixed requests."""

import asyncio
import os
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn

from nlpkit.serve import create_app, load_served

QUESTION = [{"role": "user", "content": "hello there"}]


@contextmanager
def live(app):
    """Serve the app with uvicorn on a free loopback port in a thread; yield the base URL the client takes."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def chat_url(tiny_llama):
    with live(create_app(load_served(str(tiny_llama)), max_tokens_limit=16)) as url:
        yield url


@pytest.fixture(scope="module")
def embed_url(tiny_bert):
    served = load_served(str(tiny_bert))
    assert served.task == "embed"
    with live(create_app(served)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_models_list_names_the_served_model(chat_url, tiny_llama):
    assert [m.id for m in client(chat_url).models.list()] == [str(tiny_llama)]


def test_plain_and_streamed_answers_agree_and_count_their_tokens(chat_url, tiny_llama):
    api = client(chat_url)
    plain = api.chat.completions.create(model=str(tiny_llama), messages=QUESTION, max_tokens=12)
    answer = plain.choices[0]
    assert answer.message.role == "assistant" and answer.finish_reason in ("stop", "length")
    assert 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(api.chat.completions.create(model="any", messages=QUESTION, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.message.content  # greedy: the same answer either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_a_stop_sequence_ends_the_text_before_it(chat_url):
    api = client(chat_url)
    text = api.chat.completions.create(model="any", messages=QUESTION, max_tokens=16).choices[0].message.content
    assert len(text) >= 4, f"the tiny model's answer is too short to cut: {text!r}"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = api.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.find(stop)]


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("response_format", {"type": "json_object"}),
    ("n", 3),
    ("logprobs", True),
])
def test_a_field_that_would_change_the_answer_is_a_400_naming_it(chat_url, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        client(chat_url).chat.completions.create(model="any", messages=QUESTION, max_tokens=4, **{field: value})
    assert refused.value.status_code == 400 and field in refused.value.message


def test_embeddings_are_unit_vectors_one_per_input(embed_url, chat_url, tiny_bert):
    from nlpkit.embed import embed, load_encoder

    texts = ["good food", "a slow and boring film"]
    result = client(embed_url).embeddings.create(model="any", input=texts)
    got = torch.tensor([d.embedding for d in result.data])
    assert [d.index for d in result.data] == [0, 1] and result.usage.prompt_tokens > 0
    assert torch.allclose(got, embed(*load_encoder(str(tiny_bert)), texts), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
        client(chat_url).embeddings.create(model="any", input=texts)
    with pytest.raises(openai.BadRequestError, match="input"):
        client(embed_url).embeddings.create(model="any", input=[])


def resident_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc (Linux)")
def test_a_soak_of_1000_mixed_requests_has_no_error_and_no_memory_growth(chat_url, embed_url):
    """Plain, streamed and stopped answers, model lists and embeddings, 16 in flight at a time. The server runs in this
    process, so its resident memory is this process's (a stricter bound: the client's memory counts too)."""

    async def one(chat: openai.AsyncOpenAI, embeddings: openai.AsyncOpenAI, i: int) -> None:
        kind = i % 5
        if kind == 0:
            assert [m async for m in chat.models.list()]
        elif kind == 1:
            answer = await chat.chat.completions.create(model="any", messages=QUESTION, max_tokens=4)
            assert answer.choices[0].finish_reason in ("stop", "length")
        elif kind == 2:
            stream = await chat.chat.completions.create(model="any", messages=QUESTION, max_tokens=4, stream=True)
            assert [c async for c in stream][-1].choices[0].finish_reason in ("stop", "length")
        elif kind == 3:
            answer = await chat.chat.completions.create(model="any", messages=QUESTION, max_tokens=4, stop=["e"],
                                                        temperature=1.0, seed=i)
            assert "e" not in answer.choices[0].message.content
        else:
            result = await embeddings.embeddings.create(model="any", input=[f"text number {i}", "good food"])
            assert len(result.data) == 2

    async def soak(count: int) -> list[BaseException]:
        chat = openai.AsyncOpenAI(base_url=chat_url, api_key="unused", max_retries=0, timeout=120)
        embeddings = openai.AsyncOpenAI(base_url=embed_url, api_key="unused", max_retries=0, timeout=120)
        gate = asyncio.Semaphore(16)

        async def gated(i):
            async with gate:
                await one(chat, embeddings, i)

        results = await asyncio.gather(*(gated(i) for i in range(count)), return_exceptions=True)
        await chat.close()
        await embeddings.close()
        return [r for r in results if isinstance(r, BaseException)]

    assert asyncio.run(soak(100)) == []  # warm-up: allocator pools, the clients' connection pools
    before = resident_bytes()
    errors = asyncio.run(soak(1000))
    after = resident_bytes()
    print(f"soak: 1000 requests, {len(errors)} errors, resident {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert errors == [], f"{len(errors)} of 1000 failed; first: {errors[0]!r}"
    assert after <= 1.10 * before, f"resident memory grew from {before / 2**20:.0f} to {after / 2**20:.0f} MiB"
