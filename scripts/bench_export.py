"""MAX vs PyTorch on the same inputs, side by side in one run (medians of alternating blocks of calls):

    python scripts/bench_export.py [--speechlm runs/sft/quickstart] [--codec runs/codec/quickstart]
                                   [--past 500] [--batches 1 8 16] [--repeats 30]
                                   [--out runs/bench/export.json]
                                   [--device cpu|gpu] [--dtype float32|bfloat16]
                                   [--speechlm-preset base] [--codec none]

SpeechLM: prefill latency of a `--past`-token prompt at batch 1, and per-step decode latency after it at
each of `--batches` (default 1, 8 and 16: 16 is the server's KV slots). Codec: one streaming chunk decode
of 25 frames (with its left context) at batch 1 and 8. Prints a markdown table and writes JSON.

`--device gpu` runs both sides on the GPU: PyTorch on cuda (timed between torch.cuda.synchronize() calls),
MAX on its Accelerator (the logits come back to the host each call, and the device is synchronized after
each call too). `--dtype` is the SpeechLM's dtype on both sides (bfloat16 is for the GPU); the codec stays
float32 (its MAX graphs are float32). `--speechlm-preset base` benchmarks a randomly initialized SpeechLM
of a preset's shape (configs/speechlm/<preset>.yaml's model section) instead of a trained one: vocabulary
Llama 3's 128,256 text tokens + pad + 6 control tokens + `--codebook-size` codes, padded as the preset says
(193,856 rows for base). Timings do not depend on the weights' values. `--codec none` skips the codec rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.export.codec import MaxCodecDecoder
from voxlm.export.speechlm import MaxSpeechLM
from voxlm.speechlm.model import load_speechlm
from voxlm.speechlm.tokenizer import SpeechTokenizer

LLAMA3_TEXT_TOKENS = 128_256  # bos/eos among them; SpeechTokenizer.build adds pad + 6 control tokens
CONTROL_TOKENS = 1 + 6


@dataclass(frozen=True)
class CodeBlock:
    """What the benchmark needs of a tokenizer: where the code block sits (a random-init model has none)."""

    code_offset: int
    codebook_size: int

    @property
    def vocab_size(self) -> int:
        return self.code_offset + self.codebook_size


class Sync:
    """Wait for a device's queued work: torch's cuda stream, or a MAX device (no-op on the CPU)."""

    def __init__(self, device: str, max_model: Any) -> None:
        self.device = device
        self.max_device = None
        if device == "gpu":
            from voxlm.export.sessions import max_device

            self.max_device = getattr(max_model, "max_device", None) or max_device("gpu")

    def torch(self) -> None:
        if self.device == "gpu":
            torch.cuda.synchronize()

    def max(self) -> None:
        if self.max_device is not None:
            self.max_device.synchronize()


def interleaved(a: Callable[[], None], b: Callable[[], None], repeats: int,
                block: int = 10) -> tuple[float, float]:
    """Median seconds of a() and b() over `repeats` timed calls each, in alternating blocks of `block`
    consecutive calls, so that load changes hit both alike. The first two calls of each block are not timed:
    the other runtime's worker threads keep spinning for a moment after its last call (PyTorch's OpenMP
    pool, MAX's), and calls interleaved one by one measured that contention rather than the step."""
    times_a: list[float] = []
    times_b: list[float] = []
    while len(times_a) < repeats:
        for fn, times in ((a, times_a), (b, times_b)):
            fn(), fn()
            for _ in range(min(block, repeats - len(times))):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
    return statistics.median(times_a), statistics.median(times_b)


def random_prompt(tok: SpeechTokenizer | CodeBlock, batch: int, length: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(tok.code_offset, tok.vocab_size, (batch, length), generator=generator)
    return ids.to(device), torch.ones_like(ids, device=device), torch.arange(length, device=device).expand(
        batch, -1)


def torch_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def bench_prefill(model: PreTrainedModel, max_model: MaxSpeechLM, tok: SpeechTokenizer | CodeBlock, past: int,
                  repeats: int, generator: torch.Generator, sync: Sync | None = None) -> tuple[float, float]:
    sync = sync or Sync("cpu", None)
    ids, mask, positions = random_prompt(tok, 1, past, generator)
    on = torch_device(model)
    t_ids, t_mask, t_positions = ids.to(on), mask.to(on), positions.to(on)

    def torch_prefill() -> None:
        model(input_ids=t_ids, attention_mask=t_mask, position_ids=t_positions,
              cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        sync.torch()

    def max_prefill() -> None:
        max_model(input_ids=ids, attention_mask=mask, position_ids=positions)
        sync.max()

    return interleaved(torch_prefill, max_prefill, repeats)


@torch.no_grad()
def bench_decode_step(model: PreTrainedModel, max_model: MaxSpeechLM, tok: SpeechTokenizer | CodeBlock,
                      batch: int, past: int, repeats: int, generator: torch.Generator,
                      sync: Sync | None = None) -> tuple[float, float]:
    """One decode step after a past of `past` tokens, every call from the same past."""
    sync = sync or Sync("cpu", None)
    ids, mask, positions = random_prompt(tok, batch, past, generator)
    on = torch_device(model)
    torch_cache = model(input_ids=ids.to(on), attention_mask=mask.to(on), position_ids=positions.to(on),
                        cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1).cache
    max_cache = max_model(input_ids=ids, attention_mask=mask, position_ids=positions).cache
    step = {"input_ids": torch.full((batch, 1), tok.code_offset),
            "attention_mask": torch.ones(batch, past + 1, dtype=torch.long),
            "position_ids": torch.full((batch, 1), past)}
    # On the CPU the first step moves the prefill's cache into preallocated buffers that later steps append
    # to in place: that one-off copy is not a step's cost. crop() rewinds to the same past.
    max_cache = max_model(**step, cache=max_cache).cache
    max_cache.crop(past)
    torch_step_inputs = {name: value.to(on) for name, value in step.items()}

    def torch_step() -> None:
        model(**torch_step_inputs, cache=torch_cache, use_cache=True, logits_to_keep=1)
        torch_cache.crop(-1)  # drop the step's token: the next call sees the same past
        sync.torch()

    def max_step() -> None:
        max_model(**step, cache=max_cache)
        max_cache.crop(past)  # the next call sees the same past
        sync.max()

    return interleaved(torch_step, max_step, repeats)


@torch.no_grad()
def bench_codec_chunk(codec: Codec, max_decoder: MaxCodecDecoder, batch: int, chunk: int, repeats: int,
                      generator: torch.Generator, sync: Sync | None = None) -> tuple[float, float]:
    """One streaming chunk decode of `chunk` frames after 75 frames of history."""
    sync = sync or Sync("cpu", None)
    on = codec.quantizer.levels.device
    codes = torch.randint(0, codec.codebook_size, (batch, 75 + chunk), generator=generator)
    _, torch_state = codec.stream(codes[:, :75].to(on), codec.init_stream(batch))
    _, max_state = max_decoder.stream(codes[:, :75], max_decoder.init_stream(batch))
    new, torch_new = codes[:, 75:], codes[:, 75:].to(on)

    def torch_chunk() -> None:
        codec.stream(torch_new, torch_state)
        sync.torch()

    def max_chunk() -> None:
        max_decoder.stream(new, max_state)  # audio comes back to the host (NumPy) each call
        sync.max()

    return interleaved(torch_chunk, max_chunk, repeats)


def preset_model(preset: str, codebook_size: int, device: str, dtype: str,
                 configs: Path) -> tuple[PreTrainedModel, CodeBlock]:
    """A randomly initialized LlamaForCausalLM of a speechlm preset's shape, Llama 3's text vocabulary +
    control tokens + the codes, padded as the preset says; built on the device in `dtype` directly."""
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from voxlm.speechlm.model import llama_config

    model_cfg = OmegaConf.load(configs / "speechlm" / f"{preset}.yaml").model
    model_cfg.init_from = None  # from scratch (base interpolates ${paths.data_dir}, not loaded here)
    block = CodeBlock(LLAMA3_TEXT_TOKENS + CONTROL_TOKENS, codebook_size)
    config = llama_config(model_cfg, block.vocab_size)
    torch.manual_seed(0)
    with torch.device("cuda" if device == "gpu" else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    return model, block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speechlm", default="runs/sft/quickstart")
    parser.add_argument("--codec", default="runs/codec/quickstart", help="a codec run, or none")
    parser.add_argument("--past", type=int, default=500)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16],
                        help="decode-step batch sizes (16 = the server's KV slots)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="runs/bench/export.json")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the SpeechLM's dtype on both sides (the codec stays float32)")
    parser.add_argument("--speechlm-preset", default=None,
                        help="bench a random-init SpeechLM of configs/speechlm/<preset>.yaml instead")
    parser.add_argument("--codebook-size", type=int, default=65536, help="with --speechlm-preset")
    args = parser.parse_args()

    on = "cuda" if args.device == "gpu" else "cpu"
    codec = None if args.codec == "none" else load_codec(args.codec).eval().to(on)
    if args.speechlm_preset:
        configs = Path(__file__).resolve().parents[1] / "configs"
        model, tok = preset_model(args.speechlm_preset, args.codebook_size, args.device, args.dtype, configs)
        speechlm_name = f"random-init {args.speechlm_preset} preset ({model.config.vocab_size} vocab)"
    else:
        if codec is None:
            raise SystemExit("a trained --speechlm needs its --codec (for the code block's size)")
        model, tok = load_speechlm(args.speechlm, codec.codebook_size, on, args.dtype,
                                   codec_id=codec.code_fingerprint())
        speechlm_name = args.speechlm
    max_model = MaxSpeechLM.from_pretrained(model if args.speechlm_preset else args.speechlm, args.device,
                                            args.dtype)
    sync = Sync(args.device, max_model)
    generator = torch.Generator().manual_seed(0)
    rows = {f"speechlm prefill, {args.past} tokens, batch 1":
            bench_prefill(model, max_model, tok, args.past, args.repeats, generator, sync)}
    for batch in args.batches:
        rows[f"speechlm decode step, past {args.past}, batch {batch}"] = bench_decode_step(
            model, max_model, tok, batch, args.past, args.repeats, generator, sync)
    if codec is not None:
        max_decoder = MaxCodecDecoder.from_codec(codec, device=args.device)
        for batch in (1, 8):
            rows[f"codec stream chunk, 25 frames, batch {batch}"] = bench_codec_chunk(
                codec, max_decoder, batch, 25, args.repeats, generator, sync)

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    if args.device == "gpu":
        machine += f", {torch.cuda.get_device_name()}"
    if (args.device, args.dtype) != ("cpu", "float32"):
        machine += f"; {args.device}/{args.dtype}"
    table = ["| operation | PyTorch ms | MAX ms | speed-up |", "|---|---:|---:|---:|"]
    results = {}
    for name, (torch_s, max_s) in rows.items():
        table.append(f"| {name} | {torch_s * 1e3:.2f} | {max_s * 1e3:.2f} | {torch_s / max_s:.2f}x |")
        results[name] = {"torch_ms": torch_s * 1e3, "max_ms": max_s * 1e3, "speedup": torch_s / max_s}
    print(f"machine: {machine}; SpeechLM {speechlm_name}, codec {args.codec}\n")
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "speechlm": speechlm_name, "codec": args.codec,
                               "device": args.device, "dtype": args.dtype,
                               "repeats": args.repeats, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
