"""Load check for `nlpkit serve` on loopback: many concurrent requests at once, errors counted, latency percentiles.

    python benchmarks/serve_load.py runs/sst2 --classify 200          # a classifier run
    python benchmarks/serve_load.py smollm2-135m --chat 50 --max-tokens 16
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --classify 200   # a server already running

Starts `nlpkit serve MODEL` on a free loopback port (unless --url is given), waits for /health, then sends every
request at the same moment (asyncio + httpx, one connection each) and waits for all of them. A request counts as an
error unless it returns 200 with a well-formed body (chat: non-empty choices; a streamed answer must end with
`data: [DONE]`). Half the chat requests stream when --stream-share is 0.5 (the default). Prints one JSON object.
Not part of `make test`: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

TEXTS = ["a gripping, beautifully acted film.", "the plot is thin and the jokes fall flat.",
         "an uneven but often charming comedy.", "I walked out halfway through."]
QUESTIONS = ["What is the capital of France?", "Give me one tip for staying healthy.", "What is a noun?",
             "Name a primary color."]


async def classify_once(client: httpx.AsyncClient, i: int) -> tuple[float, str | None]:
    started = time.perf_counter()
    response = await client.post("/v1/classify", json={"input": TEXTS[i % len(TEXTS)]})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        return elapsed, f"{response.status_code}: {response.text[:200]}"
    data = response.json().get("data") or [{}]
    return elapsed, None if "label" in data[0] else f"malformed: {response.text[:200]}"


async def chat_once(client: httpx.AsyncClient, i: int, max_tokens: int, stream: bool) -> tuple[float, str | None]:
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": max_tokens,
            "stream": stream}
    started = time.perf_counter()
    if not stream:
        response = await client.post("/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            return elapsed, f"{response.status_code}: {response.text[:200]}"
        choices = response.json().get("choices")
        return elapsed, None if choices and choices[0]["message"]["content"] is not None else "malformed"
    lines = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return time.perf_counter() - started, f"{response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
    elapsed = time.perf_counter() - started
    return elapsed, None if lines and lines[-1] == "data: [DONE]" else f"stream ended without [DONE]: {lines[-1:]}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def burst(url: str, count: int, make) -> dict:
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(make(client, i) for i in range(count)), return_exceptions=True)
        wall = time.perf_counter() - started
    latencies = [r[0] for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) if isinstance(r, BaseException) else r[1] for r in results]
    errors = [e for e in errors if e]
    return {"requests": count, "errors": len(errors), "first_errors": errors[:3], "wall_s": round(wall, 2),
            "p50_s": round(percentile(latencies, 0.50), 3) if latencies else None,
            "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
            "max_s": round(max(latencies), 3) if latencies else None,
            "requests_per_s": round(count / wall, 2)}


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "nlpkit", "serve", model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"nlpkit serve {model} exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"nlpkit serve {model}: no /health within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="What `nlpkit serve` serves (a run directory or a model).")
    parser.add_argument("--url", help="Test a server that is already running instead.")
    parser.add_argument("--classify", type=int, default=0, help="Concurrent /v1/classify requests.")
    parser.add_argument("--chat", type=int, default=0, help="Concurrent /v1/chat/completions requests.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-share", type=float, default=0.5, help="Share of chat requests that stream.")
    args = parser.parse_args()
    if not args.url and not args.model:
        parser.error("give MODEL (a server is started) or --url")
    server, url = (None, args.url) if args.url else start_server(args.model)
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        report = {"model": health["model"], "task": health["task"], "cpu_count": os.cpu_count(),
                  "load_average_before": os.getloadavg()}
        if args.classify:
            report["classify"] = asyncio.run(burst(url, args.classify, classify_once))
        if args.chat:
            streamed = round(args.chat * args.stream_share)
            report["chat"] = asyncio.run(burst(url, args.chat, lambda client, i: chat_once(
                client, i, args.max_tokens, stream=i < streamed)))
            report["chat"] |= {"max_tokens": args.max_tokens, "streamed": streamed}
        report["load_average_after"] = os.getloadavg()
        print(json.dumps(report, indent=2))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
