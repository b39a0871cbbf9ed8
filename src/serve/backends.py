"""What the engine runs on: the SpeechLM, its tokenizer, a codec decoder/encoder and the silence detector,
from a MAX artifact (`backend=max`) or from PyTorch checkpoints (`backend=torch`, the reference and baseline).

Both SpeechLMs take the same call (input_ids, attention_mask, position_ids, cache) and hand back logits and a
cache (`voxlm.speechlm.generate.stream_codes` runs either), so the engine is one piece of code. What differs
is the cache object: a transformers DynamicCache or MAX buffers. Continuous batching reshapes caches only when
requests join or leave a batch, so each backend converts its cache to and from plain per-layer tensors
[B, kv_heads, P, head_dim] (`cache_to_tensors` / `cache_from_tensors`) for those moments; every decode step
runs on the backend's own cache. MAX's CPU cache also moves rows within its buffers (`keep_rows`,
`append_rows`), so a request leaving or joining copies its own row, not the whole batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.export.kernels import (
    CodeSamplerParams,
    TrimResult,
    silence_trim,
    silence_trim_reference,
)
from voxlm.speechlm.generate import SamplingConfig, allowed_tokens, next_tokens
from voxlm.speechlm.model import load_speechlm
from voxlm.speechlm.tokenizer import SpeechTokenizer


@dataclass
class Backend:
    name: str                         # "max" or "torch"
    model: Any                        # called like a transformers causal LM (MaxSpeechLM or the HF model)
    tokenizer: SpeechTokenizer
    codec: Codec                      # config (rates, codebook) and, for torch, the decoder itself
    decoder: Any                      # .init_stream(1, voice), .stream(codes [1, n], state) -> (audio, state)
    encoder: Any                      # .encode(audio [1, T]) -> codes [1, F]; .voice(audio [1, T]) -> [1, D]
    voices_dirs: list[Path]           # where saved voices are looked up, first match wins
    model_id: str                     # what /v1/models lists
    trim: Callable[[np.ndarray, int, float, int], TrimResult]  # (audio, frame_length, threshold_db, hangover)
    cache_to_tensors: Callable[[Any], list[Tensor]]
    cache_from_tensors: Callable[..., Any]  # (tensors, spare_rows=0): spare_rows, room for append_rows
    # A forward over new tokens and the sampling of each row's next one: (input_ids [B, T], attention_mask
    # [B, P+T], position_ids [B, T], cache, end_allowed [B] bool (False: [speech_end] may not come yet),
    # advance_allowed [B] bool (the interleaved format's <|advance|>; ignored by plain models), recent code
    # ids [B, W], sampling, generator) -> (next token ids [B], cache)
    step: Callable[[Tensor, Tensor, Tensor, Any, Tensor, Tensor, Tensor, SamplingConfig,
                    torch.Generator | None], tuple[Tensor, Any]]
    # In-place row moves, or None where the backend has none (or returns None: the engine copies instead).
    # keep_rows(cache, order): new row j = old row order[j], rows moving only from past the new end.
    keep_rows: Callable[[Any, list[int]], Any] | None = None
    # append_rows(cache, other, rows): other's rows after the cache's own (other's past no longer).
    append_rows: Callable[[Any, Any, list[int]], Any] | None = None

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)


def max_backend(artifact_dir: str | Path, device: str = "cpu", extra_voices_dir: str | Path | None = None,
                model_id: str | None = None) -> Backend:
    """The artifact's MAX graphs (verified against its manifest, no compile) and the Mojo silence kernel."""
    from voxlm.export.build import load_artifact

    loaded = load_artifact(artifact_dir, device=device)
    model = loaded.speechlm

    tok = loaded.tokenizer

    def step(ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, end_allowed: Tensor,
             advance_allowed: Tensor, recent: Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None) -> tuple[Tensor, Any]:
        # The fused Mojo sampler (mask, repetition penalty, temperature, top-k, top-p and the draw in one
        # kernel, from uniform numbers of the engine's generator) runs inside the CPU's graph call.
        u = torch.rand(len(ids), generator=generator, dtype=torch.float64)
        bias = torch.zeros(len(ids), model.shape.vocab_size)
        bias[~end_allowed, tok.speech_end_id] = -math.inf
        if tok.interleaved:
            bias[~advance_allowed, tok.advance_id] = -math.inf
        return model.sample_step(ids, mask, positions, cache, bias, recent, u,
                                 CodeSamplerParams.from_config(sampling, tok))

    dirs = [Path(extra_voices_dir)] if extra_voices_dir else []
    return Backend("max", model, loaded.tokenizer, loaded.codec, loaded.decoder, loaded.encoder,
                   dirs + [loaded.voices_dir], model_id or f"voxlm-{loaded.manifest['key']}", silence_trim,
                   model.cache_tensors, model.cache_from_tensors, step, model.keep_rows, model.append_rows)


def torch_backend(checkpoint: str | Path, codec_path: str | Path, device: str = "cpu", dtype: str = "float32",
                  voices_dir: str | Path | None = None, model_id: str | None = None) -> Backend:
    """The PyTorch reference: the HF SpeechLM and the codec as trained, the NumPy silence detector."""
    codec = load_codec(codec_path, map_location=device).eval()
    model, tok = load_speechlm(checkpoint, codec.codebook_size, device, dtype,
                               codec_id=codec.code_fingerprint())

    def to_tensors(cache: DynamicCache) -> list[Tensor]:
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    def from_tensors(tensors: list[Tensor], spare_rows: int = 0) -> DynamicCache:
        return DynamicCache(ddp_cache_data=list(zip(tensors[0::2], tensors[1::2], strict=True)))

    allowed = allowed_tokens(tok, model.config.vocab_size).to(device)

    def step(ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, end_allowed: Tensor,
             advance_allowed: Tensor, recent: Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None) -> tuple[Tensor, Any]:
        ids, mask, positions = (t.to(device) for t in (ids, mask, positions))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
        logits = out.logits[:, -1].float()
        logits[~end_allowed.to(device), tok.speech_end_id] = -math.inf
        if tok.interleaved:
            logits[~advance_allowed.to(device), tok.advance_id] = -math.inf
        return next_tokens(logits, allowed, recent.to(device), sampling, generator).cpu(), out.cache

    dirs = [Path(voices_dir)] if voices_dir else []
    return Backend("torch", model, tok, codec, codec, codec, dirs,
                   model_id or f"voxlm-torch-{Path(checkpoint).resolve().name}", silence_trim_reference,
                   to_tensors, from_tensors, step)
