"""`nlpkit serve`: a FastAPI app around one model, and one static page to try it.

    nlpkit serve runs/sft-dolly                       # a causal LM: /v1/chat/completions (OpenAI-compatible)
    nlpkit serve runs/sst2 --port 8001                # a classifier: /v1/classify
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: `GET /health`, `GET /` (the page), `POST /v1/chat/completions` (with `"stream": true`: server-sent events
as OpenAI sends them, `data: {...}` chunks and a closing `data: [DONE]`), `POST /v1/classify`. Errors are OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status that says whose fault it is.

One model, one lock: work runs one piece at a time on the model, and requests that arrive while it is busy are
batched (batching.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from importlib import resources
from typing import Literal

import numpy as np
from fastapi import FastAPI
from jinja2 import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from nlpkit.batching import ChatBatcher, ChatJob, Served, TextBatcher, classify_texts, embed_texts
from nlpkit.errors import NlpkitError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ENDPOINTS = {"chat": "/v1/chat/completions", "classify": "/v1/classify and /v1/embeddings", "embed": "/v1/embeddings"}


def load_served(ref: str) -> Served:
    """A run directory (classify or sft), an embedded alias, or a model directory -> a Served model."""
    from nlpkit import runs

    if runs.is_run(ref):
        run = runs.open_run(ref)
        if run.stage == "classify":
            task = run.task
            return Served(ref, "classify", runs.load_model(run), runs.load_tokenizer(run), task["max_length"],
                          task["labels"] or [], task["problem_type"])
    kind = _model_kind(ref)
    if kind == "embed":
        from nlpkit.embed import load_encoder

        encoder, tokenizer = load_encoder(ref)
        return Served(ref, "embed", encoder, tokenizer, min(tokenizer.model_max_length, 512))
    if kind == "classify":
        from transformers import AutoModelForSequenceClassification

        from nlpkit.config import ModelSection
        from nlpkit.distributed import place
        from nlpkit.models import load_model, load_tokenizer

        model_cfg = ModelSection(name=ref)
        model = place(load_model(AutoModelForSequenceClassification, model_cfg, frozen=True)).eval()
        tokenizer = load_tokenizer(model_cfg)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        problem = model.config.problem_type or "single_label_classification"
        return Served(ref, "classify", model, tokenizer, min(tokenizer.model_max_length, 512), labels, problem)
    # Answers are only generated, never trained on: bf16 weights where the CPU has bf16 units (avx512_bf16, AMX)
    # decode faster than fp32, as transformers serve does by default; elsewhere the loader's choice (bf16 on a GPU).
    import torch

    from nlpkit.models import bf16_is_fast

    model, tokenizer = runs.load_causal_lm(ref, **(
        {"dtype": torch.bfloat16} if not torch.cuda.is_available() and bf16_is_fast() else {}))
    return Served(ref, "chat", model, tokenizer, model.config.max_position_embeddings)


def _model_kind(ref: str) -> str:
    """Chat, classify or embed, from the saved config's architectures."""
    from transformers import AutoConfig

    from nlpkit.models import resolve_model

    architectures = AutoConfig.from_pretrained(resolve_model(ref)).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classify"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "chat"
    if not architectures or any(a.endswith("Model") for a in architectures):  # BertModel, MPNetModel: an encoder
        return "embed"
    raise NlpkitError(f"MODEL {ref}: a {', '.join(architectures)} model has no classification or language-model "
                      "head and is no plain encoder; fine-tune a classifier (nlpkit finetune classify-sst2) "
                      "and serve the run directory")


# ---------------------------------------------------------------------------------------------- requests


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with the token counts, as OpenAI sends it


class ChatRequest(BaseModel):
    # Every field that would change the answer is honored or refused (400 naming it), never silently ignored. `user`
    # only labels a request: accepted and ignored.
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)  # the newer OpenAI name for max_tokens
    temperature: float = Field(0.0, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = 1  # one answer per request
    stop: str | list[str] | None = None  # up to 4 sequences; the answer ends before the first, which is not sent
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_answer(cls, value):
        if value != 1:
            raise ValueError(f"nlpkit serve gives one answer per request (got {value}); send {value} requests, with "
                             "a temperature above 0 for different answers")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("log-probabilities are not returned by nlpkit serve; leave the field out")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("up to 4 non-empty stop sequences")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # dimensions, ...: would change the vectors
    input: str | list[str] = Field(min_length=1)  # a text, or a batch of texts
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes (the openai client's default)
    user: str | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] = Field(min_length=1)  # a text, or a batch of texts
    model: str | None = None


def api_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ---------------------------------------------------------------------------------------------- the app


def create_app(served: Served, *, api_key: str | None = None, max_request_bytes: int = 64_000,
               max_tokens_limit: int = 512, max_batch: int = 64, max_chat_batch: int = 32) -> FastAPI:
    """The app for one served model. `api_key` guards /v1/* (the page and /health stay open, the page asks for it)."""
    app = FastAPI(title=f"nlpkit serve {served.name}", docs_url="/docs", redoc_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_bytes=max_request_bytes)
    batcher = TextBatcher(served, classify_texts, max_batch) if served.task == "classify" else None
    embedder = TextBatcher(served, embed_texts, max_batch) if served.task in ("classify", "embed") else None
    chat_batcher = ChatBatcher(served, max_chat_batch) if served.task == "chat" else None
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return api_error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return api_error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                             code="json_invalid")
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None

        def problem(err) -> str:
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            if err["type"] == "extra_forbidden":  # tools, response_format, logit_bias, ...: would change the answer
                return f"{where}: not supported by nlpkit serve; leave it out"
            return f"{where}: {err['msg'].removeprefix('Value error, ')}"

        problems = "; ".join(problem(err) for err in e.errors())
        return api_error(400, problems, param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return api_error(e.status_code, str(e.detail))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": served.name, "task": served.task, "labels": served.labels,
                "dtype": str(served.model.dtype).removeprefix("torch."),
                "max_tokens_limit": max_tokens_limit if served.task == "chat" else None,
                "api_key_required": api_key is not None}

    @app.get("/v1/models")
    def models():  # what OpenAI clients and chat UIs ask first
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": started,
                                            "owned_by": "nlpkit"}]}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return resources.files("nlpkit").joinpath("static/index.html").read_text()

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        if served.task != "classify":
            raise ApiError(400, f"{served.name} answers on {ENDPOINTS[served.task]}, not /v1/classify",
                           code="wrong_endpoint")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > max_batch:
            raise ApiError(400, f"input: {len(texts)} texts; at most {max_batch} per request", param="input")
        results = await asyncio.wrap_future(batcher.submit(texts))
        return {"object": "list", "model": served.name, "data": [{**r, "index": i} for i, r in enumerate(results)]}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest):
        if served.task == "chat":
            raise ApiError(400, f"{served.name} is a causal LM: it answers on /v1/chat/completions; serve an encoder "
                                "(minilm) or a classifier run for embeddings", code="wrong_endpoint")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > max_batch or not all(texts):
            raise ApiError(400, f"input: 1 to {max_batch} non-empty texts per request", param="input")
        rows = await asyncio.wrap_future(embedder.submit(texts))
        vectors, tokens = [vector for vector, _ in rows], sum(count for _, count in rows)
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        return {"object": "list", "model": served.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):  # async: a waiting answer holds no thread, so any number can queue
        if served.task != "chat":
            raise ApiError(400, f"{served.name} answers on {ENDPOINTS[served.task]}, not /v1/chat/completions",
                           code="wrong_endpoint")
        wanted = body.max_completion_tokens or body.max_tokens or max_tokens_limit
        if wanted > max_tokens_limit:
            raise ApiError(400, f"max_tokens: {wanted} is above this server's limit of {max_tokens_limit} "
                                "(nlpkit serve --max-tokens-limit); ask for fewer", param="max_tokens")
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                          return_tensors="pt")
        except (TemplateError, ValueError, TypeError) as e:  # the template's own checks, e.g. alternating roles
            raise ApiError(400, f"messages: the model's chat template refused them ({e})", param="messages") from None
        used = prompt["input_ids"].shape[1]
        if used + wanted > served.max_length:
            raise ApiError(400, f"messages: the prompt is {used} tokens, and with max_tokens {wanted} it exceeds the "
                                f"model's context of {served.max_length} tokens; shorten it or ask for fewer tokens",
                           param="messages", code="context_length_exceeded")
        stream = chat_batcher.submit(prompt["input_ids"][0].tolist(), wanted, body.temperature, body.top_p,
                                     body.seed, loop=asyncio.get_running_loop(), stop=body.stop_sequences())
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "created": created, "model": served.name}
        if body.stream:
            usage_for = used if body.stream_options is not None and body.stream_options.include_usage else None
            return StreamingResponse(_sse(stream, head, usage_for), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = "".join([piece async for piece in stream])
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stream.finish_reason}],
                "usage": {"prompt_tokens": used, "completion_tokens": stream.completion_tokens,
                          "total_tokens": used + stream.completion_tokens}}

    return app


async def _sse(stream: ChatJob, head: dict, prompt_tokens: int | None = None):
    """OpenAI's streaming format: a role chunk, content chunks, a finish chunk, with prompt_tokens (include_usage) a
    chunk with no choices and the token counts, then `data: [DONE]`."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in stream:
            yield chunk({"content": piece})
        yield chunk({}, stream.finish_reason)
        if prompt_tokens is not None:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": stream.completion_tokens,
                     "total_tokens": prompt_tokens + stream.completion_tokens}
            yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stream.close()  # a client that disconnected mid-answer frees the model at the next token


class _Guard:
    """ASGI middleware for /v1/*: the API key (401) before anything else, then the body size (413), read up to the
    limit and no further, so an oversized request costs neither parsing nor memory."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers):
            return await api_error(401, "missing or wrong API key: send `Authorization: Bearer KEY` (or `X-API-Key: "
                                        "KEY`) with the key given to nlpkit serve --api-key",
                                   code="invalid_api_key")(scope, receive, send)
        too_large = api_error(413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                                   "(nlpkit serve --max-request-kb)", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the client's disconnect, as the app expects

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "")
        return secrets.compare_digest(given.encode(), self.api_key.encode())  # constant time: no timing oracle


def run_server(served: Served, host: str, port: int, **limits) -> None:
    import uvicorn

    from nlpkit import report

    if host not in LOOPBACK and limits.get("api_key") is None:
        report.warn(f"--host {host}: reachable from other machines with no API key; add --api-key KEY (or "
                    "NLPKIT_API_KEY) unless this network is yours alone")
    app = create_app(served, **limits)
    shown = f"[{host}]" if ":" in host else host
    report.info(f"serving {served.name} ({served.task}) on http://{shown}:{port}/ - the page at /, the API under /v1/ "
                f"({ENDPOINTS[served.task]}); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning")
