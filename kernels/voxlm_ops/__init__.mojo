# voxlm_ops: Mojo custom ops for voxlm's serving path, loaded into MAX graphs by
# voxlm.export.kernels (Graph(..., custom_extensions=[<this folder>]) + ops.custom).
#
#   voxlm_silence_trim  frame RMS in dBFS + trim points of the voiced region (streaming server)
#   voxlm_code_sampler  fused code-block sampler over SpeechLM logits (decode hot path)
#   voxlm_cached_attention  RoPE + in-place KV-cache append + GQA attention (the SpeechLM's decode graph)
#
# All ops run on the CPU (`target` is "cpu"); NumPy references with the same semantics live in
# src/export/kernels.py and the parity tests in tests/test_kernels.py.
from .silence import SilenceTrim
from .sampler import CodeSampler
from .attention import CachedAttention
