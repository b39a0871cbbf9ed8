"""The SpeechLM (a stock transformers LlamaForCausalLM) as a Modular MAX graph, with an explicit KV cache.

    input_ids [B, T], attention_mask [B, P+T], position_ids [B, T], past K/V per layer [B, kv_heads, P, hd]
    ─► embed ─► L x (RMSNorm ─► GQA attention with RoPE over past+new ─► RMSNorm ─► SwiGLU) ─► last position
    ─► RMSNorm ─► lm_head ─► logits [B, vocab] (float32), K/V per layer [B, kv_heads, P+T, hd]

B, T and P are dynamic dims, so ONE compiled graph serves prefill (P = 0: MAX accepts size-0 buffers) and
single-token decode at any batch size. `MaxSpeechLM` wraps it so that it stands in for the Hugging Face model
inside `voxlm.speechlm.generate.stream_codes` / `generate_codes`, unchanged: it takes the same keyword
arguments, treats the sampler's initial empty DynamicCache as "no past", and hands back its own
`MaxKVCache`, whose K/V stay MAX buffers between steps (only ids, mask, positions go in and the last
position's logits come out).

Why plain max.graph ops rather than MAX's llama3 pipeline and its paged KV cache: the sampler needs an
HF-shaped call (left padding expressed by an attention mask, per-row positions, a cache object it passes
back), which the paged-cache machinery does not offer; and a ~60-line forward that reads like the HF one is
easy to check against it. The cost is that every step concatenates past and new K/V (a copy of the cache),
which for this model's sizes (a few MB) is small next to the matmuls on CPU.

Pitfalls met while writing it (MAX 26.7, CPU):
- a causal mask built from `ops.range`/`cumsum` index comparisons, then broadcast against the padding mask,
  came out wrong (the fused elementwise kernel lost the query axis); `band_part` + `concat` is right;
- -inf in the additive mask turns a fully masked row (a left-padding query) into NaN, which then leaks into
  real rows through 0 * NaN in the attention-weighted sum: masked scores get a large finite negative instead;
- `x @ w.T` on HF's [out, in] weights re-transposed every weight on every call: they are stored [in, out].
Checked on CPU in float32 (tests/test_export_speechlm.py); device="gpu" / bfloat16 are wired but untested.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import CompiledModel, InferenceSession, Model
from max.graph import DeviceRef, Dim, Graph, TensorType, TensorValue, Weight, ops
from torch import Tensor
from transformers import LlamaConfig, PreTrainedModel

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

def build_graph(shape: LlamaShape, dtype: DType = DType.float32, device: DeviceRef | None = None) -> Graph:
    """The Llama forward over a KV cache; weights named as in the HF state_dict, projections stored
    transposed (see `weight_registry`), so one compiled graph serves any weights of this shape."""
    device = device or DeviceRef.CPU()
    s = shape
    kv_type = TensorType(dtype, ["batch", s.num_kv_heads, "past", s.head_dim], device=device)
    input_types = [TensorType(DType.int64, ["batch", "new"], device=device),     # input_ids
                   TensorType(DType.int64, ["batch", "total"], device=device),   # attention_mask
                   TensorType(DType.int64, ["batch", "new"], device=device)]     # position_ids
    input_types += [kv_type] * (2 * s.num_layers)                                # past K, V of each layer
    key = hashlib.sha1(repr((s, dtype, device)).encode()).hexdigest()[:12]

    def weight(name: str, *dims: int) -> TensorValue:
        return graph.add_weight(Weight(name, dtype, list(dims), device=device))

    def proj(name: str, d_in: int, d_out: int) -> TensorValue:
        return weight(name, d_in, d_out)  # HF's [out, in], transposed by `weight_registry`

    with Graph(f"speechlm_{key}", input_types=input_types) as graph:
        ids, attention_mask, position_ids, *past = (value.tensor for value in graph.inputs)
        B, T = ids.shape
        P = past[0].shape[2]
        attention_mask = ops.rebind(attention_mask, [B, P + T], message="attention_mask must be [B, P+T]")
        bias = attention_bias(attention_mask, T, P, dtype, device)
        cos, sin = rope_tables(position_ids, s.head_dim, s.rope_theta, dtype, device)

        embed = weight("model.embed_tokens.weight", s.vocab_size, s.hidden_size)
        x = ops.gather(embed, ids, axis=0)                                        # [B, T, H]
        new_cache = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            h = ops.rms_norm(x, weight(p + "input_layernorm.weight", s.hidden_size), s.rms_norm_eps)
            # Q, K and V in one matmul (and gate and up below): at decode's one token per row, a step is
            # a chain of small matmuls whose count, more than their size, sets the latency.
            q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            qkv = h @ proj(p + "self_attn.qkv_proj.weight", s.hidden_size, q_dim + 2 * kv_dim)
            q, k, v = qkv[..., :q_dim], qkv[..., q_dim: q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
            q = rotate(heads(q, s.num_heads, s.head_dim), cos, sin)             # [B, heads, T, hd]
            k = ops.concat([past[2 * i], rotate(heads(k, s.num_kv_heads, s.head_dim), cos, sin)], axis=2)
            v = ops.concat([past[2 * i + 1], heads(v, s.num_kv_heads, s.head_dim)], axis=2)
            new_cache += [k, v]                                                   # [B, kv_heads, P+T, hd]
            y = attention(q, k, v, bias, s.num_kv_heads)                          # [B, T, heads * hd]
            x = x + y @ proj(p + "self_attn.o_proj.weight", s.num_heads * s.head_dim, s.hidden_size)
            h = ops.rms_norm(x, weight(p + "post_attention_layernorm.weight", s.hidden_size), s.rms_norm_eps)
            gate_up = h @ proj(p + "mlp.gate_up_proj.weight", s.hidden_size, 2 * s.intermediate_size)
            gate, up = gate_up[..., : s.intermediate_size], gate_up[..., s.intermediate_size:]
            down = proj(p + "mlp.down_proj.weight", s.intermediate_size, s.hidden_size)
            x = x + (ops.silu(gate) * up) @ down

        # Only the last position's logits are used (the sampler asks for logits_to_keep=1): left padding puts
        # every row's newest token there, and skipping the others saves most of a prefill's output layer.
        last = ops.rms_norm(x[:, -1], weight("model.norm.weight", s.hidden_size), s.rms_norm_eps)
        # lm_head is its own weight even when tied (the registry then binds the embedding to it): one graph
        # then serves tied and untied models alike.
        head = proj("lm_head.weight", s.hidden_size, s.vocab_size)
        graph.output((last @ head).cast(DType.float32), *new_cache)
    return graph


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


def rotate(x: TensorValue, cos: TensorValue, sin: TensorValue) -> TensorValue:
    """RoPE in HF's rotate_half layout (the two halves of a head, not interleaved pairs)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + ops.concat([-x2, x1], axis=-1) * sin


def attention_bias(attention_mask: TensorValue, T: Dim, P: Dim, dtype: DType,
                   device: DeviceRef) -> TensorValue:
    """Additive scores [B, 1, 1, T, P+T]: MASKED where the key is left padding or in the query's future.

    The new tokens sit at indices P..P+T-1, after every past key, so causality only cuts within them:
    a [T, T] strict upper triangle, next to [T, P] zeros for the past."""
    masked = ops.constant(MASKED, dtype, device=device)
    future = ops.band_part(ops.broadcast_to(masked, [T, T]), num_lower=None, num_upper=0, exclude=True)
    causal = ops.concat([ops.broadcast_to(ops.constant(0.0, dtype, device=device), [T, P]), future], axis=1)
    padding = (1 - attention_mask.cast(dtype)) * masked                         # [B, P+T]
    B = attention_mask.shape[0]
    return causal.reshape([1, 1, 1, T, P + T]) + padding.reshape([B, 1, 1, 1, P + T])


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
    ref = device_ref(device)
    return compile_once(("speechlm", shape, dtype), device, lambda: build_graph(shape, DTYPES[dtype][0], ref))


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
    """Each layer's K and V, [B, kv_heads, P, hd] MAX buffers, as the graph returned them."""

    layers: list[Buffer]  # K0, V0, K1, V1, ...

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[0].shape[2])


@dataclass
class MaxLMOutput:
    logits: Tensor       # [B, 1, vocab] float32 on the host: the last position's
    cache: MaxKVCache


class MaxSpeechLM:
    """The SpeechLM running on MAX, called like the HF model by `stream_codes` / `generate_codes`.

    `device` (the torch device the sampler keeps its tensors on) is always the host: logits come back to it
    each step, while the KV cache stays on the MAX device.
    """

    def __init__(self, config: LlamaConfig, state_dict: Mapping[str, Tensor], device: str = "cpu",
                 dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.config = config
        self.shape = LlamaShape.from_config(config)
        self.max_device = max_device(device)
        self.dtype = dtype
        self.device = torch.device("cpu")
        session, compiled = compiled_graph(self.shape, dtype, device)
        # Kept alive on self: the MAX model borrows these tensors' memory rather than copying it.
        self._weights = weight_registry(state_dict, self.shape, dtype, config.tie_word_embeddings)
        self.model: Model = session.init(compiled, weights_registry=self._weights)

    @classmethod
    def from_pretrained(cls, folder_or_model: str | Path | PreTrainedModel, device: str = "cpu",
                        dtype: str = "float32") -> MaxSpeechLM:
        """From an HF LlamaForCausalLM in memory, or a save_pretrained folder (or a run folder with hf/)."""
        if isinstance(folder_or_model, PreTrainedModel):
            return cls(folder_or_model.config, folder_or_model.state_dict(), device, dtype)
        from voxlm.speechlm.model import speechlm_folder

        folder = speechlm_folder(folder_or_model)
        return cls(LlamaConfig.from_pretrained(str(folder)), load_state_dict(folder), device, dtype)

    def empty_cache(self, batch: int) -> MaxKVCache:
        """P = 0: size-0 buffers, so prefill runs through the same graph as decode."""
        s = self.shape
        empty = torch.zeros(batch, s.num_kv_heads, 0, s.head_dim, dtype=DTYPES[self.dtype][1])
        return MaxKVCache([Buffer.from_dlpack(empty).to(self.max_device) for _ in range(2 * s.num_layers)])

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                 cache: Any = None, use_cache: bool = True, logits_to_keep: int = 1, **_: Any) -> MaxLMOutput:
        """One forward over the new tokens input_ids [B, T]; attention_mask [B, P+T] covers past and new."""
        if logits_to_keep != 1:
            raise ValueError("the MAX graph computes the last position's logits only (logits_to_keep=1)")
        if not isinstance(cache, MaxKVCache):
            # The sampler's first call hands an empty DynamicCache: no past.
            if cache is not None and cache.get_seq_length() != 0:
                raise ValueError("a non-empty HF cache cannot be continued on MAX; start from an empty one")
            cache = self.empty_cache(len(input_ids))
        inputs = [self._to_device(t) for t in (input_ids, attention_mask, position_ids)]
        logits, *layers = self.model.execute(*inputs, *cache.layers)
        logits = torch.from_dlpack(logits.to(CPU()) if self.max_device != CPU() else logits)
        return MaxLMOutput(logits[:, None], MaxKVCache(layers))

    def _to_device(self, t: Tensor) -> Buffer | Tensor:
        t = t.to("cpu", torch.int64).contiguous()
        return t if self.max_device == CPU() else Buffer.from_dlpack(np.asarray(t)).to(self.max_device)
