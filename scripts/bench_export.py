"""MAX vs PyTorch on the same inputs, side by side in one run (medians, interleaved so load hits both alike):

    python scripts/bench_export.py [--speechlm runs/sft/quickstart] [--codec runs/codec/quickstart]
                                   [--past 500] [--repeats 30] [--out runs/bench/export.json]

SpeechLM: prefill latency of a `--past`-token prompt at batch 1, and per-step decode latency after it at
batch 1 and 8. Codec: one streaming chunk decode of 25 frames (with its left context) at batch 1 and 8.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.export.codec import MaxCodecDecoder
from voxlm.export.speechlm import MaxSpeechLM
from voxlm.speechlm.model import load_speechlm
from voxlm.speechlm.tokenizer import SpeechTokenizer


def interleaved(a: Callable[[], None], b: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median seconds of a() and b(), alternating calls after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times_a), statistics.median(times_b)


def random_prompt(tok: SpeechTokenizer, batch: int, length: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(tok.code_offset, tok.vocab_size, (batch, length), generator=generator)
    return ids, torch.ones_like(ids), torch.arange(length).expand(batch, -1)


@torch.no_grad()
def bench_prefill(model: PreTrainedModel, max_model: MaxSpeechLM, tok: SpeechTokenizer, past: int,
                  repeats: int, generator: torch.Generator) -> tuple[float, float]:
    ids, mask, positions = random_prompt(tok, 1, past, generator)

    def torch_prefill() -> None:
        model(input_ids=ids, attention_mask=mask, position_ids=positions,
              cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    def max_prefill() -> None:
        max_model(input_ids=ids, attention_mask=mask, position_ids=positions)

    return interleaved(torch_prefill, max_prefill, repeats)


@torch.no_grad()
def bench_decode_step(model: PreTrainedModel, max_model: MaxSpeechLM, tok: SpeechTokenizer, batch: int,
                      past: int, repeats: int, generator: torch.Generator) -> tuple[float, float]:
    """One decode step after a past of `past` tokens, every call from the same past."""
    ids, mask, positions = random_prompt(tok, batch, past, generator)
    torch_cache = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1).cache
    max_cache = max_model(input_ids=ids, attention_mask=mask, position_ids=positions).cache
    step = {"input_ids": torch.full((batch, 1), tok.code_offset),
            "attention_mask": torch.ones(batch, past + 1, dtype=torch.long),
            "position_ids": torch.full((batch, 1), past)}

    def torch_step() -> None:
        model(**step, cache=torch_cache, use_cache=True, logits_to_keep=1)
        torch_cache.crop(-1)  # drop the step's token: the next call sees the same past

    def max_step() -> None:
        max_model(**step, cache=max_cache)  # returns a new cache; max_cache itself is unchanged

    return interleaved(torch_step, max_step, repeats)


@torch.no_grad()
def bench_codec_chunk(codec: Codec, max_decoder: MaxCodecDecoder, batch: int, chunk: int, repeats: int,
                      generator: torch.Generator) -> tuple[float, float]:
    """One streaming chunk decode of `chunk` frames after 75 frames of history."""
    codes = torch.randint(0, codec.codebook_size, (batch, 75 + chunk), generator=generator)
    _, torch_state = codec.stream(codes[:, :75], codec.init_stream(batch))
    _, max_state = max_decoder.stream(codes[:, :75], max_decoder.init_stream(batch))
    new = codes[:, 75:]
    return interleaved(lambda: codec.stream(new, torch_state), lambda: max_decoder.stream(new, max_state),
                       repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speechlm", default="runs/sft/quickstart")
    parser.add_argument("--codec", default="runs/codec/quickstart")
    parser.add_argument("--past", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="runs/bench/export.json")
    args = parser.parse_args()

    codec = load_codec(args.codec).eval()
    model, tok = load_speechlm(args.speechlm, codec.codebook_size)
    max_model = MaxSpeechLM.from_pretrained(args.speechlm)
    max_decoder = MaxCodecDecoder.from_codec(codec)
    generator = torch.Generator().manual_seed(0)
    rows = {f"speechlm prefill, {args.past} tokens, batch 1":
            bench_prefill(model, max_model, tok, args.past, args.repeats, generator)}
    for batch in (1, 8):
        rows[f"speechlm decode step, past {args.past}, batch {batch}"] = bench_decode_step(
            model, max_model, tok, batch, args.past, args.repeats, generator)
    for batch in (1, 8):
        rows[f"codec stream chunk, 25 frames, batch {batch}"] = bench_codec_chunk(
            codec, max_decoder, batch, 25, args.repeats, generator)

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    table = ["| operation | PyTorch ms | MAX ms | speed-up |", "|---|---:|---:|---:|"]
    results = {}
    for name, (torch_s, max_s) in rows.items():
        table.append(f"| {name} | {torch_s * 1e3:.2f} | {max_s * 1e3:.2f} | {torch_s / max_s:.2f}x |")
        results[name] = {"torch_ms": torch_s * 1e3, "max_ms": max_s * 1e3, "speedup": torch_s / max_s}
    print(f"machine: {machine}; SpeechLM {args.speechlm}, codec {args.codec}\n")
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "speechlm": args.speechlm, "codec": args.codec,
                               "repeats": args.repeats, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
