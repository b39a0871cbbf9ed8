"""Does MAX multiply right on this device? The matmul patterns of the SpeechLM graph, per row count.

The bf16 SpeechLM graph computed wrong logits on an H200 while the same graph in bf16 on the CPU, and the
codec's float32 graphs on the H200, were right (docs/benchmarks.md). modular/modular#6883 reports plain
bf16 `ops.matmul` wrong past 8 rows on an H100. This checks each pattern the graph uses, in one compiled
graph with a dynamic row count M, against float64 products of the same (dtype-rounded) inputs:

    x [M, K] @ w [K, N]        the projections, as the graph holds them ([in, out])
    x [M, K] @ w[N, K].T       HF's [out, in] layout, multiplied as MAX's own Linear does (transposed b)
    p [1, 2, M, M] @ v [1, 2, M, D]     attention's weights times V (batched)
    q [1, 2, M, D] @ k^T                attention's scores (batched, transposed b)

each in bfloat16 and float32, for K, N of the quickstart model (256 -> 512) and of the issue (1536).

    python scripts/check_max_matmul.py --device gpu --out $OUT/matmul.json

Per case and M: the largest error over the largest |reference| (a product right up to rounding stays
below ~2e-2 in bf16, 1.7e-2 on the CPU for q@k^T; ~1e-3 in float32 with TF32) and the first row whose
error exceeds 10x that bound.
Exit status 1 if any case is wrong. On an H200 with MAX 26.7 (2026-11-28, docs/benchmarks.md) every case is
right at every M: bf16 within 3.4e-3, float32 within 9e-4 (TF32-like rounding from M = 2; M = 1 is exact).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from max.driver import CPU, Accelerator, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

ROWS = (1, 2, 4, 8, 9, 16, 17, 32, 64, 128, 256, 500)
SIZES = ((256, 512), (1536, 1536))
HEAD_DIM = 64
BOUND = {"bfloat16": 2e-2, "float32": 1e-3}   # relative error of a right product, rounding included
DTYPES = {"bfloat16": (DType.bfloat16, torch.bfloat16), "float32": (DType.float32, torch.float32)}


def case_names() -> list[str]:
    names = []
    for dtype in DTYPES:
        for k, n in SIZES:
            names += [f"{dtype} x@w [M,{k}]x[{k},{n}]", f"{dtype} x@w.T [M,{k}]x[{n},{k}].T"]
        names += [f"{dtype} batched p@v [1,2,M,M]x[1,2,M,{HEAD_DIM}]",
                  f"{dtype} batched q@k^T [1,2,M,{HEAD_DIM}]x[1,2,{HEAD_DIM},M]"]
    return names


def build(device: DeviceRef) -> Graph:
    """One graph, float32 inputs (cast inside): per dtype, per size x and w and w.T, then p, v, q, k."""
    inputs = []
    for k, n in SIZES:
        inputs += [TensorType(DType.float32, ["m", k], device), TensorType(DType.float32, [k, n], device),
                   TensorType(DType.float32, [n, k], device)]
    inputs += [TensorType(DType.float32, [1, 2, "m", "m"], device)]
    inputs += [TensorType(DType.float32, [1, 2, "m", HEAD_DIM], device)] * 3
    with Graph("matmul_check", input_types=inputs) as graph:
        values = [value.tensor for value in graph.inputs]
        outputs = []
        for max_dtype, _ in DTYPES.values():
            cast = [value.cast(max_dtype) for value in values]
            for i in range(len(SIZES)):
                x, w, w_t = cast[3 * i: 3 * i + 3]
                outputs += [(x @ w).cast(DType.float32), (x @ w_t.T).cast(DType.float32)]
            p, v, q, k = cast[3 * len(SIZES):]
            outputs += [(p @ v).cast(DType.float32), (q @ k.transpose(2, 3)).cast(DType.float32)]
        graph.output(*outputs)
    return graph


def inputs_for(m: int, generator: torch.Generator) -> list[torch.Tensor]:
    tensors = []
    for k, n in SIZES:
        w = torch.randn(k, n, generator=generator) * 0.02
        tensors += [torch.randn(m, k, generator=generator), w, w.T.contiguous()]
    tensors += [torch.softmax(torch.randn(1, 2, m, m, generator=generator) * 3, dim=-1)]
    tensors += [torch.randn(1, 2, m, HEAD_DIM, generator=generator) for _ in range(3)]
    return tensors


def references(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """float64 products of the inputs rounded to each dtype, as the graph sees them."""
    out = []
    for _, torch_dtype in DTYPES.values():
        r = [t.to(torch_dtype).double() for t in tensors]
        for i in range(len(SIZES)):
            x, w, w_t = r[3 * i: 3 * i + 3]
            out += [x @ w, x @ w_t.T]
        p, v, q, k = r[3 * len(SIZES):]
        out += [p @ v, q @ k.transpose(2, 3)]
    return out


def error(got: torch.Tensor, want: torch.Tensor, bound: float) -> tuple[float, int | None]:
    """(max |got - want| / max |want|, the first row (along M) with an error over 10 x bound, or None)."""
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
