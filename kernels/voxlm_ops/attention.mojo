# Cached attention for the SpeechLM's decode steps: RoPE, append to a preallocated KV cache in place,
# grouped-query attention over the cache. One op per layer replaces the graph's ~20 (head reshapes,
# rotate-half, two concats that copy the whole cache, two matmuls, mask, softmax), and the cache is read
# once per step instead of copied.
#
#   qkv   [B, T, (H + 2 KV) * D]  the layer's fused Q|K|V projection (HF order: heads, then head dims)
#   cos, sin [B, T, D]            RoPE tables for the new tokens' positions (HF rotate_half layout)
#   mask  [B, P + T]              1 = a real token, 0 = left padding (past and new)
#   k_cache, v_cache [B, KV, C, D]  mutated: rows P .. P+T-1 receive the new (rotated) K and V
#   out   [B, T, H * D]           attention output, heads concatenated (o_proj's input)
#
# P = mask width - T (the cache's valid length); C >= P + T is the caller's job. Query head h reads KV
# head h // (H / KV), as HF's repeat_kv. Query t sees keys s <= P + t whose mask is 1; scores are
# q.k / sqrt(D) with a float32 softmax. A query that sees no key (a left-padding token) gets zeros:
# its output is never read by a real token, which never attends to padding.
import extensibility
from extensibility import DeviceContext, InputTensor, OutputTensor
from extensibility import _MutableInputTensor as MutableInputTensor
from max.algorithm import sync_parallelize
from std.math import exp, sqrt


@always_inline
def rotate_half[dtype: DType, D: Int](x: SIMD[dtype, D]) -> SIMD[dtype, D]:
    """HF's rotate_half: [-x2, x1] for the halves x1, x2 of a head."""
    var x1 = x.slice[D // 2, offset=0]()
    var x2 = x.slice[D // 2, offset=D // 2]()
    return rebind[SIMD[dtype, D]]((-x2).join(x1))


@extensibility.register("voxlm_cached_attention")
struct CachedAttention:
    @staticmethod
    def execute[target: StaticString, num_heads: Int, num_kv_heads: Int, head_dim: Int](
        output: OutputTensor[rank=3, ...],
        qkv: InputTensor[dtype=output.dtype, rank=3, ...],
        cos: InputTensor[dtype=output.dtype, rank=3, ...],
        sin: InputTensor[dtype=output.dtype, rank=3, ...],
        mask: InputTensor[dtype=DType.int64, rank=2, ...],
        k_cache: MutableInputTensor[dtype=output.dtype, rank=4, ...],
        v_cache: MutableInputTensor[dtype=output.dtype, rank=4, ...],
        ctx: DeviceContext,
    ) raises:
        comptime D = head_dim
        comptime group = num_heads // num_kv_heads
        var batch = qkv.dim_size(0)
        var new = qkv.dim_size(1)
        var total = mask.dim_size(1)
        var past = total - new
        var capacity = k_cache.dim_size(2)
        if past < 0 or past + new > capacity:
            raise Error("voxlm_cached_attention: the KV cache is too short for past + new tokens")
        var scale = Float32(1.0 / sqrt(Float64(D)))
        var qkv_row = (num_heads + 2 * num_kv_heads) * D

        var qkv_p = qkv.unsafe_ptr()
        var cos_p = cos.unsafe_ptr()
        var sin_p = sin.unsafe_ptr()
        var mask_p = mask.unsafe_ptr()
        var k_p = k_cache.unsafe_ptr()
        var v_p = v_cache.unsafe_ptr()
        var output_p = output.unsafe_ptr()

        # One item per (row, KV head): it appends that head's new K/V, then computes its query heads.
        # A head is one SIMD[D] value, so dot products and the weighted sum of V rows are whole-vector
        # operations. Items run on MAX's worker threads: at batch 8 and more, reading the cache is most of
        # a decode step, and one thread could not read it fast enough (past 500, batch 16: 15.7 ms a step
        # serially, 11.9 ms in parallel, in one process; batch 1 no slower; docs/benchmarks.md).
        def attend(item: Int) {imm}:
            var b = item // num_kv_heads
            var kvh = item % num_kv_heads
            var cache_base = (b * num_kv_heads + kvh) * capacity * D
            var mask_row = b * total
            for t in range(new):  # append the new tokens: K rotated, V as is
                var src = (b * new + t) * qkv_row
                var rope = (b * new + t) * D
                var dst = cache_base + (past + t) * D
                var k = qkv_p.unsafe_load[width=D](src + (num_heads + kvh) * D)
                var c = cos_p.unsafe_load[width=D](rope)
                var s = sin_p.unsafe_load[width=D](rope)
                k_p.unsafe_store(dst, k * c + rotate_half(k) * s)
                v_p.unsafe_store(dst, qkv_p.unsafe_load[width=D](src + (num_heads + num_kv_heads + kvh) * D))

            var scores = List[Float32](length=total, fill=0)
            for g in range(group):
                var h = kvh * group + g
                for t in range(new):
                    var rope = (b * new + t) * D
                    var x = qkv_p.unsafe_load[width=D]((b * new + t) * qkv_row + h * D)
                    var c = cos_p.unsafe_load[width=D](rope)
                    var s = sin_p.unsafe_load[width=D](rope)
                    var q = (x * c + rotate_half(x) * s).cast[DType.float32]() * scale
                    var last = past + t  # causal: keys 0 .. P + t
                    var best = Float32.MIN
                    for key in range(last + 1):
                        if mask_p[unsafe_offset=mask_row + key] != 0:
                            var k = k_p.unsafe_load[width=D](cache_base + key * D).cast[DType.float32]()
                            var score = (q * k).reduce_add()
                            scores[key] = score
                            best = max(best, score)
                    var acc = SIMD[DType.float32, D](0)
                    var weight_sum = Float32(0)
                    for key in range(last + 1):
                        if mask_p[unsafe_offset=mask_row + key] != 0:
                            var w = exp(scores[key] - best)
                            weight_sum += w
                            acc += w * v_p.unsafe_load[width=D](cache_base + key * D).cast[DType.float32]()
                    var o = (b * new + t) * num_heads * D + h * D
                    # No visible key (a left-padding query): zeros rather than 0 / 0.
                    var y = acc / weight_sum if weight_sum > 0 else SIMD[DType.float32, D](0)
                    output_p.unsafe_store(o, y.cast[output.dtype]())

        sync_parallelize(attend, batch * num_kv_heads)
