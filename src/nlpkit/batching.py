"""The model side of `nlpkit serve`: one piece of work on the model at a time, with the requests that arrive
meanwhile batched. On a few CPU cores two forward passes side by side only fight over the same cores, and one lock
keeps peak memory at one batch's worth. Every queued classify or embeddings text goes into one forward pass (up to
max_batch); up to 32 chat answers go into one generate() call, each streamed on its own and stopped at its own EOS or
max_tokens.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Literal


@dataclass
class Served:
    """A loaded model and what the endpoints need to know about it."""

    name: str
    task: Literal["chat", "classify", "embed"]  # embed: an encoder without a head (classifiers embed too)
    model: Any
    tokenizer: Any
    max_length: int  # classify: inputs are truncated to it; chat: the context window (prompt + answer)
    labels: list[str] = field(default_factory=list)  # classify; empty for a regression head
    problem_type: str = "single_label_classification"
    lock: threading.Lock = field(default_factory=threading.Lock)


def embed_texts(served: Served, texts: list[str]) -> list[tuple[list[float], int]]:
    """Each text's unit-length mean-pooled embedding from the served encoder (a classifier's own encoder, its head
    dropped), as `nlpkit embed` computes them, and the number of tokens it read (the usage OpenAI reports)."""
    from nlpkit.embed import embed

    model = served.model.get_base_model() if hasattr(served.model, "get_base_model") else served.model  # adapters on
    with served.lock:
        vectors = embed(model.base_model, served.tokenizer, texts, max_length=served.max_length)
    encoded = served.tokenizer(texts, truncation=True, max_length=served.max_length)["input_ids"]
    return [(vector, len(ids)) for vector, ids in zip(vectors.tolist(), encoded)]


def classify_texts(served: Served, texts: list[str]) -> list[dict]:
    """Scores for each text: softmax over labels (single-label), a sigmoid per label (multi-label), or the value."""
    import torch

    batch = served.tokenizer(texts, truncation=True, max_length=served.max_length, padding=True,
                             return_tensors="pt").to(served.model.device)
    with served.lock, torch.inference_mode():
        logits = served.model(**batch).logits.float()
    results = []
    for index, row in enumerate(logits):
        if served.problem_type == "regression":
            results.append({"index": index, "value": row[0].item()})
            continue
        probs = row.sigmoid() if served.problem_type == "multi_label_classification" else row.softmax(-1)
        scores = sorted(({"label": label, "score": p} for label, p in zip(served.labels, probs.tolist())),
                        key=lambda s: -s["score"])
        results.append({"index": index, "label": scores[0]["label"], "score": scores[0]["score"], "scores": scores})
    return results


class TextBatcher:
    """One worker thread runs the model; requests queue their texts and wait on a future. Each pass takes every
    request waiting (up to max_batch texts) and gives them all to `score` (classify_texts, embed_texts: one result
    per text), so a burst of requests costs a few forward passes, not one each."""

    def __init__(self, served: Served, score: Callable[[Served, list[str]], list], max_batch: int):
        self.served, self.score, self.max_batch = served, score, max_batch
        self.waiting: queue.Queue[tuple[list[str], Future]] = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name=f"nlpkit-{score.__name__}").start()

    def submit(self, texts: list[str]) -> Future:
        """A future of the texts' results, in their order."""
        done: Future = Future()
        self.waiting.put((texts, done))
        return done

    def _work(self):
        while True:
            batch = [self.waiting.get()]
            size = len(batch[0][0])
            while True:
                try:
                    texts, done = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if size + len(texts) > self.max_batch:
                    self.waiting.put((texts, done))  # next pass; order within a burst does not matter
                    break
                batch.append((texts, done))
                size += len(texts)
            try:
                results = self.score(self.served, [t for texts, _ in batch for t in texts])
            except Exception as e:  # noqa: BLE001 - every waiting request learns about it (a 500), none hangs
                for _, done in batch:
                    done.set_exception(e)
                continue
            start = 0
            for texts, done in batch:
                done.set_result(results[start:start + len(texts)])
                start += len(texts)


class ChatJob:
    """One chat answer: iterating yields its text as it is generated; afterwards `finish_reason` ("stop" at EOS,
    "length" at max_tokens) and `completion_tokens` are set. `close()` (a client gone) drops it from its batch."""

    def __init__(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                 loop: asyncio.AbstractEventLoop | None = None, stop: tuple[str, ...] = ()):
        self.prompt, self.max_tokens, self.seed, self.stop = prompt, max_tokens, seed, stop
        self.loop = loop  # given: pieces go to an asyncio queue, read with `async for` in the server's event loop
        self.apieces: asyncio.Queue[str | None] | None = asyncio.Queue() if loop is not None else None
        self.sampling = (temperature, top_p)
        self.finish_reason, self.completion_tokens = "stop", 0
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded answer already handed out
        self.pieces: queue.Queue[str | None] = queue.Queue()
        self.cancelled = threading.Event()
        self.error: BaseException | None = None

    def put(self, piece: str | None):
        """From the generating thread: the next piece of text, or None at the end."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.apieces.put_nowait, piece)
        else:
            self.pieces.put(piece)

    def __iter__(self):
        try:
            while (piece := self.pieces.get()) is not None:
                yield piece
        finally:
            self.cancelled.set()
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        try:
            while (piece := await self.apieces.get()) is not None:
                yield piece
        finally:
            self.cancelled.set()
        if self.error is not None:
            raise self.error

    def close(self):
        self.cancelled.set()


GATHER_SECONDS = 0.02  # how long a chat batch waits for company: nothing next to an answer's seconds


class ChatBatcher:
    """One worker thread generates; answers asked for while it is busy are generated together in one batch
    (left-padded, up to max_batch), each streamed on its own and stopped at its own EOS or max_tokens. On a CPU a
    decoding step for 16 rows costs little more than for one, so a burst of requests is served in a few passes.
    Requests with a seed run alone, so the same seed gives the same answer whoever else is asking."""

    def __init__(self, served: Served, max_batch: int):
        self.served, self.max_batch = served, max_batch
        self.waiting: queue.Queue[ChatJob] = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="nlpkit-chat").start()

    def submit(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
               seed: int | None, loop: asyncio.AbstractEventLoop | None = None, stop: tuple[str, ...] = ()) -> ChatJob:
        job = ChatJob(prompt, max_tokens, temperature, top_p, seed, loop, stop)
        self.waiting.put(job)
        return job

    def _work(self):
        while True:
            batch, later = [self.waiting.get()], []
            # Requests sent together arrive milliseconds apart: wait that long for them, or the first would be answered
            # alone and the others would wait for all of its tokens before their batch starts.
            deadline = time.monotonic() + GATHER_SECONDS
            while batch[0].seed is None and len(batch) < self.max_batch:
                try:
                    job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                (batch if job.seed is None and job.sampling == batch[0].sampling else later).append(job)
            for job in later:
                self.waiting.put(job)
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as e:  # noqa: BLE001 - every waiting request learns about it (a 500), none hangs
                for job in batch:
                    job.error = e
                    job.put(None)

    def _generate(self, jobs: list[ChatJob]):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer, model = self.served.tokenizer, self.served.model
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(job.prompt) for job in jobs)
        ids = torch.tensor([[pad] * (width - len(job.prompt)) + job.prompt for job in jobs], device=model.device)
        mask = torch.tensor([[0] * (width - len(job.prompt)) + [1] * len(job.prompt) for job in jobs],
                            device=model.device)
        streamer = _RowStreamer(jobs, tokenizer)

        class RowsDone(StoppingCriteria):  # a row at its own max_tokens, or whose client left, stops
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor(streamer.done, dtype=torch.bool, device=input_ids.device)

        temperature, top_p = jobs[0].sampling
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else
                    {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})  # None: clear defaults
        with self.served.lock, torch.inference_mode():
            if jobs[0].seed is not None:
                torch.manual_seed(jobs[0].seed)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(job.max_tokens for job in jobs),
                           streamer=streamer, stopping_criteria=StoppingCriteriaList([RowsDone()]),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **sampling)
        streamer.end()  # rows generate() left unfinished (it calls end() too; a second call finds nothing to do)


class _RowStreamer:
    """generate()'s streamer for a batch: hands each row's new text to its job, and ends a row at EOS or at its
    own max_tokens. Text is held back while it ends in a partial UTF-8 character."""

    def __init__(self, jobs: list[ChatJob], tokenizer):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[row]
            if self.done[row]:
                continue
            if token == self.tokenizer.eos_token_id:
                self._finish(row, "stop", counted=1)
                continue
            job.tokens.append(token)
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            cut = stop_index(text, job.stop)
            if cut is not None:  # the answer ends before its first stop sequence, which is not sent
                self._finish(row, "stop", text=text[:cut])
                continue
            ready = len(text) - held_back(text, job.stop)  # a stop sequence may be starting: wait for the next token
            if not text.endswith("\ufffd") and ready > job.sent:
                job.put(text[job.sent:ready])
                job.sent = ready
            if len(job.tokens) >= job.max_tokens:
                self._finish(row, "length")
            elif job.cancelled.is_set():
                self._finish(row, "stop")

    def end(self):
        for row in range(len(self.jobs)):
            if not self.done[row]:
                self._finish(row, "length")

    def _finish(self, row: int, reason: str, counted: int = 0, text: str | None = None):
        job = self.jobs[row]
        if text is None:
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if len(text) > job.sent:
            job.put(text[job.sent:])
        job.finish_reason, job.completion_tokens = reason, len(job.tokens) + counted  # the EOS counts, as OpenAI's
        self.done[row] = True
        job.put(None)


def stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop sequence in `text` begins, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop sequence (not to be sent yet)."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
