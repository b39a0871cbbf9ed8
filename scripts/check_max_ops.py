"""Does MAX compute right on this device? Each op of the SpeechLM graph, per row count, against float64.

The bf16 SpeechLM graph computed wrong logits on an H200 (max-abs 10.6), while the same graph in bf16 on
the CPU, the GPU's graph compiled for the CPU, and the codec's float32 graphs on the H200 were right
(docs/benchmarks.md). modular/modular#6883 reports bf16 `ops.matmul` wrong past 8 rows on an H100, first
seen as rms_norm going wrong after a SwiGLU block. This checks, in one compiled graph with a dynamic row
count M, each pattern the SpeechLM graph runs against float64 of the same (dtype-rounded) inputs:

    matmuls     x [M, K] @ w [K, N] (the projections, [in, out]); x @ w[N, K].T (MAX's Linear layout);
                attention's p [1, 2, M, M] @ v and q @ k^T (batched); K, N of the quickstart model
                (256 -> 512) and of the issue (1536)
    layer ops   the graph's own functions (voxlm.export.speechlm) on [2, M, 256] activations of the
                quickstart shape: the embedding gather, rms_norm, the SwiGLU block (`mlp`), rms_norm after
                the SwiGLU block's residual (#6883's chain), RoPE (`rope_tables` + `rotate`: slices on a GPU,
                a permutation matmul on the CPU), and the attention block (`fused_qkv`, `rotate`,
                the host's `attention_bias`, `attention`, o_proj) with its residual

each in bfloat16 and float32.

    python scripts/check_max_ops.py --device gpu --out $OUT/ops.json

Per case and M: the largest error over the largest |reference| (right up to rounding: ~3e-3 for a bf16
product, more where bf16 rounds in between) and the first row along M whose error exceeds 10x the dtype's
bound (a wrong row is off by its own size). Exit status 1 if any case is wrong. On an H200 with MAX 26.7
(2026-11-28, docs/benchmarks.md; the matmul cases only, measured before the layer ops were added) every
matmul is right at every M: bf16 within 3.4e-3, float32 within 9e-4 (TF32-like rounding from M = 2; M = 1
is exact).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from max.driver import CPU, Accelerator, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, TensorValue, ops
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from voxlm.export.kernels import cached_attention_reference
from voxlm.export.speechlm import (
    LlamaShape,
    attention,
    attention_bias,
    fused_qkv,
    heads,
    mlp,
    rope_tables,
    rotate,
)

ROWS = (1, 2, 4, 8, 9, 16, 17, 32, 64, 128, 256, 500)
SIZES = ((256, 512), (1536, 1536))
HEAD_DIM = 64
SHAPE = LlamaShape(vocab_size=1522, hidden_size=256, intermediate_size=768, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=HEAD_DIM, rope_theta=10000.0, rms_norm_eps=1e-5)
BOUND = {"bfloat16": 2e-2, "float32": 1e-3}   # relative error of a right result, rounding included
DTYPES = {"bfloat16": (DType.bfloat16, torch.bfloat16), "float32": (DType.float32, torch.float32)}
LAYER_CASES = ("gather", "rms_norm", "swiglu block", "rms_norm after swiglu residual", "rope",
               "attention block")


def weight_shapes() -> dict[str, list[int]]:
    """The layer ops' weights, named as `fused_qkv` and `mlp` ask for them (prefix "")."""
    s = SHAPE
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    return {"model.embed_tokens.weight": [s.vocab_size, s.hidden_size],
            "input_layernorm.weight": [s.hidden_size],
            "self_attn.qkv_proj.weight": [s.hidden_size, qkv],
            "self_attn.o_proj.weight": [s.num_heads * s.head_dim, s.hidden_size],
            "post_attention_layernorm.weight": [s.hidden_size],
            "mlp.gate_up_proj.weight": [s.hidden_size, 2 * s.intermediate_size],
            "mlp.down_proj.weight": [s.intermediate_size, s.hidden_size],
            "final_norm.weight": [s.hidden_size]}


def case_names() -> list[str]:
    names = []
    for dtype in DTYPES:
        for k, n in SIZES:
            names += [f"{dtype} x@w [M,{k}]x[{k},{n}]", f"{dtype} x@w.T [M,{k}]x[{n},{k}].T"]
        names += [f"{dtype} batched p@v [1,2,M,M]x[1,2,M,{HEAD_DIM}]",
                  f"{dtype} batched q@k^T [1,2,M,{HEAD_DIM}]x[1,2,{HEAD_DIM},M]"]
        names += [f"{dtype} {case} [2,M,{SHAPE.hidden_size}]" for case in LAYER_CASES]
    return names


def build(device: DeviceRef) -> Graph:
    """One graph; float inputs come as float32 and are cast inside, per dtype."""
    inputs = []
    for k, n in SIZES:
        inputs += [TensorType(DType.float32, ["m", k], device), TensorType(DType.float32, [k, n], device),
                   TensorType(DType.float32, [n, k], device)]
    inputs += [TensorType(DType.float32, [1, 2, "m", "m"], device)]
    inputs += [TensorType(DType.float32, [1, 2, "m", HEAD_DIM], device)] * 3
    inputs += [TensorType(DType.float32, [2, "m", SHAPE.hidden_size], device),   # activations
               TensorType(DType.int64, [2, "m"], device),                         # token ids
               TensorType(DType.int64, [2, "m"], device),                         # positions
               TensorType(DType.float32, [2, 1, 1, "m", "m"], device)]            # attention bias
    inputs += [TensorType(DType.float32, dims, device) for dims in weight_shapes().values()]
    with Graph("ops_check", input_types=inputs) as graph:
        values = [value.tensor for value in graph.inputs]
        n_matmul = 3 * len(SIZES) + 4
        ids, positions, bias = values[n_matmul + 1: n_matmul + 4]
        outputs = []
        for max_dtype, _ in DTYPES.values():
            cast = [value.cast(max_dtype) for value in values[:n_matmul + 1]]
            for i in range(len(SIZES)):
                x, w, w_t = cast[3 * i: 3 * i + 3]
                outputs += [x @ w, x @ w_t.T]
            p, v, q, k = cast[3 * len(SIZES): n_matmul]
            outputs += [p @ v, q @ k.transpose(2, 3)]
            weights = {name: value.cast(max_dtype)
                       for name, value in zip(weight_shapes(), values[n_matmul + 4:], strict=True)}
            outputs += layer_ops(cast[n_matmul], ids, positions, bias.cast(max_dtype), weights, max_dtype,
                                 device)
        graph.output(*[output.cast(DType.float32) for output in outputs])
    return graph


def layer_ops(x: TensorValue, ids: TensorValue, positions: TensorValue, bias: TensorValue,
              weights: dict[str, TensorValue], dtype: DType, device: DeviceRef) -> list[TensorValue]:
    """The graph's functions on x [2, M, hidden], in the order of LAYER_CASES."""
    s = SHAPE

    def weight(name: str, *dims: int) -> TensorValue:
        return weights[name]

    B, T = x.shape[0], x.shape[1]
    embedded = ops.gather(weights["model.embed_tokens.weight"], ids, axis=0)
    normed = ops.rms_norm(x, weights["input_layernorm.weight"], s.rms_norm_eps)
    swiglu = mlp(x, weight, "", s)
    chained = ops.rms_norm(x + swiglu, weights["final_norm.weight"], s.rms_norm_eps)
    cos, sin = rope_tables(positions, s.head_dim, s.rope_theta, dtype, device)
    roped = rotate(heads(x, s.num_heads, s.head_dim), cos, sin).transpose(1, 2).reshape([B, T, s.hidden_size])
    qkv = fused_qkv(x, weight, "", s)
    q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    q = rotate(heads(qkv[..., :q_dim], s.num_heads, s.head_dim), cos, sin)
    k = rotate(heads(qkv[..., q_dim: q_dim + kv_dim], s.num_kv_heads, s.head_dim), cos, sin)
    v = heads(qkv[..., q_dim + kv_dim:], s.num_kv_heads, s.head_dim)
    attended = x + attention(q, k, v, bias, s.num_kv_heads) @ weights["self_attn.o_proj.weight"]
    return [embedded, normed, swiglu, chained, roped, attended]


def inputs_for(m: int, generator: torch.Generator) -> list[torch.Tensor]:
    tensors = []
    for k, n in SIZES:
        w = torch.randn(k, n, generator=generator) * 0.02
        tensors += [torch.randn(m, k, generator=generator), w, w.T.contiguous()]
    tensors += [torch.softmax(torch.randn(1, 2, m, m, generator=generator) * 3, dim=-1)]
    tensors += [torch.randn(1, 2, m, HEAD_DIM, generator=generator) for _ in range(3)]
    tensors += [torch.randn(2, m, SHAPE.hidden_size, generator=generator),
                torch.randint(0, SHAPE.vocab_size, (2, m), generator=generator),
                torch.arange(m).repeat(2, 1) + torch.tensor([[0], [7]]),   # the second row further on
                torch.from_numpy(attention_bias(torch.ones(2, m, dtype=torch.int64), m))]
    for name, dims in weight_shapes().items():
        if name.endswith("norm.weight"):
            tensors.append(1 + 0.1 * torch.randn(dims, generator=generator))
        else:
            tensors.append(torch.randn(dims, generator=generator) / math.sqrt(dims[0]))
    return tensors


def references(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """float64 results from the inputs rounded to each dtype, as the graph sees them."""
    out = []
    n_matmul = 3 * len(SIZES) + 4
    for _, torch_dtype in DTYPES.values():
        r = [t if not t.is_floating_point() else t.to(torch_dtype).double() for t in tensors]
        for i in range(len(SIZES)):
            x, w, w_t = r[3 * i: 3 * i + 3]
            out += [x @ w, x @ w_t.T]
        p, v, q, k = r[3 * len(SIZES): n_matmul]
        out += [p @ v, q @ k.transpose(2, 3)]
        out += layer_references(*r[n_matmul: n_matmul + 3], dict(zip(weight_shapes(), r[n_matmul + 4:],
                                                                   strict=True)))
    return out


def layer_references(x: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                     w: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What `layer_ops` computes, in float64 (RoPE by transformers' own apply_rotary_pos_emb, attention by
    the Mojo op's reference, `cached_attention_reference`, with no past)."""
    s = SHAPE

    def rms_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + s.rms_norm_eps) * weight

    def split_heads(h: torch.Tensor, n: int) -> torch.Tensor:
        return h.reshape(*h.shape[:2], n, s.head_dim).transpose(1, 2)

    B, T, _ = x.shape
    gate, up = (rms_norm(x, w["post_attention_layernorm.weight"]) @ w["mlp.gate_up_proj.weight"]).chunk(2, -1)
    swiglu = (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"]
    inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2).double() / s.head_dim))
    angles = positions.double()[..., None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    roped, _ = apply_rotary_pos_emb(split_heads(x, s.num_heads), split_heads(x, s.num_heads), cos, sin)
    qkv = rms_norm(x, w["input_layernorm.weight"]) @ w["self_attn.qkv_proj.weight"]
    no_past = torch.zeros(B, s.num_kv_heads, 0, s.head_dim, dtype=x.dtype)
    y, _, _ = cached_attention_reference(qkv, cos, sin, torch.ones(B, T), no_past, no_past, s.num_heads,
                                         s.num_kv_heads)
    return [w["model.embed_tokens.weight"][ids], rms_norm(x, w["input_layernorm.weight"]), swiglu,
            rms_norm(x + swiglu, w["final_norm.weight"]), roped.transpose(1, 2).reshape(B, T, -1),
            x + y @ w["self_attn.o_proj.weight"]]


def error(got: torch.Tensor, want: torch.Tensor, bound: float) -> tuple[float, int | None]:
    """(max |got - want| / max |want|, the first row along M (the second-to-last axis) with an error over
    10 x bound, or None)."""
    scale = float(want.abs().max())
    diff = (got.double() - want).abs() / scale
    rows = diff.reshape(-1, *diff.shape[-2:]).amax(dim=(0, 2)) if diff.dim() > 2 else diff.amax(dim=1)
    bad = torch.nonzero(rows > 10 * bound).flatten()
    return float(diff.max()), (int(bad[0]) if len(bad) else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--rows", type=int, nargs="*", default=list(ROWS))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (+ .md)")
    args = parser.parse_args()

    device = CPU() if args.device == "cpu" else Accelerator()
    ref = DeviceRef.CPU() if args.device == "cpu" else DeviceRef.GPU()
    session = InferenceSession(devices=[device])
    started = time.perf_counter()
    model = session.load(build(ref))
    compile_s = time.perf_counter() - started
    print(f"compiled in {compile_s:.1f} s on {args.device}", flush=True)

    names, generator = case_names(), torch.Generator().manual_seed(0)
    results = {name: {} for name in names}
    for m in args.rows:
        tensors = inputs_for(m, generator)
        outputs = model.execute(*[Buffer.from_dlpack(t.numpy()).to(device) for t in tensors])
        for name, got, want in zip(names, outputs, references(tensors), strict=True):
            got = torch.from_numpy(np.asarray(got.to(CPU()).to_numpy()))
            rel, first_bad = error(got, want, BOUND[name.split()[0]])
            results[name][m] = {"rel_error": rel, "first_bad_row": first_bad}

    wrong = {name: [m for m, r in by_m.items() if r["first_bad_row"] is not None]
             for name, by_m in results.items()}
    lines = [f"| case | {' | '.join(f'M={m}' for m in args.rows)} |", "|---" * (len(args.rows) + 1) + "|"]
    for name, by_m in results.items():
        cells = [f"{r['rel_error']:.1e}" + ("" if r["first_bad_row"] is None
                                            else f" (row {r['first_bad_row']})") for r in by_m.values()]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(table)
    print("wrong:", {name: ms for name, ms in wrong.items() if ms} or "none")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": args.device, "compile_s": compile_s, "bound": BOUND, "results": results,
                  "wrong": wrong}
        if args.device == "gpu" and torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")
    return 1 if any(wrong.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
