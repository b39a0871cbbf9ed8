"""Micro-benchmark of the Mojo custom ops (voxlm.export.kernels) against their references: NumPy, and for the
sampler the PyTorch path built from generate.py's functions; cached attention against its PyTorch reference.

    .venv/bin/python scripts/bench_kernels.py [--out runs/bench/kernels.json] [--repeats 200]

Median wall-clock latency per call, as the server sees it: for the Mojo kernels that includes wrapping the
numpy inputs into MAX buffers and reading the outputs back. The graphs are compiled (or loaded from MAX's
cache) before timing. Cases: silence detector on 1 s and 10 s of 16 kHz audio (20 ms frames); sampler at
batch 1 and 8 over V = 1530 logits with a K = 1000 code block, with the serving filters (temperature, top-k,
top-p, repetition penalty over 32 recent ids) and greedy; cached attention for one quickstart SpeechLM layer
at a decode step (batch 1 and 8). Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from voxlm.export import kernels as K

SR = 16000
FRAME = 320
VOCAB, OFFSET, CODES, SPEECH_END, HISTORY = 1530, 520, 1000, 3, 32


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median and spread of `repeats` calls, in microseconds."""
    for _ in range(warmup):
        fn()
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter_ns()
        fn()
        samples[i] = (time.perf_counter_ns() - start) / 1e3
    return {"median_us": float(np.median(samples)), "p10_us": float(np.percentile(samples, 10)),
            "p90_us": float(np.percentile(samples, 90)), "repeats": repeats}


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}


def bench(repeats: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []

    K.compile_kernels(FRAME)
    for seconds in (1, 10):
        n = seconds * SR
        audio = (0.001 * rng.standard_normal(n)).astype(np.float32)
        audio[n // 4: 3 * n // 4] *= 100   # speech-level middle, quiet ends
        case = f"{seconds} s audio"
        for impl, fn in [("mojo", lambda a=audio: K.silence_trim(a, FRAME, -40.0, 2)),
                         ("numpy", lambda a=audio: K.silence_trim_reference(a, FRAME, -40.0, 2))]:
            rows.append({"kernel": "silence_trim", "case": case, "impl": impl, **time_call(fn, repeats)})

    settings = {"filtered": dict(temperature=0.8, top_k=50, top_p=0.9, penalty=1.2),
                "greedy": dict(temperature=0.0, penalty=1.2)}
    for name, setting in settings.items():
        params = K.CodeSamplerParams(OFFSET, CODES, SPEECH_END, **setting)
        for batch in (1, 8):
            logits = (3 * rng.standard_normal((batch, VOCAB))).astype(np.float32)
            history = rng.integers(OFFSET, OFFSET + CODES, (batch, HISTORY))
            u = rng.random(batch)
            t_logits, t_history, t_u = (torch.from_numpy(a) for a in (logits, history, u))
            want = K.sample_codes_reference(logits, history, u, params)
            assert np.array_equal(K.sample_codes(logits, history, u, params), want), "kernel disagrees"
            case = f"{name}, B={batch}"
            args = (logits, history, u, params)
            t_args = (t_logits, t_history, t_u, params)
            impls = [("mojo", lambda a=args: K.sample_codes(*a)),
                     ("numpy", lambda a=args: K.sample_codes_reference(*a)),
                     ("torch", lambda a=t_args: K.sample_codes_torch(*a))]
            for impl, fn in impls:
                rows.append({"kernel": "code_sampler", "case": case, "impl": impl, **time_call(fn, repeats)})

    # One quickstart SpeechLM layer's attention (4 query heads, 2 KV heads, head size 64) at a decode step:
    # the Mojo op appends to a preallocated cache, the PyTorch reference concatenates as HF's cache does.
    heads, kv_heads, head_dim = 4, 2, 64
    for batch, past, new in ((1, 400, 1), (8, 400, 1), (8, 800, 1)):
        g = torch.Generator().manual_seed(batch + past)
        qkv = torch.randn(batch, new, (heads + 2 * kv_heads) * head_dim, generator=g)
        angles = torch.rand(batch, new, head_dim, generator=g)
        mask = torch.ones(batch, past + new, dtype=torch.long)
        k_past, v_past = (torch.randn(batch, kv_heads, past, head_dim, generator=g) for _ in range(2))
        k_cache, v_cache = (torch.zeros(batch, kv_heads, past + 256, head_dim) for _ in range(2))
        k_cache[:, :, :past], v_cache[:, :, :past] = k_past, v_past
        args = (qkv, angles.cos(), angles.sin(), mask)
        case = f"B={batch}, past {past}, {new} new"
        impls = [("mojo", lambda a=args, c=(k_cache, v_cache): K.cached_attention(*a, *c, heads, kv_heads)),
                 ("torch", lambda a=args, c=(k_past, v_past): K.cached_attention_reference(*a, *c, heads,
                                                                                            kv_heads))]
        for impl, fn in impls:
            rows.append({"kernel": "cached_attention", "case": case, "impl": impl, **time_call(fn, repeats)})
    return rows


def table(rows: list[dict[str, object]]) -> str:
    cases: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        key = (str(row["kernel"]), str(row["case"]))
        cases.setdefault(key, {})[str(row["impl"])] = float(row["median_us"])
    lines = ["| kernel | case | Mojo (MAX) µs | NumPy µs | PyTorch µs | NumPy / Mojo | PyTorch / Mojo |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (kernel, case), t in cases.items():
        cells = [f"{t[impl]:.0f}" if impl in t else "–" for impl in ("numpy", "torch")]
        ratios = [f"{t[impl] / t['mojo']:.1f}x" if impl in t else "–" for impl in ("numpy", "torch")]
        lines.append(f"| {kernel} | {case} | {t['mojo']:.0f} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/kernels.json"))
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    rows = bench(args.repeats)
    info = machine()
    print(f"Median latency per call on {info['cpu']} ({info['cores']} cores, CPU only; "
          f"torch threads {info['torch_threads']}):\n")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "frame_length": FRAME, "sample_rate": SR,
                                    "vocab": VOCAB, "codes": CODES, "history": HISTORY, "results": rows},
                                   indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
