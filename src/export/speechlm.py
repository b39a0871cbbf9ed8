"""The SpeechLM (a stock transformers LlamaForCausalLM) as Modular MAX graphs, with an explicit KV cache.

    input_ids [B, T], attention bias [B, 1, 1, T, P+T] (made on the host from the attention mask),
    position_ids [B, T], past K/V per layer
    ─► embed ─► L x (RMSNorm ─► GQA attention with RoPE over past+new ─► RMSNorm ─► SwiGLU) ─► last position
    ─► RMSNorm ─► lm_head ─► logits [B, vocab] (float32)

Two graphs with the same weights (B, T, P dynamic, so each serves any batch and length):
- `build_graph`, the prefill graph: past K/V [B, kv_heads, P, hd] go in as inputs and past + new come out
  (a concatenation); on the GPU it also runs decode steps. The CPU's variant takes no past (its prefill
  starts from nothing, its steps run the decode graph) and hands the new K/V back without a concatenation.
- `build_decode_graph`, CPU decode steps: each layer's K/V live in preallocated buffers [B, kv_heads,
  capacity, hd] that the Mojo op `voxlm_cached_attention` appends to in place while it attends. A step then
  reads the cache once instead of copying it (the prefill graph's concat costs a full copy per step, which
  made MAX slower than PyTorch at batch 8), and one op per layer replaces ~20 small ones.
`MaxSpeechLM` wraps them so that they stand in for the Hugging Face model inside
`voxlm.speechlm.generate.stream_codes` / `generate_codes`, unchanged: it takes the same keyword arguments,
treats the sampler's initial empty DynamicCache as "no past", and hands back its own `MaxKVCache`, whose
K/V stay MAX buffers between steps (only ids, mask, positions go in and the last position's logits come out).

Why plain max.graph ops rather than MAX's llama3 pipeline and its paged KV cache: the sampler needs an
HF-shaped call (left padding expressed by an attention mask, per-row positions, a cache object it passes
back), which the paged-cache machinery does not offer; and a ~60-line forward that reads like the HF one is
easy to check against it.

Pitfalls met while writing it (MAX 26.7, CPU):
- the attention mask, computed in the graph, was lost to fusion: first as `ops.range`/`cumsum` index
  comparisons broadcast against the padding mask (the fused elementwise kernel lost the query axis), then,
  in a graph that used the mask once (scripts/check_max_ops.py), as `band_part` + `concat`: attention came
  out non-causal, and right again when the same mask was also a graph output. So the additive bias is made
  on the host (`attention_bias`) and comes in as data: [B, T, P+T] floats, ~1 MB for a 500-token prefill;
- -inf in the additive mask turns a fully masked row (a left-padding query) into NaN, which then leaks into
  real rows through 0 * NaN in the attention-weighted sum: masked scores get a large finite negative instead;
- `x @ w.T` on HF's [out, in] weights re-transposed every weight on every call: they are stored [in, out].
- slices and concatenations of activations are copied by a slow generic kernel: RoPE's rotate_half as
  slice + concat cost 2.7 ms of a 460-token prefill, as a matmul by a signed permutation it is exact and
  ~5x cheaper. With that, no past concatenation on the CPU and the last layer run for the last position
  only, a 460-token prefill went from 28.0 to 18.7 ms (docs/benchmarks.md).
Checked on CPU in float32 (tests/test_export_speechlm.py, tests/test_kernels.py), the GPU's graph too
(compiled for the CPU); on the GPU see docs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import CompiledModel, InferenceSession, Model
from max.graph import BufferType, DeviceRef, Dim, Graph, TensorType, TensorValue, Weight, ops
from torch import Tensor
from transformers import LlamaConfig, PreTrainedModel

from voxlm.export.kernels import KERNELS_PATH, CodeSamplerParams, sample_codes
from voxlm.export.sessions import compile_once, device_ref, max_device

MASKED = -1e9  # additive score for a key a query must not see (finite: see the module docstring)
DTYPES = {"float32": (DType.float32, torch.float32), "bfloat16": (DType.bfloat16, torch.bfloat16)}


@dataclass(frozen=True)
class LlamaShape:
    """What the graph depends on (weights are bound at init, so a graph serves any weights of this shape)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config: LlamaConfig) -> LlamaShape:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope scaling {rope['rope_type']!r} is not ported")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, float(theta),
                   float(config.rms_norm_eps))


# --- the graph ----------------------------------------------------------------------------------------------

def build_graph(shape: LlamaShape, dtype: DType = DType.float32, device: DeviceRef | None = None,
                with_past: bool = True, rope_by_slices: bool | None = None) -> Graph:
    """The Llama forward over a KV cache passed in and handed back (past + new, concatenated): decode steps
    where the in-place graph does not run (GPU), and prefill. `with_past=False` is the CPU's prefill graph:
    no past inputs, so the new K/V are handed back as they are, without a concatenation's copy; and, as the
    CPU's decode graph, it samples the next tokens too (`sampler_inputs`). Outputs: logits, [tokens,] K/V.
    `rope_by_slices` picks `rotate`'s form (default: slices on a GPU, the permutation on the CPU); a test sets
    it to compile the GPU's exact graph for the CPU."""
    device = device or DeviceRef.CPU()
    by_slices = device != DeviceRef.CPU() if rope_by_slices is None else rope_by_slices
    s = shape
    kv_type = TensorType(dtype, ["batch", s.num_kv_heads, "past", s.head_dim], device=device)
    key = hashlib.sha1(repr((s, dtype, device, with_past, by_slices)).encode()).hexdigest()[:12]
    extra_types = [kv_type] * (2 * s.num_layers) if with_past else sampler_inputs(s.vocab_size)

    ids_type, _, positions_type = token_inputs(device)  # the attention mask comes in as a bias
    bias_type = TensorType(DType.float32, ["batch", 1, 1, "new", "total"], device=device)
    with Graph(f"speechlm_{key}", input_types=[ids_type, bias_type, positions_type] + extra_types,
               custom_extensions=[] if with_past else [KERNELS_PATH]) as graph:
        ids, bias, position_ids, *extra = (value.tensor for value in graph.inputs)
        past = extra if with_past else []
        B, T = ids.shape
        P = past[0].shape[2] if with_past else Dim(0)
        bias = ops.rebind(bias, [B, 1, 1, T, P + T], message="the attention bias must be [B, 1, 1, T, P+T]")
        bias = bias.cast(dtype)
        cos, sin = rope_tables(position_ids, s.head_dim, s.rope_theta, dtype, device)
        weight = weights_of(graph, dtype, device)

        x = ops.gather(weight("model.embed_tokens.weight", s.vocab_size, s.hidden_size), ids, axis=0)
        new_cache = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            qkv = fused_qkv(x, weight, p, s)
            q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            q, k, v = qkv[..., :q_dim], qkv[..., q_dim: q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
            q = rotate(heads(q, s.num_heads, s.head_dim), cos, sin, by_slices)  # [B, heads, T, hd]
            k = rotate(heads(k, s.num_kv_heads, s.head_dim), cos, sin, by_slices)
            v = heads(v, s.num_kv_heads, s.head_dim)
            if with_past:
                k, v = ops.concat([past[2 * i], k], axis=2), ops.concat([past[2 * i + 1], v], axis=2)
            new_cache += [k, v]                                                   # [B, kv_heads, P+T, hd]
            if i == s.num_layers - 1:
                # Past the last layer's K/V only the last position matters (the logits are its alone):
                # its attention, o_proj and MLP run for that position, not for all T (a 6-layer prefill
                # saves a sixth of its work).
                q, bias, x = q[:, :, -1:], bias[:, :, :, -1:], x[:, -1:]
            y = attention(q, k, v, bias, s.num_kv_heads)                          # [B, T, heads * hd]
            x = x + y @ weight(p + "self_attn.o_proj.weight", q_dim, s.hidden_size)
            x = x + mlp(x, weight, p, s)
        logits = last_logits(x, weight, s)
        graph.output(logits, *([] if with_past else [sampled(logits, *extra)]), *new_cache)
    return graph


def build_decode_graph(shape: LlamaShape, dtype: DType = DType.float32) -> Graph:
    """The same forward for the CPU's decode steps over a preallocated cache [B, kv_heads, capacity, hd] per
    layer, which the Mojo op `voxlm_cached_attention` (kernels/voxlm_ops/attention.mojo) appends to in place
    while it attends: the cache is read once per step, never copied, and one op per layer replaces the
    head reshapes, RoPE, concats, matmuls, mask and softmax of `build_graph`. The logits and the tokens
    sampled from them (`sampler_inputs`) come out."""
    device = DeviceRef.CPU()
    s = shape
    cache_type = BufferType(dtype, ["batch", s.num_kv_heads, "capacity", s.head_dim], device=device)
    key = hashlib.sha1(repr((s, dtype, device)).encode()).hexdigest()[:12]
    sampler_types = sampler_inputs(s.vocab_size)

    with Graph(f"speechlm_decode_{key}", input_types=token_inputs(device) + sampler_types
               + [cache_type] * (2 * s.num_layers), custom_extensions=[KERNELS_PATH]) as graph:
        ids, attention_mask, position_ids = (value.tensor for value in graph.inputs[:3])
        sampling = [value.tensor for value in graph.inputs[3: 3 + len(sampler_types)]]
        cache = [value.buffer for value in graph.inputs[3 + len(sampler_types):]]
        B, T = ids.shape
        cos, sin = rope_tables(position_ids, s.head_dim, s.rope_theta, dtype, device)
        cos, sin = (table.reshape([B, T, s.head_dim]) for table in (cos, sin))
        weight = weights_of(graph, dtype, device)

        x = ops.gather(weight("model.embed_tokens.weight", s.vocab_size, s.hidden_size), ids, axis=0)
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            (y,) = ops.inplace_custom(
                "voxlm_cached_attention", device=device,
                values=[fused_qkv(x, weight, p, s), cos, sin, attention_mask, cache[2 * i], cache[2 * i + 1]],
                out_types=[TensorType(dtype, [B, T, s.num_heads * s.head_dim], device)],
                parameters={"num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim})
            x = x + y.tensor @ weight(p + "self_attn.o_proj.weight", s.num_heads * s.head_dim, s.hidden_size)
            x = x + mlp(x, weight, p, s)
        logits = last_logits(x, weight, s)
        graph.output(logits, sampled(logits, *sampling))
    return graph


def token_inputs(device: DeviceRef) -> list[TensorType]:
    """input_ids [B, T], attention_mask [B, P+T] over past and new tokens, position_ids [B, T]."""
    return [TensorType(DType.int64, ["batch", "new"], device=device),
            TensorType(DType.int64, ["batch", "total"], device=device),
            TensorType(DType.int64, ["batch", "new"], device=device)]


def sampler_inputs(vocab_size: int) -> list[TensorType]:
    """What the CPU graphs sample the next token with, by the fused Mojo sampler (voxlm.export.kernels):
    logit_bias [B, vocab] float32 added first (-inf: a token this row may not take now, e.g. [speech_end]
    before the shortest answer), recent [B, W] code ids for the repetition penalty (-1: none), u [B] the
    row's uniform number, iparams [5] (offset, codes, speech_end, top_k, advance), fparams [3] (temperature,
    top_p, penalty). Sampling in the graph saves a second graph call per step (~0.2-0.8 ms in the server)."""
    device = DeviceRef.CPU()
    return [TensorType(DType.float32, ["batch", vocab_size], device=device),
            TensorType(DType.int64, ["batch", "window"], device=device),
            TensorType(DType.float64, ["batch"], device=device),
            TensorType(DType.int64, [5], device=device),
            TensorType(DType.float32, [3], device=device)]


def sampled(logits: TensorValue, logit_bias: TensorValue, recent: TensorValue, u: TensorValue,
            iparams: TensorValue, fparams: TensorValue) -> TensorValue:
    """The next token per row [B] int64, by the Mojo sampler `voxlm_code_sampler`."""
    (tokens,) = ops.custom("voxlm_code_sampler", device=DeviceRef.CPU(),
                           values=[logits + logit_bias, recent, u, iparams, fparams],
                           out_types=[TensorType(DType.int64, [logits.shape[0]], DeviceRef.CPU())])
    return tokens


def weights_of(graph: Graph, dtype: DType, device: DeviceRef) -> Callable[..., TensorValue]:
    """weight(name, *dims): a graph weight named as in the HF state_dict, bound at init (`weight_registry`);
    projections are [in, out], so one compiled graph serves any weights of this shape."""
    def weight(name: str, *dims: int) -> TensorValue:
        return graph.add_weight(Weight(name, dtype, list(dims), device=device))
    return weight


def fused_qkv(x: TensorValue, weight: Callable[..., TensorValue], p: str, s: LlamaShape) -> TensorValue:
    """RMSNorm, then Q, K and V in one matmul [B, T, (heads + 2 kv_heads) * hd]: at decode's one token per
    row, a step is a chain of small matmuls whose count, more than their size, sets the latency."""
    h = ops.rms_norm(x, weight(p + "input_layernorm.weight", s.hidden_size), s.rms_norm_eps)
    qkv_dim = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    return h @ weight(p + "self_attn.qkv_proj.weight", s.hidden_size, qkv_dim)


def mlp(x: TensorValue, weight: Callable[..., TensorValue], p: str, s: LlamaShape) -> TensorValue:
    """RMSNorm, then SwiGLU with gate and up in one matmul."""
    h = ops.rms_norm(x, weight(p + "post_attention_layernorm.weight", s.hidden_size), s.rms_norm_eps)
    gate_up = h @ weight(p + "mlp.gate_up_proj.weight", s.hidden_size, 2 * s.intermediate_size)
    gate, up = gate_up[..., : s.intermediate_size], gate_up[..., s.intermediate_size:]
    return (ops.silu(gate) * up) @ weight(p + "mlp.down_proj.weight", s.intermediate_size, s.hidden_size)


def last_logits(x: TensorValue, weight: Callable[..., TensorValue], s: LlamaShape) -> TensorValue:
    """float32 logits [B, vocab] of the last position only: the sampler asks for logits_to_keep=1, left
    padding puts every row's newest token there, and skipping the others saves most of a prefill's output
    layer. lm_head is its own weight even when tied (the registry then binds the embedding to it), so one
    graph serves tied and untied models alike."""
    last = ops.rms_norm(x[:, -1], weight("model.norm.weight", s.hidden_size), s.rms_norm_eps)
    return (last @ weight("lm_head.weight", s.hidden_size, s.vocab_size)).cast(DType.float32)


def heads(x: TensorValue, num_heads: int, head_dim: int) -> TensorValue:
    """[B, T, heads * hd] -> [B, heads, T, hd]."""
    B, T = x.shape[0], x.shape[1]
    return x.reshape([B, T, num_heads, head_dim]).transpose(1, 2)


def rope_tables(position_ids: TensorValue, head_dim: int, theta: float, dtype: DType,
                device: DeviceRef) -> tuple[TensorValue, TensorValue]:
    """cos, sin [B, 1, T, hd] for each row's positions, computed in float32 as HF's LlamaRotaryEmbedding."""
    # The same float32 expression as HF, so the frequencies agree to the last bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = ops.constant(inv_freq.numpy(), DType.float32, device=device)
    freqs = ops.unsqueeze(position_ids.cast(DType.float32), -1) * inv_freq      # [B, T, hd/2]
    angles = ops.unsqueeze(ops.concat([freqs, freqs], axis=-1), 1)             # [B, 1, T, hd]
    return ops.cos(angles).cast(dtype), ops.sin(angles).cast(dtype)


def rotate(x: TensorValue, cos: TensorValue, sin: TensorValue, by_slices: bool | None = None) -> TensorValue:
    """RoPE in HF's rotate_half layout (the two halves of a head, not interleaved pairs).

    On the CPU, rotate_half(x) = [-x2, x1] is x @ a signed permutation matrix: each output is one input
    times +-1 plus zeros, so it is exact, and ~5x faster than slicing and concatenating the halves (MAX 26.7
    copies slices and concats with a slow generic kernel there). The GPU keeps the slices: a float32 matmul
    may round its inputs through TF32 there, which would not be exact. `by_slices` overrides that choice
    (None: by x's device)."""
    half = int(x.shape[-1]) // 2
    if x.device != DeviceRef.CPU() if by_slices is None else by_slices:
        return x * cos + ops.concat([-x[..., half:], x[..., :half]], axis=-1) * sin
    swap = np.zeros((2 * half, 2 * half), np.float32)
    swap[np.arange(half) + half, np.arange(half)] = -1.0   # out[:half] = -x[half:]
    swap[np.arange(half), np.arange(half) + half] = 1.0    # out[half:] = x[:half]
    swap = ops.constant(swap, DType.float32, device=x.device).cast(x.dtype)  # exact: entries are 0, +-1
    return x * cos + (x @ swap) * sin


def attention_bias(attention_mask: Tensor, new_tokens: int) -> np.ndarray:
    """Additive scores [B, 1, 1, T, P+T] float32 for the graph, from the mask [B, P+T] over past and new
    tokens: MASKED where the key is left padding or in the query's future (made here, not in the graph:
    see the module docstring).

    The new tokens sit at indices P..P+T-1, after every past key, so causality only cuts within them:
    a [T, T] strict upper triangle, next to [T, P] zeros for the past. Made with NumPy, not torch: torch
    runs elementwise ops this size on its OpenMP pool, whose threads then spin for a while on the cores
    MAX's workers need (a 500-token CPU prefill measured 15-18% slower that way, docs/benchmarks.md)."""
    padding = np.asarray(attention_mask.cpu()) == 0                              # [B, P+T]
    rows, total = padding.shape
    blocked = np.zeros((rows, new_tokens, total), dtype=bool)
    blocked[:, :, total - new_tokens:] = np.triu(np.ones((new_tokens, new_tokens), dtype=bool), 1)
    blocked |= padding[:, None, :]
    return np.where(blocked, np.float32(MASKED), np.float32(0.0))[:, None, None]


def attention(q: TensorValue, k: TensorValue, v: TensorValue, bias: TensorValue,
              num_kv_heads: int) -> TensorValue:
    """Grouped-query attention without repeating K/V: the query heads that share a KV head (HF's repeat_kv
    gives head h the KV head h // group) are stacked along the query axis and attend in one matmul.

    q [B, heads, T, hd], k and v [B, kv_heads, S, hd], bias [B, 1, 1, T, S] -> [B, T, heads * hd]."""
    B, num_heads, T, head_dim = q.shape
    group = int(num_heads) // num_kv_heads
    S = k.shape[2]
    q = q.reshape([B, num_kv_heads, group * T, head_dim])
    scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(int(head_dim)))          # [B, kv, group*T, S]
    scores = scores.reshape([B, num_kv_heads, group, T, S]) + bias
    weights = ops.softmax(scores.cast(DType.float32)).cast(q.dtype)
    y = weights.reshape([B, num_kv_heads, group * T, S]) @ v                    # [B, kv, group*T, hd]
    return y.reshape([B, num_heads, T, head_dim]).transpose(1, 2).reshape([B, T, num_heads * head_dim])


# --- compile once, bind weights, run ----------------------------------------------------------------------

def compiled_graph(shape: LlamaShape, dtype: str = "float32",
                   device: str = "cpu") -> tuple[InferenceSession, CompiledModel]:
    """(session, compiled graph) for a model shape, compiled at most once per process (and served from MAX's
    on-disk cache, ~1.5 s, when this graph was compiled before)."""
    ref, with_past = device_ref(device), device != "cpu"  # the CPU decodes with build_decode_graph
    return compile_once(("speechlm", shape, dtype), device,
                        lambda: build_graph(shape, DTYPES[dtype][0], ref, with_past))


def compiled_decode_graph(shape: LlamaShape,
                          dtype: str = "float32") -> tuple[InferenceSession, CompiledModel]:
    """The CPU's in-place decode graph, compiled at most once per process."""
    return compile_once(("speechlm_decode", shape, dtype), "cpu",
                        lambda: build_decode_graph(shape, DTYPES[dtype][0]))


def weight_registry(state_dict: Mapping[str, Tensor], shape: LlamaShape, dtype: str,
                    tied: bool) -> dict[str, Tensor]:
    """The graph's weights from an HF LlamaForCausalLM state_dict, contiguous and in the graph's dtype,
    with Q/K/V and gate/up concatenated into the fused projections the graph multiplies by.

    Projections are stored transposed, [in, out], so the graph multiplies x @ w: with HF's [out, in] and
    x @ w.T, MAX 26.7 on CPU transposed every weight on every call (decode steps ~30% slower)."""
    state_dict = dict(state_dict)
    if tied:  # as HF ties them, whatever lm_head.weight the file may hold (save_pretrained writes none)
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(shape.num_layers):
        names += [f"model.layers.{i}.{part}.weight" for part in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise KeyError(f"the state_dict lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: not a Llama "
                       "of this config (attention/MLP biases are not ported)")
    torch_dtype = DTYPES[dtype][1]

    def graph_layout(name: str, t: Tensor) -> Tensor:
        t = t.T if name.endswith("_proj.weight") or name == "lm_head.weight" else t
        return t.detach().to("cpu", torch_dtype)

    weights = {name: graph_layout(name, state_dict[name]) for name in names}
    for i in range(shape.num_layers):  # fused as `build_graph` uses them: [in, q|k|v], [in, gate|up]
        p = f"model.layers.{i}."
        weights[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [weights.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=1)
        weights[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [weights.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")], dim=1)
    return {name: t.contiguous() for name, t in weights.items()}


def load_state_dict(folder: Path) -> dict[str, Tensor]:
    """The weights of a save_pretrained folder, from all its *.safetensors files."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return {name: t for file in files for name, t in load_file(str(file)).items()}


@dataclass
class MaxKVCache:
    """Each layer's K and V as MAX buffers (K0, V0, K1, V1, ...), [B, kv_heads, capacity, hd], of which the
    first `length` positions hold the past.

    From the prefill graph (and on the GPU), capacity = length: the graph returns fresh buffers each call.
    On the CPU, decode steps append in place to preallocated buffers (capacity > length, the rest scratch)
    that borrow `host` tensors' memory. Every cache over the same buffers shares `written`, how far they were
    written, so continuing a cache that was already continued (which would overwrite the newer one's
    positions) is refused rather than silently corrupted; `crop` rewinds explicitly.
    """

    layers: list[Buffer]
    length: int
    host: list[Tensor] | None = None
    written: list[int] = field(default_factory=lambda: [0])

    @property
    def capacity(self) -> int:
        return int(self.layers[0].shape[2])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first max_length positions (negative: drop that many), as DynamicCache.crop."""
        self.length = max_length if max_length >= 0 else self.length + max_length
        self.written[0] = self.length


@dataclass
class MaxLMOutput:
    logits: Tensor       # [B, 1, vocab] float32 on the host: the last position's
    cache: MaxKVCache


class MaxSpeechLM:
    """The SpeechLM running on MAX, called like the HF model by `stream_codes` / `generate_codes`.

    The first call (an empty or no cache) runs the prefill graph. Later calls run the in-place decode graph
    on the CPU, and the prefill graph with the past passed in on the GPU (the Mojo attention op is CPU-only).
    `device` (the torch device the sampler keeps its tensors on) is always the host: logits come back to it
    each step, while the KV cache stays on the MAX device.
    """

    def __init__(self, config: LlamaConfig, state_dict: Mapping[str, Tensor], device: str = "cpu",
                 dtype: str = "float32", cache_headroom: int = 256) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.config = config
        self.shape = LlamaShape.from_config(config)
        self.max_device = max_device(device)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.in_place = device == "cpu"
        self.cache_headroom = cache_headroom  # positions allocated beyond need when an in-place cache grows
        # Kept alive on self: the MAX models borrow these tensors' memory rather than copying it.
        self._weights = weight_registry(state_dict, self.shape, dtype, config.tie_word_embeddings)
        session, compiled = compiled_graph(self.shape, dtype, device)
        self.model: Model = session.init(compiled, weights_registry=self._weights)
        self.decode_model: Model | None = None
        if self.in_place:
            session, compiled = compiled_decode_graph(self.shape, dtype)
            self.decode_model = session.init(compiled, weights_registry=self._weights)

    @classmethod
    def from_pretrained(cls, folder_or_model: str | Path | PreTrainedModel, device: str = "cpu",
                        dtype: str = "float32") -> MaxSpeechLM:
        """From an HF LlamaForCausalLM in memory, or a save_pretrained folder (or a run folder with hf/)."""
        if isinstance(folder_or_model, PreTrainedModel):
            return cls(folder_or_model.config, folder_or_model.state_dict(), device, dtype)
        from voxlm.speechlm.model import speechlm_folder

        folder = speechlm_folder(folder_or_model)
        return cls(LlamaConfig.from_pretrained(str(folder)), load_state_dict(folder), device, dtype)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                 cache: Any = None, use_cache: bool = True, logits_to_keep: int = 1, **_: Any) -> MaxLMOutput:
        """One forward over the new tokens input_ids [B, T]; attention_mask [B, P+T] covers past and new."""
        if logits_to_keep != 1:
            raise ValueError("the MAX graph computes the last position's logits only (logits_to_keep=1)")
        # The CPU graphs sample too: give them the cheapest draw (one candidate, token 0), then ignore it.
        rows = len(input_ids)
        one_token = CodeSamplerParams(offset=0, num_codes=1, speech_end=0, temperature=0.0)
        logits, _, cache = self._forward(input_ids, attention_mask, position_ids, cache,
                                         torch.zeros(rows, self.shape.vocab_size), torch.zeros(rows, 0),
                                         torch.zeros(rows, dtype=torch.float64), one_token)
        return MaxLMOutput(logits[:, None], cache)

    def sample_step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any,
                    logit_bias: Tensor, recent: Tensor, u: Tensor,
                    params: CodeSamplerParams) -> tuple[Tensor, MaxKVCache]:
        """A forward (as `__call__`) and the next token per row [B], drawn by the fused Mojo sampler from the
        last logits + logit_bias [B, vocab] (see `sampler_inputs`; recent [B, W], u [B] in [0, 1)). On the
        CPU one graph call does both; on the GPU the logits come to the host and are sampled there."""
        logits, tokens, cache = self._forward(input_ids, attention_mask, position_ids, cache, logit_bias,
                                              recent, u, params)
        if tokens is None:
            tokens = sample_codes(logits + logit_bias, recent, u, params)
        return tokens, cache

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any,
                 logit_bias: Tensor, recent: Tensor, u: Tensor,
                 params: CodeSamplerParams) -> tuple[Tensor, Tensor | None, MaxKVCache]:
        """(last logits [B, vocab] float32 on the host, sampled tokens [B] (None on the GPU), new cache)."""
        if not isinstance(cache, MaxKVCache):
            # The sampler's first call hands an empty DynamicCache: no past.
            if cache is not None and cache.get_seq_length() != 0:
                raise ValueError("a non-empty HF cache cannot be continued on MAX; start from an empty one")
            cache = None
        elif cache.written[0] != cache.length:
            raise ValueError(f"this cache ({cache.length} positions) was continued already, to "
                             f"{cache.written[0]}: continue the newest one, or crop() this one first")
        past, new_tokens = (0 if cache is None else cache.length), input_ids.shape[1]
        if attention_mask.shape != (len(input_ids), past + new_tokens):
            raise ValueError(f"attention_mask must be [B, past + new] = [{len(input_ids)}, "
                             f"{past + new_tokens}], got {list(attention_mask.shape)}")
        ids, positions = self._to_device(input_ids), self._to_device(position_ids)
        tokens = None
        if self.in_place:
            sampling = [logit_bias.to(torch.float32).contiguous(), recent.to(torch.int64).contiguous(),
                        u.to(torch.float64).contiguous(), *params.arrays()]
            if past > 0:
                cache = self._with_room(cache, new_tokens)
                logits, tokens = self.decode_model.execute(ids, self._to_device(attention_mask), positions,
                                                           *sampling, *cache.layers)
                cache.written[0] = cache.length + new_tokens
                cache = MaxKVCache(cache.layers, cache.length + new_tokens, cache.host, cache.written)
            else:  # a prefill: the CPU's prefill graph takes no (empty) past
                bias = attention_bias(attention_mask, new_tokens)
                logits, tokens, *layers = self.model.execute(ids, bias, positions, *sampling)
                cache = MaxKVCache(layers, new_tokens)
                cache.written[0] = cache.length
            tokens = torch.from_dlpack(tokens)
        else:
            if cache is None:  # the GPU graph takes a past even for a prefill: size-0 buffers
                empty = torch.zeros(len(input_ids), self.shape.num_kv_heads, 0, self.shape.head_dim,
                                    dtype=DTYPES[self.dtype][1])
                cache = self.cache_from_tensors([empty] * (2 * self.shape.num_layers))
            bias = Buffer.from_dlpack(attention_bias(attention_mask, new_tokens)).to(self.max_device)
            logits, *layers = self.model.execute(ids, bias, positions, *cache.layers)
            cache = MaxKVCache(layers, cache.length + new_tokens)
            cache.written[0] = cache.length
        logits = torch.from_dlpack(logits.to(CPU()) if self.max_device != CPU() else logits)
        return logits, tokens, cache

    def cache_tensors(self, cache: MaxKVCache) -> list[Tensor]:
        """Each layer's K and V as host tensors [B, kv_heads, P, hd] (views of the buffers on the CPU)."""
        on_host = (b if self.max_device == CPU() else b.to(CPU()) for b in cache.layers)
        return [torch.from_dlpack(b)[:, :, :cache.length] for b in on_host]

    def cache_from_tensors(self, tensors: list[Tensor], spare_rows: int = 0) -> MaxKVCache:
        """A cache holding these [B, kv_heads, P, hd] tensors (copied): an in-place one with room to grow
        on the CPU (cache_headroom positions, and `spare_rows` rows for `append_rows`), else buffers of
        exactly their size."""
        length = int(tensors[0].shape[2])
        if self.in_place:
            capacity = length + self.cache_headroom
            rows = int(tensors[0].shape[0])
            # Untouched memory costs nothing: empty() maps pages only when a row is written.
            host = [torch.empty(rows + spare_rows, t.shape[1], capacity, t.shape[3], dtype=t.dtype)
                    for t in tensors]
            for room, t in zip(host, tensors, strict=True):
                room[:rows, :, :length] = t
            cache = self._rows_view(MaxKVCache([], length, host), rows)
        else:
            host = [t.contiguous() for t in tensors]  # the buffers may borrow this memory
            cache = MaxKVCache([Buffer.from_dlpack(t).to(self.max_device) for t in host], length, host)
        cache.written[0] = length
        return cache

    def keep_rows(self, cache: MaxKVCache, order: list[int]) -> MaxKVCache | None:
        """The cache of rows `order` (new row j = old row order[j]), moved within the buffers in place; None
        where the cache is not an in-place one. In place needs each row to stay (order[j] == j) or to come
        from past the new end (order[j] >= len(order)), so that no row is overwritten before it is read:
        the engine fills the gaps a leaving request makes with the last rows, one row's copy each, where
        a fresh cache would copy every row."""
        if not self._is_in_place(cache):
            return None
        if any(src != j and src < len(order) for j, src in enumerate(order)):
            raise ValueError(f"keep_rows moves rows only from past the new end into gaps, got {order}")
        for j, src in enumerate(order):
            if src != j:
                for store in cache.host:
                    store[j, :, :cache.length] = store[src, :, :cache.length]
        return self._rows_view(cache, len(order))

    def append_rows(self, cache: MaxKVCache, other: MaxKVCache, rows: list[int]) -> MaxKVCache | None:
        """The cache with `other`'s `rows` added after its own, written into its spare rows in place (their
        shorter past left-padded with zeros, which the attention mask hides); None where it has no spare
        rows or `other` has the longer past."""
        start = int(cache.layers[0].shape[0])
        end = start + len(rows)
        if not self._is_in_place(cache) or other.length > cache.length or cache.host[0].shape[0] < end:
            return None
        pad = cache.length - other.length
        index = torch.tensor(rows, dtype=torch.long)
        for store, t in zip(cache.host, self.cache_tensors(other), strict=True):
            store[start:end, :, :pad] = 0
            store[start:end, :, pad:cache.length] = t[index]
        return self._rows_view(cache, end)

    def _is_in_place(self, cache: MaxKVCache) -> bool:
        """Whether the cache's buffers are views of its host tensors (on the CPU every cache but a
        prefill's, which the graph returned)."""
        return self.in_place and cache.host is not None

    @staticmethod
    def _rows_view(cache: MaxKVCache, rows: int) -> MaxKVCache:
        """The cache's first `rows` rows: buffers over the same host memory (a leading slice stays
        contiguous), sharing `written`."""
        return MaxKVCache([Buffer.from_dlpack(store[:rows]) for store in cache.host], cache.length,
                          cache.host, cache.written)

    def _with_room(self, cache: MaxKVCache, new_tokens: int) -> MaxKVCache:
        """The cache itself when it has room for new_tokens more (only in-place caches have spare capacity),
        else an in-place copy with cache_headroom to spare (a copy every cache_headroom steps costs far less
        than one per step), keeping its spare rows."""
        if cache.capacity >= cache.length + new_tokens:
            return cache
        spare = cache.host[0].shape[0] - cache.layers[0].shape[0] if cache.host is not None else 0
        return self.cache_from_tensors(self.cache_tensors(cache), spare_rows=spare)

    def _to_device(self, t: Tensor) -> Buffer | Tensor:
        t = t.to("cpu", torch.int64).contiguous()
        return t if self.max_device == CPU() else Buffer.from_dlpack(np.asarray(t)).to(self.max_device)
