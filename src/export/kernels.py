"""Mojo custom ops (kernels/voxlm_ops) run through MAX graphs, with the NumPy references they must match.

    silence_trim(audio [N] f32)            ─► voxlm_silence_trim  ─► TrimResult(start, end, rms_db [F])
    sample_codes(logits [B, V] f32, ...)   ─► voxlm_code_sampler  ─► token ids [B] int64
    cached_attention(qkv, cos, sin, mask,  ─► voxlm_cached_attention ─► [B, T, H * D], caches appended
                     k_cache, v_cache)

Each op sits alone in a small MAX graph with dynamic dims (N; B, V, H), so ONE compiled graph serves every
clip length and batch shape; graphs are compiled once per process (functools.cache) and their settings that
may change per request (threshold, hangover, sampling settings) are runtime inputs, not graph constants. The
only compile-time setting is the silence detector's frame length, because the [F] output's shape is written
as ceil(N / frame_length) in the graph: one graph per frame length.

Semantics (the NumPy references below are the specification; the Mojo kernels match them exactly):

- Silence: non-overlapping frames of `frame_length` samples, the last one possibly partial (F = ceil(N / L),
  so a clip shorter than one frame still has one frame); RMS in dBFS (full scale 1.0) floored at -100 dB;
  a frame is voiced when its RMS >= threshold; the region runs from the first to the last voiced frame,
  widened by `hangover` frames on both sides, returned in samples as [start, end). No voiced frame (all
  silent, or an empty clip) returns the explicit empty region start = end = 0.
- Sampler: `voxlm.speechlm.generate.next_tokens` restricted to the code block [offset, offset + K) plus
  speech_end and, for an interleaved SpeechLM, advance (mask ─► repetition penalty ─► temperature ─► top-k
  ─► top-p; the graphs add a per-row logit bias first, which masks speech_end or advance per row), except
  that the randomness is the caller's u in [0, 1) per row: inverse-CDF sampling over the filtered,
  renormalized distribution in ascending token-id order (the first id whose cumulative weight exceeds
  u * total). Temperature 0 is the argmax (ties: smallest id). Ties in top-p's ordering go to the smaller
  id; probabilities are float64.
  `sample_codes_torch` runs the same steps with generate.py's own torch functions: the benchmark baseline.
- Cached attention: one SpeechLM layer's attention over a preallocated KV cache (the in-place decode graph of
  voxlm.export.speechlm runs it once per layer); `cached_attention_reference` is the same computation with
  HF's Llama functions (apply_rotary_pos_emb, concatenated past and new K/V, repeat_kv, masked softmax). The
  op alone runs here through its own small graph, for the parity tests and the micro-benchmark.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession, Model
from max.graph import BufferType, DeviceRef, Dim, Graph, TensorType, ops

from voxlm.speechlm.generate import SamplingConfig, apply_repetition_penalty, filter_top_k, filter_top_p
from voxlm.speechlm.tokenizer import SpeechTokenizer

# The Mojo package folder; MAX compiles it on first use (and caches the result in MODULAR_CACHE_DIR).
# VOXLM_KERNELS may point elsewhere, e.g. at the output of `mojo precompile kernels/voxlm_ops -o ops.mojoc`.
KERNELS_PATH = Path(os.environ.get("VOXLM_KERNELS",
                                  Path(__file__).resolve().parents[2] / "kernels" / "voxlm_ops"))

DB_FLOOR = -100.0  # dBFS of digital silence: mean square floored at 1e-10


@dataclass(frozen=True)
class TrimResult:
    """The voiced region [start, end) in samples (start = end = 0: no voiced frame) and each frame's RMS."""

    start: int
    end: int
    rms_db: np.ndarray  # float32 [ceil(N / frame_length)]

    @property
    def empty(self) -> bool:
        return self.end <= self.start


@dataclass(frozen=True)
class CodeSamplerParams:
    """Which ids may be sampled and how: top_k 0, top_p 1 and penalty 1 are off; temperature 0 is argmax."""

    offset: int          # first code id
    num_codes: int       # K: codes are [offset, offset + K)
    speech_end: int      # an extra allowed id
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    penalty: float = 1.0
    advance: int = -1    # another extra allowed id, the interleaved format's <|advance|> (-1: none)

    def __post_init__(self) -> None:
        if (self.num_codes < 1 or self.offset < 0 or self.speech_end < 0 or self.top_k < 0
                or self.advance < -1):
            raise ValueError(f"bad sampler ids: {self}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.penalty <= 0:
            raise ValueError(f"bad sampling settings: {self}")

    @classmethod
    def from_config(cls, cfg: SamplingConfig, tok: SpeechTokenizer) -> CodeSamplerParams:
        """The generate.py settings for this tokenizer's code block (the window of the history is the
        caller's business: pass the last `repetition_window` codes as `history`)."""
        return cls(offset=tok.code_offset, num_codes=tok.vocab_size - tok.code_offset,
                   speech_end=tok.speech_end_id, temperature=0.0 if cfg.greedy else cfg.temperature,
                   top_k=cfg.top_k or 0, top_p=cfg.top_p, penalty=cfg.repetition_penalty,
                   advance=tok.advance_id if tok.interleaved else -1)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's iparams [5] int64 (offset, codes, speech_end, top_k, advance) and fparams [3]
        float32 (temperature, top_p, penalty)."""
        return (np.array([self.offset, self.num_codes, self.speech_end, self.top_k, self.advance], np.int64),
                np.array([self.temperature, self.top_p, self.penalty], np.float32))

    @property
    def last_id(self) -> int:
        """The largest allowed id: the logits must reach it."""
        return max(self.offset + self.num_codes - 1, self.speech_end, self.advance)

    def candidate_ids(self) -> np.ndarray:
        """The allowed ids, ascending (each extra id once, even when it lies inside the block)."""
        block = np.arange(self.offset, self.offset + self.num_codes)
        extras = [self.speech_end] + ([self.advance] if self.advance >= 0 else [])
        return np.union1d(block, extras).astype(np.int64)


# ---------------------------------------------------------------- NumPy references (the specification)

def silence_trim_reference(audio: np.ndarray, frame_length: int, threshold_db: float,
                           hangover: int) -> TrimResult:
    """Frame RMS in dBFS and the trim points of the voiced region; see the module docstring."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1).astype(np.float64)
    n = len(x)
    frames = -(-n // frame_length)
    if frames == 0:
        return TrimResult(0, 0, np.zeros(0, np.float32))
    squares = np.zeros(frames * frame_length)
    squares[:n] = x * x
    counts = np.full(frames, frame_length, dtype=np.float64)
    counts[-1] = n - (frames - 1) * frame_length
    db = 10.0 * np.log10(np.maximum(squares.reshape(frames, frame_length).sum(1) / counts, 1e-10))
    # The kernel receives the threshold as float32: compare against the same number.
    voiced = np.flatnonzero(db >= float(np.float32(threshold_db)))
    if len(voiced) == 0:
        return TrimResult(0, 0, db.astype(np.float32))
    first = max(int(voiced[0]) - hangover, 0)
    last = min(int(voiced[-1]) + hangover, frames - 1)
    return TrimResult(first * frame_length, min((last + 1) * frame_length, n), db.astype(np.float32))


def sample_codes_reference(logits: np.ndarray, history: np.ndarray | None, u: np.ndarray,
                           params: CodeSamplerParams) -> np.ndarray:
    """Token id per row (int64 [B]); see the module docstring. Scalars are rounded to float32 first, as the
    kernel receives them, and weights are summed in the kernel's orders, so the ids match exactly."""
    logits = np.asarray(logits, dtype=np.float32)
    rows, vocab = logits.shape
    history = np.zeros((rows, 0), np.int64) if history is None else np.asarray(history, np.int64)
    u = np.asarray(u, dtype=np.float64).reshape(rows)
    ids = params.candidate_ids()
    if ids[-1] >= vocab:
        raise ValueError(f"allowed ids reach {ids[-1]}, past the {vocab} logits")
    n = len(ids)
    temperature, top_p, penalty = (np.float32(v) for v in (params.temperature, params.top_p, params.penalty))
    top_k = params.top_k
    use_top_k = 0 < top_k < vocab and top_k < n
    out = np.empty(rows, np.int64)
    for r in range(rows):
        vals = logits[r, ids]
        if penalty != 1 and history.shape[1] > 0:
            hit = np.isin(ids, history[r])
            vals = np.where(hit, np.where(vals > 0, vals / penalty, vals * penalty), vals).astype(np.float32)
        if temperature == 0:
            out[r] = ids[int(np.argmax(vals))]  # first maximum: the smallest id, as torch.argmax
            continue
        vals = (vals / temperature).astype(np.float32)
        # One set of weights relative to the row maximum, which no filter removes.
        weights = np.exp(vals.astype(np.float64) - float(vals.max()))
        keep = np.ones(n, dtype=bool)
        if use_top_k or top_p < 1:
            order = np.argsort(-vals, kind="stable")  # rank: value desc, ties by id asc
            if use_top_k:
                keep = vals >= vals[order[top_k - 1]]
            if top_p < 1:
                total = np.cumsum(weights[keep])[-1]   # sequential, in id order
                ranked = order[keep[order]]
                probs = weights[ranked] / total
                before = np.concatenate(([0.0], np.cumsum(probs)[:-1]))
                keep[ranked[before >= float(top_p)]] = False
        cdf = np.cumsum(weights[keep])
        pick = int(np.searchsorted(cdf, u[r] * cdf[-1], side="right"))  # first cdf > u * total
        if pick >= len(cdf):  # u * total rounded up to the total: the last token with any mass
            pick = int(np.flatnonzero(weights[keep] > 0)[-1])
        out[r] = ids[keep][pick]
    return out


def sample_codes_torch(logits: torch.Tensor, history: torch.Tensor | None, u: torch.Tensor,
                       params: CodeSamplerParams) -> torch.Tensor:
    """The same steps with generate.py's torch functions (float32 filtering as in serving, float64 CDF);
    the baseline the kernel is timed against. Agrees with the reference except at rounding boundaries."""
    rows, vocab = logits.shape
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[params.offset: params.offset + params.num_codes] = True
    allowed[params.speech_end] = True
    if params.advance >= 0:
        allowed[params.advance] = True
    x = logits.masked_fill(~allowed, -math.inf)
    if history is not None:
        x = apply_repetition_penalty(x, history, params.penalty)
    if params.temperature == 0:
        return x.argmax(dim=-1)
    x = filter_top_p(filter_top_k(x / params.temperature, params.top_k or None), params.top_p)
    probs = x.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    last_with_mass = vocab - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    return torch.minimum(pick, last_with_mass)


# ---------------------------------------------------------------- the Mojo kernels through MAX

@functools.cache
def _session() -> InferenceSession:
    return InferenceSession(devices=[CPU()])


@functools.cache
def _silence_model(frame_length: int) -> Model:
    device = DeviceRef.CPU()
    audio_type = TensorType(DType.float32, ["samples"], device)
    threshold_type = TensorType(DType.float32, [1], device)
    hangover_type = TensorType(DType.int64, [1], device)
    with Graph(f"voxlm_silence_trim_{frame_length}", input_types=[audio_type, threshold_type, hangover_type],
               custom_extensions=[KERNELS_PATH]) as graph:
        audio, threshold, hangover = graph.inputs
        frames = (Dim("samples") + (frame_length - 1)) // frame_length
        rms_db, trims = ops.custom(
            "voxlm_silence_trim", device=device, values=[audio, threshold, hangover],
            out_types=[TensorType(DType.float32, [frames], device), TensorType(DType.int64, [2], device)],
            parameters={"frame_length": frame_length})
        graph.output(rms_db, trims)
    return _session().load(graph)


@functools.cache
def _sampler_model() -> Model:
    device = DeviceRef.CPU()
    types = [TensorType(DType.float32, ["batch", "vocab"], device),
             TensorType(DType.int64, ["batch", "history"], device),
             TensorType(DType.float64, ["batch"], device),
             TensorType(DType.int64, [5], device),
             TensorType(DType.float32, [3], device)]
    with Graph("voxlm_code_sampler", input_types=types, custom_extensions=[KERNELS_PATH]) as graph:
        (tokens,) = ops.custom("voxlm_code_sampler", device=device, values=list(graph.inputs),
                               out_types=[TensorType(DType.int64, [Dim("batch")], device)])
        graph.output(tokens)
    return _session().load(graph)


@functools.cache
def _attention_model(num_heads: int, num_kv_heads: int, head_dim: int) -> Model:
    device = DeviceRef.CPU()
    cache_type = BufferType(DType.float32, ["batch", num_kv_heads, "capacity", head_dim], device)
    types = [TensorType(DType.float32, ["batch", "new", (num_heads + 2 * num_kv_heads) * head_dim], device),
             TensorType(DType.float32, ["batch", "new", head_dim], device),
             TensorType(DType.float32, ["batch", "new", head_dim], device),
             TensorType(DType.int64, ["batch", "total"], device), cache_type, cache_type]
    with Graph(f"voxlm_cached_attention_{num_heads}_{num_kv_heads}_{head_dim}", input_types=types,
               custom_extensions=[KERNELS_PATH]) as graph:
        out_type = TensorType(DType.float32, [Dim("batch"), Dim("new"), num_heads * head_dim], device)
        (out,) = ops.inplace_custom("voxlm_cached_attention", device=device, values=list(graph.inputs),
                                    out_types=[out_type], parameters={
                                        "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                                        "head_dim": head_dim})
        graph.output(out)
    return _session().load(graph)


def compile_kernels(frame_length: int = 320) -> None:
    """Compile (or load from MAX's cache) both graphs now, e.g. at server start-up, not at a first request."""
    _silence_model(frame_length)
    _sampler_model()


def _buffer(array: np.ndarray) -> Buffer:
    return Buffer.from_numpy(np.ascontiguousarray(array))


def silence_trim(audio: np.ndarray | torch.Tensor, frame_length: int = 320, threshold_db: float = -40.0,
                 hangover: int = 2) -> TrimResult:
    """The Mojo silence detector; same result as `silence_trim_reference`."""
    if frame_length < 1 or hangover < 0:
        raise ValueError(f"bad frame_length {frame_length} or hangover {hangover}")
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    rms_db, trims = _silence_model(frame_length).execute(
        _buffer(x), _buffer(np.array([threshold_db], np.float32)), _buffer(np.array([hangover], np.int64)))
    start, end = (int(v) for v in trims.to_numpy())
    return TrimResult(start, end, rms_db.to_numpy())


def sample_codes(logits: np.ndarray | torch.Tensor, history: np.ndarray | torch.Tensor | None,
                 u: np.ndarray | torch.Tensor, params: CodeSamplerParams) -> np.ndarray | torch.Tensor:
    """The fused Mojo sampler: token id per row, int64 [B] (a LongTensor when `logits` is a tensor).
    history: [B, H] recent ids, -1 = empty (None: no history); u: [B] uniform numbers in [0, 1)."""
    as_torch = isinstance(logits, torch.Tensor)

    def numpy(value: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=dtype)

    x = numpy(logits, np.float32)
    rows, vocab = x.shape
    h = np.zeros((rows, 0), np.int64) if history is None else numpy(history, np.int64).reshape(rows, -1)
    if params.last_id >= vocab:
        raise ValueError(f"allowed ids reach past the {vocab} logits: {params}")
    iparams, fparams = params.arrays()
    (tokens,) = _sampler_model().execute(_buffer(x), _buffer(h), _buffer(numpy(u, np.float64).reshape(rows)),
                                         _buffer(iparams), _buffer(fparams))
    out = tokens.to_numpy()
    return torch.from_numpy(out.copy()) if as_torch else out


def cached_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """The Mojo op alone (float32, CPU): attention output [B, T, H * D]; k_cache and v_cache [B, KV, C, D]
    (contiguous) receive the new tokens' K and V at positions P .. P+T-1, where P = mask width - T.
    qkv [B, T, (H + 2 KV) * D] is the fused projection; cos, sin [B, T, D]; mask [B, P + T] (1 = real)."""
    if k_cache.shape[2] < mask.shape[1]:
        raise ValueError(f"the cache holds {k_cache.shape[2]} positions; past + new needs {mask.shape[1]}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous: the op writes them in place")
    model = _attention_model(num_heads, num_kv_heads, k_cache.shape[3])
    inputs = [Buffer.from_dlpack(t.to(torch.float32).contiguous()) for t in (qkv, cos, sin)]
    (out,) = model.execute(*inputs, Buffer.from_dlpack(mask.to(torch.int64).contiguous()),
                           Buffer.from_dlpack(k_cache), Buffer.from_dlpack(v_cache))
    return torch.from_dlpack(out)


def cached_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                               k_past: torch.Tensor, v_past: torch.Tensor, num_heads: int,
                               num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `cached_attention` computes, with HF's own Llama functions (apply_rotary_pos_emb, repeat_kv):
    (output [B, T, H * D], and the past + new K and V [B, KV, P + T, D] the cache must hold afterwards).
    Queries that see no key (left padding) are given zeros, as the kernel gives them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    B, T, _ = qkv.shape
    D = k_past.shape[3]
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q, k, v = (x.reshape(B, T, -1, D).transpose(1, 2) for x in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)
    P = k_past.shape[2]
    group = num_heads // num_kv_heads
    causal = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]           # [T, P+T]
    visible = causal[None, None] & mask.bool()[:, None, None, :]                      # [B, 1, T, P+T]
    scores = q @ repeat_kv(keys, group).transpose(2, 3) / math.sqrt(D)
    weights = scores.float().masked_fill(~visible, -math.inf).softmax(-1).nan_to_num(0.0)
    out = (weights.to(q.dtype) @ repeat_kv(values, group)).transpose(1, 2).reshape(B, T, -1)
    return out, keys, values
