"""Load benchmark of the streaming TTS server: MAX vs PyTorch behind the same engine settings, side by side.

    python scripts/bench_serve.py [--artifact artifacts/quickstart] [--checkpoint runs/rlhf/quickstart]
                                  [--codec runs/codec/quickstart] [--voices-dir voices]
                                  [--concurrency 1,4,8,16,64] [--requests N] [--max-requests 128]
                                  [--corpus data/corpus-quickstart --split test_seen --sentences 20]
                                  [--out-dir runs/bench/serve] [serve.py overrides, e.g. engine.max_queue=128]
    python scripts/bench_serve.py --concurrency 1,4 --requests 4 --out-dir /tmp/bench   # a quick try

Starts `serve.py` twice on free ports (backend=max with the artifact, backend=torch with the checkpoints;
the same engine, sampling and API settings, the overrides passed to both), waits for /health and warms each
with a couple of unmeasured requests. Then, for each concurrency level, a closed-loop load runs on one
backend at a time, the order alternating per level so that both meet the same machine state; the other
server is frozen meanwhile (SIGSTOP, SIGCONT for its turn), as an idle MAX server still polls (~0.1 core).
Each of `concurrency` clients sends `POST /v1/audio/speech` (response_format pcm), reads the stream to its
end and sends the next. Texts (the distinct sentences of the corpus split) and voices (those both servers
list) go round-robin, so both backends get the same requests in the same order.

Per request: time to the first audio byte (TTFA), time until 2 s of audio arrived (None for shorter audio),
total time, audio seconds, status, and the playback stalls a listener would hear (seconds the audio ran out
after it had started). Errors: a non-200, an exception (the server drops the connection of a
stream it ends early: deadline, engine error), a stream without audio. The deadline is
api.request_timeout_seconds (120 s) and includes the queue wait: on a small CPU box the highest level may
need a larger one, e.g. api.request_timeout_seconds=600.

Per (backend, concurrency): TTFA and time-to-2s p50/p90/p99 (over every stream that got that far), median
RTF (total time / audio seconds), the share of streams that stalled (more than 10 ms) and the stall
seconds p50/p90, audio seconds per wall second and requests per second (these three over the
good requests), errors by kind, each server's CPU seconds; per level, MAX / PyTorch of the median TTFA.
Writes bench_serve.json (every request too, and the machine), bench_serve.md (the tables printed at the end,
for docs/benchmarks.md), bench_serve.png and the servers' logs to --out-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from voxlm.serve.process import ServerProcess, pause, resume, start_server, stop_server, wait_healthy

BACKENDS = ("max", "torch")
LABELS = {"max": "MAX", "torch": "PyTorch"}
WARMUP_REQUESTS = 2
TWO_SECONDS = 2.0
STALL_S = 0.01


@dataclass
class Sample:
    """One measured request."""

    backend: str
    concurrency: int
    index: int                   # the request's number within its level (picks text and voice)
    voice: str
    text_index: int
    start_s: float               # when it was sent, seconds after the level started
    status: int | None = None    # HTTP status; None when no response came
    request_id: str | None = None  # the server's X-Request-Id
    error: str | None = None     # why it counts as an error; None for a good stream
    ttfa_s: float | None = None  # time to the first audio byte
    t2s_s: float | None = None   # time until 2 s of audio had arrived; None when the audio is shorter
    total_s: float | None = None
    audio_s: float = 0.0
    stall_s: float = 0.0         # playback stalls: see `PlaybackClock`


class PlaybackClock:
    """A listener who starts playing at the first audio byte, plays in real time and pauses whenever the
    audio runs out, until more arrives: the seconds paused (after the first audio) are the stream's stalls.
    A server that answers first audio quickly by starving the streams already playing shows up here."""

    def __init__(self, sample_rate: int) -> None:
        self.bytes_per_second = 2 * sample_rate  # pcm s16 mono
        self.started: float | None = None
        self.buffered_s = 0.0  # audio received so far
        self.stall_s = 0.0

    def arrived(self, now: float, size: int) -> None:
        if self.started is None:
            self.started = now
        else:
            due = now - self.started - self.stall_s  # audio a listener would have played by now
            self.stall_s += max(0.0, due - self.buffered_s)
        self.buffered_s += size / self.bytes_per_second


# --- servers ----------------------------------------------------------------------------------------------

def server_overrides(backend: str, args: argparse.Namespace) -> list[str]:
    model = ([f"artifact={args.artifact}"] if backend == "max"
             else ["backend=torch", f"checkpoint={args.checkpoint}", f"codec={args.codec}"])
    return [*model, f"api.voices_dir={args.voices_dir}", *args.overrides]


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU time the server process has used so far (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def list_voices(server: ServerProcess) -> list[str]:
    response = httpx.get(f"{server.url}/v1/voices", timeout=10)
    response.raise_for_status()
    return [voice["id"] for voice in response.json()["data"]]


# --- the workload -----------------------------------------------------------------------------------------

def load_texts(corpus: Path, split: str, count: int) -> list[str]:
    """The first `count` distinct sentences of the corpus split (the text column only: no audio decoding)."""
    from datasets import load_from_disk

    texts = load_from_disk(str(corpus))[split]["text"]
    return list(dict.fromkeys(texts))[:count]


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], sample_rate: int,
                      sample: Sample) -> float:
    """Stream one speech request into `sample`; returns the seconds to wait before the next (Retry-After)."""
    two_seconds_bytes = int(TWO_SECONDS * sample_rate) * 2
    received = 0
    playback = PlaybackClock(sample_rate)
    started = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            sample.status = response.status_code
            sample.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                await response.aread()
                sample.error = f"status {response.status_code}"
                return float(response.headers.get("retry-after", 0)) if response.status_code == 429 else 0.0
            async for chunk in response.aiter_raw():
                if not chunk:
                    continue
                now = time.perf_counter() - started
                if received == 0:
                    sample.ttfa_s = now
                received += len(chunk)
                playback.arrived(now, len(chunk))
                if sample.t2s_s is None and received >= two_seconds_bytes:
                    sample.t2s_s = now
    except httpx.HTTPError as error:
        sample.error = type(error).__name__
    sample.total_s = time.perf_counter() - started
    sample.audio_s = received / 2 / sample_rate
    sample.stall_s = playback.stall_s
    if sample.error is None and received == 0:
        sample.error = "no audio"
    return 0.0


async def run_level(server: ServerProcess, concurrency: int, requests: int, texts: list[str],
                    voices: list[str], sample_rate: int, timeout: float) -> tuple[list[Sample], float]:
    """A closed loop of `concurrency` clients sharing `requests` requests; (samples, wall seconds)."""
    samples: list[Sample] = []
    jobs = iter(range(requests))
    level_start = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in jobs:
            voice, text_index = voices[i % len(voices)], i % len(texts)
            sample = Sample(server.name, concurrency, i, voice, text_index,
                            time.perf_counter() - level_start)
            samples.append(sample)
            body = {"model": "tts-1", "input": texts[text_index], "voice": voice, "response_format": "pcm"}
            await asyncio.sleep(await one_request(client, server.url, body, sample_rate, sample))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return sorted(samples, key=lambda s: s.index), time.perf_counter() - level_start


def warm(server: ServerProcess, texts: list[str], voices: list[str], sample_rate: int,
         timeout: float) -> None:
    """A couple of unmeasured requests, one after the other."""
    for i in range(WARMUP_REQUESTS):
        one_text, one_voice = [texts[i % len(texts)]], [voices[i % len(voices)]]
        samples, _ = asyncio.run(run_level(server, 1, 1, one_text, one_voice, sample_rate, timeout))
        if samples[0].error:
            raise SystemExit(f"warm-up request to {server.name} failed: {samples[0].error}; "
                             f"see {server.log}")


# --- results ----------------------------------------------------------------------------------------------

def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "n": len(values)}


def summarize(samples: list[Sample], wall: float) -> dict[str, Any]:
    good = [s for s in samples if s.error is None]
    audio = sum(s.audio_s for s in good)
    return {
        "requests": len(samples), "errors": len(samples) - len(good),
        "error_kinds": dict(Counter(s.error for s in samples if s.error)),
        # every stream that started counts for TTFA (one ended early by a deadline did start in time)
        "ttfa_s": percentiles([s.ttfa_s for s in samples if s.ttfa_s is not None]),
        "t2s_s": percentiles([s.t2s_s for s in samples if s.t2s_s is not None]),
        "median_rtf": statistics.median(s.total_s / s.audio_s for s in good) if good else None,
        # a stall under 10 ms is the client's own scheduling, not a gap a listener hears
        "stalled_share": sum(s.stall_s > STALL_S for s in good) / len(good) if good else None,
        "stall_s": percentiles([s.stall_s for s in good]),
        "audio_seconds": audio, "mean_audio_seconds": audio / len(good) if good else None,
        "wall_seconds": wall, "audio_seconds_per_second": audio / wall,
        "requests_per_second": len(good) / wall,
    }


def ttfa_ratios(summaries: dict[str, dict[int, dict[str, Any]]]) -> dict[int, float | None]:
    """Median TTFA of MAX over that of PyTorch, per concurrency level (below 1: MAX answers sooner)."""
    ratios = {}
    for level in summaries["max"]:
        a, b = summaries["max"][level]["ttfa_s"]["p50"], summaries["torch"][level]["ttfa_s"]["p50"]
        ratios[level] = a / b if a is not None and b else None
    return ratios


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "max", "httpx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(), **versions,
            "load_average_at_start": os.getloadavg()}


def ms(stats: dict[str, float | None]) -> str:
    return " / ".join(fmt(stats[p], 1e3, ".0f") for p in ("p50", "p90", "p99"))


def fmt(value: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
    return "–" if value is None else format(value * scale, spec)


def markdown(summaries: dict[str, dict[int, dict[str, Any]]], ratios: dict[int, float | None],
             info: dict[str, Any], command: str) -> str:
    lines = [f"`{command}` on {info['cpu']} ({info['cores']} cores; torch {info['torch']}, "
             f"MAX {info['max']}; the client on the same machine)", "",
             "| backend | clients | requests | errors | TTFA p50 / p90 / p99 ms "
             "| first 2 s p50 / p90 / p99 ms | median RTF | streams stalled | stall p50 / p90 ms "
             "| audio s per s | requests per s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in summaries["max"]:
        for backend in BACKENDS:
            s = summaries[backend][level]
            lines.append(f"| {LABELS[backend]} | {level} | {s['requests']} | {s['errors']} | "
                         f"{ms(s['ttfa_s'])} | {ms(s['t2s_s'])} | {fmt(s['median_rtf'])} | "
                         f"{fmt(s['stalled_share'], 100, '.0f')}% | "
                         f"{' / '.join(fmt(s['stall_s'][p], 1e3, '.0f') for p in ('p50', 'p90'))} | "
                         f"{s['audio_seconds_per_second']:.2f} | {s['requests_per_second']:.2f} |")
    lines += ["", "| clients | TTFA p50 MAX ms | TTFA p50 PyTorch ms | MAX / PyTorch |",
              "|---:|---:|---:|---:|"]
    for level, ratio in ratios.items():
        a, b = (summaries[backend][level]["ttfa_s"]["p50"] for backend in BACKENDS)
        lines.append(f"| {level} | {fmt(a, 1e3, '.0f')} | {fmt(b, 1e3, '.0f')} | {fmt(ratio)} |")
    return "\n".join(lines)


def plot(summaries: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, color in zip(BACKENDS, ("tab:blue", "tab:orange"), strict=True):
        levels = list(summaries[backend])
        for p, style in (("p50", "-o"), ("p90", "--s")):
            left.plot(levels, [summaries[backend][c]["ttfa_s"][p] for c in levels], style, color=color,
                      label=f"{LABELS[backend]} {p}")
        right.plot(levels, [summaries[backend][c]["audio_seconds_per_second"] for c in levels], "-o",
                   color=color, label=LABELS[backend])
    for ax, ylabel in ((left, "time to first audio (s)"), (right, "audio seconds per wall second")):
        ax.set_xscale("log")
        ax.set_xticks(list(summaries["max"]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_yscale("log")  # tens of ms alone, tens of seconds when queued: one axis shows both
    left.set_title("TTFA")
    right.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="artifacts/quickstart", help="MAX: the export artifact")
    parser.add_argument("--checkpoint", default="runs/rlhf/quickstart", help="PyTorch: the SpeechLM run")
    parser.add_argument("--codec", default="runs/codec/quickstart", help="PyTorch: the codec run")
    parser.add_argument("--voices-dir", default="voices", help="api.voices_dir of both servers")
    parser.add_argument("--concurrency", default="1,4,8,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, help="requests per level (default: max(8, 2 x clients))")
    parser.add_argument("--max-requests", type=int, default=128, help="cap of the default --requests")
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus-quickstart"))
    parser.add_argument("--split", default="test_seen")
    parser.add_argument("--sentences", type=int, default=20, help="distinct sentences taken from the split")
    parser.add_argument("--timeout", type=float, default=300, help="client read timeout, seconds")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench/serve"))
    parser.add_argument("overrides", nargs="*", help="serve.py overrides for both, e.g. engine.max_queue=128")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if not args.levels or min(args.levels) < 1:
        parser.error(f"--concurrency must list positive client counts, got {args.concurrency!r}")
    return args


def requests_for(level: int, args: argparse.Namespace) -> int:
    """--requests, or max(8, 2 x clients) capped at --max-requests (but at least one per client)."""
    return args.requests or min(max(8, 2 * level), max(args.max_requests, level))


def measure(servers: dict[str, ServerProcess], args: argparse.Namespace, texts: list[str], voices: list[str],
            sample_rate: int) -> tuple[dict[str, dict[int, dict[str, Any]]], list[Sample]]:
    """Every level on both backends, one at a time, the order alternating per level."""
    summaries: dict[str, dict[int, dict[str, Any]]] = {backend: {} for backend in BACKENDS}
    samples: list[Sample] = []
    for i, level in enumerate(args.levels):
        for backend in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
            server, idle = servers[backend], servers[BACKENDS[1 - BACKENDS.index(backend)]]
            pause(idle)
            resume(server)
            wait_healthy(server, args.startup_timeout)
            cpu_before = cpu_seconds(server), cpu_seconds(idle)
            level_samples, wall = asyncio.run(run_level(server, level, requests_for(level, args), texts,
                                                        voices, sample_rate, args.timeout))
            summary = summarize(level_samples, wall)
            summary["server_cpu_seconds"] = cpu_seconds(server) - cpu_before[0]
            summary["idle_server_cpu_seconds"] = cpu_seconds(idle) - cpu_before[1]
            summaries[backend][level] = summary
            samples += level_samples
            print(f"{LABELS[backend]:>7} x{level:<3} {summary['requests']} requests in {wall:.1f} s, "
                  f"{summary['errors']} errors; TTFA p50/p90/p99 ms {ms(summary['ttfa_s'])}; "
                  f"{summary['audio_seconds_per_second']:.2f} audio s/s; "
                  f"{fmt(summary['stalled_share'], 100, '.0f')}% of streams stalled", flush=True)
    return summaries, samples


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` too stops the servers (finally below)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    texts = load_texts(args.corpus, args.split, args.sentences)
    info = machine_info()
    servers: dict[str, ServerProcess] = {}
    try:
        for backend in BACKENDS:  # both start at once: startup is not measured
            servers[backend] = start_server(backend, server_overrides(backend, args),
                                            args.out_dir / f"bench_serve.{backend}.log")
        health = {backend: wait_healthy(server, args.startup_timeout) for backend, server in servers.items()}
        sample_rate = health["max"]["sample_rate"]
        if health["torch"]["sample_rate"] != sample_rate:
            raise SystemExit(f"the backends' sample rates differ: {health}")
        voices = sorted(set(list_voices(servers["max"])) & set(list_voices(servers["torch"])))
        if not voices:
            raise SystemExit("the servers have no voice in common: run scripts/make_voices.py first")
        for server in servers.values():
            warm(server, texts, voices, sample_rate, args.timeout)
        print(f"{len(texts)} sentences, {len(voices)} voices, {sample_rate} Hz; clients {args.levels}",
              flush=True)
        summaries, samples = measure(servers, args, texts, voices, sample_rate)
    finally:
        for server in servers.values():
            stop_server(server)

    ratios = ttfa_ratios(summaries)
    command = " ".join(["python scripts/bench_serve.py", *sys.argv[1:]])
    table = markdown(summaries, ratios, info, command)
    result = {
        "command": command, "machine": info, "overrides": args.overrides,
        "servers": {backend: {"command": " ".join(["python", *server.command[1:]]), "health": health[backend]}
                    for backend, server in servers.items()},
        "sample_rate": sample_rate, "texts": texts, "voices": voices,
        "summaries": summaries, "ttfa_p50_ratio_max_over_torch": ratios,  # json writes the int keys as text
        "samples": [asdict(s) for s in samples],
    }
    out = args.out_dir / "bench_serve.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    plot(summaries, out.with_suffix(".png"))
    print(f"\n{table}\n\nwrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
