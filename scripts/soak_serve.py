"""Soak test of the streaming server: `python scripts/soak_serve.py [--artifact artifacts/quickstart]`.

Starts `python serve.py` (or uses --url) and checks the issue's bars under load and faults:
  1. --requests (2,000) requests at --concurrency (32), every one over SSE so that each stream's end event
     tells how much audio the server made: a stream counts as lost or truncated unless it is a 200 whose
     decoded audio deltas add up to exactly what its `speech.audio.done` event reports;
  2. --disconnects (200) requests that hang up after their first audio chunk; afterwards /health must show
     the KV pool empty (active_streams 0, queue_depth 0, kv_tokens 0) within a few seconds;
  3. --malformed (100) malformed requests of ten kinds: every one must get a 4xx, and the server stay up.
Writes runs/bench/serve/soak.json and prints a summary table. Exit status 1 when a bar is not met.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from voxlm.serve.process import start_server, stop_server, wait_healthy

TEXTS = [
    "Hello there.", "The quick brown fox jumps over the lazy dog.", "Please call Stella.",
    "It is a beautiful morning.", "Where did you put the keys?", "We will meet again tomorrow at noon.",
    "The train leaves in ten minutes.", "Thank you very much for your help.",
]


async def one_stream(client: httpx.AsyncClient, url: str, voice: str, text: str, sample_rate: int) -> str:
    """'ok', or why the stream counts as failed."""
    body = {"model": "tts-1", "input": text, "voice": voice, "response_format": "pcm", "stream_format": "sse"}
    received, done = 0, None
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            if response.status_code != 200:
                return f"status {response.status_code}"
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "speech.audio.delta":
                    received += len(base64.b64decode(event["audio"]))
                else:
                    done = event
    except httpx.HTTPError as error:
        return f"{type(error).__name__}"
    if done is None or done["type"] != "speech.audio.done":
        return "no end event" if done is None else f"ended with {done['type']}"
    if received == 0:
        return "empty"
    if abs(received / 2 / sample_rate - done["audio_seconds"]) > 1e-3:
        return "truncated"
    return "ok"


async def load(url: str, voices: list[str], total: int, concurrency: int, sample_rate: int) -> Counter:
    outcomes: Counter = Counter()
    jobs = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in jobs:
            outcomes[await one_stream(client, url, voices[i % len(voices)], TEXTS[i % len(TEXTS)],
                                      sample_rate)] += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return outcomes


async def disconnect(url: str, voice: str, count: int, concurrency: int) -> int:
    """Requests that hang up after their first chunk; how many got that far."""
    started = 0
    body = {"input": " ".join(TEXTS), "voice": voice, "response_format": "pcm"}
    semaphore = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal started
        async with semaphore, client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            if response.status_code == 200:
                async for _ in response.aiter_raw():
                    started += 1
                    break  # leaving the block closes the connection mid-stream

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(one(client) for _ in range(count)))
    return started


def malformed_requests(voice: str) -> list[dict]:
    good = {"input": "Hello there.", "voice": voice}
    return [
        {"content": b"{not json"}, {"json": ["a", "list"]}, {"json": {**good, "input": ""}},
        {"json": {**good, "voice": "nobody"}}, {"json": {**good, "response_format": "aiff"}},
        {"json": {**good, "speed": 100}}, {"json": {**good, "stream_format": "video"}},
        {"json": {**good, "model": "no-such-model"}}, {"json": {**good, "input": "x" * 5000}},
        {"json": {"voice": voice}},
    ]


def pool_state(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_for_empty_pool(url: str, seconds: float) -> tuple[bool, dict, float]:
    start = time.monotonic()
    while True:
        state = pool_state(url)
        if state["active_streams"] == 0 and state["queue_depth"] == 0 and state["kv_tokens"] == 0:
            return True, state, time.monotonic() - start
        if time.monotonic() - start > seconds:
            return False, state, time.monotonic() - start
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="artifacts/quickstart")
    parser.add_argument("--url", help="an already running server (then --artifact is not used)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnects", type=int, default=200)
    parser.add_argument("--malformed", type=int, default=100)
    parser.add_argument("--slots", type=int, default=32, help="engine.max_active_streams of the server")
    parser.add_argument("--queue", type=int, default=64, help="engine.max_queue of the server")
    parser.add_argument("--out", default="runs/bench/serve/soak.json")
    parser.add_argument("overrides", nargs="*", help="serve.py overrides, e.g. sampling.seed=1")
    args = parser.parse_args()

    server = None
    if args.url:
        url = args.url
    else:
        overrides = [f"artifact={args.artifact}", f"engine.max_active_streams={args.slots}",
                     f"engine.max_queue={args.queue}", *args.overrides]
        server = start_server("max", overrides, Path(args.out).with_suffix(".server.log"))
        url = server.url
        wait_healthy(server, timeout=180)
    try:
        health = pool_state(url)
        voices = [v["id"] for v in httpx.get(f"{url}/v1/voices").json()["data"]]
        if not voices:
            raise SystemExit("the server has no voices: run scripts/make_voices.py first")
        start = time.monotonic()
        outcomes = asyncio.run(load(url, voices, args.requests, args.concurrency, health["sample_rate"]))
        load_seconds = time.monotonic() - start

        started = asyncio.run(disconnect(url, voices[0], args.disconnects, args.concurrency))
        emptied, state, drain_seconds = wait_for_empty_pool(url, 30)

        kinds = malformed_requests(voices[0])
        statuses: Counter = Counter()
        for i in range(args.malformed):
            response = httpx.post(f"{url}/v1/audio/speech", timeout=30, **kinds[i % len(kinds)])
            statuses[response.status_code] += 1
        alive = pool_state(url)["status"] == "ok"
    finally:
        if server is not None:
            stop_server(server)

    bars = {
        "no 5xx, no lost or truncated stream": outcomes["ok"] == args.requests,
        "KV pool empty after the disconnects": emptied and started == args.disconnects,
        "every malformed request got a 4xx": sum(n for s, n in statuses.items() if 400 <= s < 500)
        == args.malformed,
        "server up afterwards": alive,
    }
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cores": os.cpu_count()},
        "server": {"url": url, "artifact": None if args.url else args.artifact, "slots": args.slots,
                   "queue": args.queue, "overrides": args.overrides},
        "load": {"requests": args.requests, "concurrency": args.concurrency, "outcomes": dict(outcomes),
                 "seconds": round(load_seconds, 1),
                 "requests_per_second": round(args.requests / load_seconds, 2)},
        "disconnects": {"requested": args.disconnects, "started_streaming": started,
                        "pool_after": state, "pool_empty_after_seconds": round(drain_seconds, 2)},
        "malformed": {"sent": args.malformed, "statuses": {str(k): v for k, v in statuses.items()}},
        "bars": bars,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| check | result |\n|---|---|\n"
          f"| {args.requests} SSE streams at concurrency {args.concurrency} | {dict(outcomes)} in "
          f"{load_seconds:.0f} s ({args.requests / load_seconds:.1f} req/s) |\n"
          f"| {args.disconnects} mid-stream disconnects | {started} streamed then hung up; pool empty after "
          f"{drain_seconds:.2f} s: {emptied} |\n"
          f"| {args.malformed} malformed requests | statuses {dict(statuses)}; server up: {alive} |")
    for bar, met in bars.items():
        print(f"{'MET ' if met else 'FAIL'} {bar}")
    print(f"wrote {out}")
    return 0 if all(bars.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
