"""What the parity gate should measure for a float32 SpeechLM export on an NVIDIA GPU, without a GPU:

    python scripts/emulate_gpu_float32.py [experiment=quickstart] [sources.speechlm=runs/sft/quickstart]
                                          [parity.report=<dir>]

MAX's float32 matmuls on an H200 (MAX 26.7) read only the top 10 mantissa bits of their inputs, as TF32
tensor cores do, from 2 rows on; one row and the batched attention matmuls stay exact
(scripts/check_max_ops.py, docs/benchmarks.md). Truncating both inputs of a float32 product to 10 mantissa
bits reproduces that visit's measured errors on its own patterns (8.5e-4 and 8.8e-4 of the largest
|product| against 9.0e-4 and 8.5e-4; rounding to nearest instead gives 3.8e-4 and 3.5e-4), which this
script prints first.

The SpeechLM is then run twice in PyTorch: as trained, and with every nn.Linear of 2 rows or more rounded so
(the projections, the SwiGLU block, lm_head: the graph's 2-D matmuls). The gate's own SpeechLM checks
(voxlm.export.parity.speechlm_checks: logits at prefill and over decode steps, 200 greedy tokens per row) on
its own real prompts compare the two, against configs/export.yaml's thresholds for device=gpu dtype=float32.
It is a prediction for setting those thresholds; the GPU's export (`bash scripts/device_checks.sh
export-f32`) is the measurement. The codec's checks need no emulation: the H200 measured its float32
graphs (every export's codec is float32).
"""

from __future__ import annotations

import copy

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict

from voxlm.codec.module import load_codec
from voxlm.export import parity
from voxlm.export.build import gate_cases, gate_thresholds, source_folders, write_report
from voxlm.speechlm.model import load_speechlm

MANTISSA_BITS_DROPPED = 23 - 10
# The H200's measurement (check_max_ops, float32, largest error over the largest |product|, M = 1...500).
H200_MATMUL_ERRORS = {(256, 512): 9.0e-4, (1536, 1536): 8.5e-4}


def truncate_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 with the low 13 mantissa bits cleared: sign, exponent and the top 10 bits kept."""
    bits = t.float().contiguous().view(torch.int32)
    return (bits & ~((1 << MANTISSA_BITS_DROPPED) - 1)).view(torch.float32)


def matmul_error(k: int, n: int, generator: torch.Generator) -> float:
    """check_max_ops' float32 matmul case with truncated inputs: its error measure, worst over its rows."""
    worst = 0.0
    for m in (2, 4, 8, 9, 16, 17, 32, 64, 128, 256, 500):
        x, w = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator) * 0.02
        want = x.double() @ w.double()
        got = (truncate_to_tf32(x) @ truncate_to_tf32(w)).double()
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def with_gpu_matmul_rounding(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model whose nn.Linear layers round as MAX's float32 GPU matmuls do (2 rows or more)."""
    rounded = copy.deepcopy(model)
    for module in rounded.modules():
        if isinstance(module, torch.nn.Linear):
            def forward(x: torch.Tensor, layer: torch.nn.Linear = module) -> torch.Tensor:
                if x.numel() // x.shape[-1] < 2:
                    return F.linear(x, layer.weight, layer.bias)
                return F.linear(truncate_to_tf32(x), truncate_to_tf32(layer.weight), layer.bias)
            module.forward = forward
    return rounded


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    generator = torch.Generator().manual_seed(0)
    for (k, n), measured in H200_MATMUL_ERRORS.items():
        print(f"x [M,{k}] @ w [{k},{n}], truncated to 10 mantissa bits: {matmul_error(k, n, generator):.1e} "
              f"(H200: {measured:.1e})")

    with open_dict(cfg):
        cfg.device, cfg.dtype = "gpu", "float32"
    speechlm_dir, codec_dir = source_folders(cfg)
    codec = load_codec(codec_dir).eval()
    torch_model, tok = load_speechlm(speechlm_dir, codec.codebook_size, "cpu", "float32",
                                     codec_id=codec.code_fingerprint())
    _, prompts = gate_cases(cfg, tok, codec)
    checks = parity.speechlm_checks(torch_model, with_gpu_matmul_rounding(torch_model), tok, prompts,
                                    gate_thresholds(cfg), int(cfg.parity.decode_steps),
                                    int(cfg.parity.greedy_tokens))
    title = f"Emulated: {speechlm_dir} with MAX's float32 GPU matmul rounding against PyTorch float32"
    print(parity.report_markdown(checks, title))
    write_report(cfg.parity.get("report"), checks, title, complete=False)


if __name__ == "__main__":
    main()
