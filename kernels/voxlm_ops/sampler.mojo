# Fused sampler over the codec-code block of the SpeechLM's logits (the decode hot path).
#
# Per row, the same steps as voxlm.speechlm.generate.next_tokens:
#   only the code block [offset, offset + K), speech_end and (when >= 0) advance are allowed; the
#   caller's logit bias (-inf) masks either of the two per row
#   -> CTRL repetition penalty on allowed ids found in the row's history (positive logits / penalty,
#      negative ones * penalty; once per distinct id; -1 = empty slot, ids outside the vocab ignored)
#   -> temperature 0: argmax (ties: the smallest id, as torch.argmax)
#   -> else logits / temperature -> top-k (ties with the k-th value kept) -> top-p (nucleus; a token
#      goes when the more likely tokens before it already hold p; order: value desc, then id asc)
#   -> inverse-CDF sampling with the caller's u in [0, 1): the first id, in ascending id order, whose
#      cumulative (renormalized) weight exceeds u * total.
# No full sort: top-k selects the k-th value with a size-k heap, top-p pops a heap only until the
# nucleus is complete.
# Only the K + 1 allowed logits are read, so the cost does not grow with the text vocabulary.
# Weights are float64 exp(logit - row max); sums run sequentially in the orders the NumPy reference
# uses (totals in id order, top-p's running mass in rank order), so both give the same ids.
import extensibility
from extensibility import DeviceContext, InputTensor, OutputTensor
from std.math import exp


@always_inline
def _before(vals: List[Float32], a: Int, b: Int) -> Bool:
    """Candidate a ranks before candidate b: larger value first; ties by position, i.e. by smaller id.
    A total order, so every selection below agrees with the reference's stable argsort."""
    return vals[a] > vals[b] or (vals[a] == vals[b] and a < b)


@always_inline
def _above(vals: List[Float32], weakest_on_top: Bool, a: Int, b: Int) -> Bool:
    """Heap order: a belongs above b. The top-k heap keeps its weakest member on top (to evict it);
    the nucleus heap keeps the strongest on top (to pop candidates in rank order)."""
    return _before(vals, b, a) if weakest_on_top else _before(vals, a, b)


def _sift_down(mut heap: List[Int], vals: List[Float32], weakest_on_top: Bool, start: Int, size: Int):
    var root = start
    while True:
        var child = 2 * root + 1
        if child >= size:
            return
        if child + 1 < size and _above(vals, weakest_on_top, heap[child + 1], heap[child]):
            child += 1
        if not _above(vals, weakest_on_top, heap[child], heap[root]):
            return
        var tmp = heap[root]
        heap[root] = heap[child]
        heap[child] = tmp
        root = child


def _heapify(mut heap: List[Int], vals: List[Float32], weakest_on_top: Bool, size: Int):
    var i = size // 2 - 1
    while i >= 0:
        _sift_down(heap, vals, weakest_on_top, i, size)
        i -= 1


def _position(ids: List[Int], n: Int, id: Int) -> Int:
    """Where `id` sits among the n ascending candidate ids (binary search), or -1."""
    var low = 0
    var high = n
    while low < high:
        var mid = (low + high) // 2
        if ids[mid] < id:
            low = mid + 1
        else:
            high = mid
    return low if low < n and ids[low] == id else -1


@extensibility.register("voxlm_code_sampler")
struct CodeSampler:
    @staticmethod
    def execute[target: StaticString](
        tokens: OutputTensor[dtype=DType.int64, rank=1, ...],   # [B] chosen ids
        logits: InputTensor[dtype=DType.float32, rank=2, ...],  # [B, V]
        history: InputTensor[dtype=DType.int64, rank=2, ...],   # [B, H] recent ids, -1 = empty
        u: InputTensor[dtype=DType.float64, rank=1, ...],       # [B] uniform in [0, 1)
        iparams: InputTensor[dtype=DType.int64, rank=1, ...],   # [5] offset, K, speech_end, top_k, advance
        fparams: InputTensor[dtype=DType.float32, rank=1, ...], # [3] temperature, top_p, penalty
        ctx: DeviceContext,
    ) raises:
        var rows = logits.dim_size(0)
        var vocab = logits.dim_size(1)
        var hist_len = history.dim_size(1)
        var offset = Int(iparams[0])
        var block = Int(iparams[1])
        var speech_end = Int(iparams[2])
        var top_k = Int(iparams[3])
        var advance = Int(iparams[4])
        var temperature = fparams[0]
        var top_p = fparams[1].cast[DType.float64]()
        var penalty = fparams[2]

        # Candidates in ascending id order: the block, and speech_end and advance (-1: none) where they
        # lie outside it, each once.
        var extras = List[Int]()
        if speech_end < offset or speech_end >= offset + block:
            extras.append(speech_end)
        if advance >= 0 and advance != speech_end and (advance < offset or advance >= offset + block):
            extras.append(advance)
        if len(extras) == 2 and extras[1] < extras[0]:
            var tmp = extras[0]
            extras[0] = extras[1]
            extras[1] = tmp
        var n = block + len(extras)
        var ids = List[Int](capacity=n)
        for e in range(len(extras)):
            if extras[e] < offset:
                ids.append(extras[e])
        for i in range(block):
            ids.append(offset + i)
        for e in range(len(extras)):
            if extras[e] >= offset + block:
                ids.append(extras[e])

        # Scratch reused by every row.
        var vals = List[Float32](capacity=n)
        var seen = List[Bool](capacity=n)
        var keep = List[Bool](capacity=n)
        var nucleus = List[Bool](capacity=n)
        var weights = List[Float64](capacity=n)
        var heap = List[Int](capacity=n)
        for _ in range(n):
            vals.append(0)
            seen.append(False)
            keep.append(True)
            nucleus.append(False)
            weights.append(0)
            heap.append(0)

        for r in range(rows):
            for i in range(n):
                vals[i] = logits[r, ids[i]]

            # Repetition penalty, once per distinct allowed id in the history.
            if penalty != 1.0 and hist_len > 0:
                for i in range(n):
                    seen[i] = False
                for j in range(hist_len):
                    var h = Int(history[r, j])
                    if h < 0 or h >= vocab:
                        continue
                    var pos = _position(ids, n, h)
                    if pos >= 0 and not seen[pos]:
                        seen[pos] = True
                        var v = vals[pos]
                        vals[pos] = v / penalty if v > 0 else v * penalty

            if temperature == 0.0:
                # Greedy; strict > keeps the smallest id among ties.
                var best = 0
                for i in range(1, n):
                    if vals[i] > vals[best]:
                        best = i
                tokens[r] = Int64(ids[best])
                continue

            # Temperature, and the row's maximum: no filter removes it, so weights relative to it
            # serve both top-p and the final draw.
            var top = Float32.MIN
            for i in range(n):
                vals[i] = vals[i] / temperature
                keep[i] = True
                if i == 0 or vals[i] > top:
                    top = vals[i]

            if top_k > 0 and top_k < vocab and top_k < n:
                # k-th largest value by a size-k heap with its weakest member on top: O(n log k).
                for i in range(top_k):
                    heap[i] = i
                _heapify(heap, vals, True, top_k)
                for i in range(top_k, n):
                    if _before(vals, i, heap[0]):
                        heap[0] = i
                        _sift_down(heap, vals, True, 0, top_k)
                # Everything below the k-th value goes; ties with it stay (as generate.filter_top_k).
                var kth = vals[heap[0]]
                for i in range(n):
                    keep[i] = vals[i] >= kth

            # Weights only for what top-k kept: with a small k most exp() calls are skipped.
            for i in range(n):
                if keep[i]:
                    weights[i] = exp(vals[i].cast[DType.float64]() - top.cast[DType.float64]())

            if top_p < 1.0:
                # Nucleus: pop the kept candidates in rank order, keeping each one until those before
                # it hold top_p of the (top-k-filtered) probability; the first one always stays.
                var total: Float64 = 0
                var size = 0
                for i in range(n):
                    nucleus[i] = False
                    if keep[i]:
                        total += weights[i]
                        heap[size] = i
                        size += 1
                _heapify(heap, vals, False, size)
                var before: Float64 = 0
                while size > 0 and before < top_p:
                    var pos = heap[0]
                    nucleus[pos] = True
                    before += weights[pos] / total
                    size -= 1
                    heap[0] = heap[size]
                    _sift_down(heap, vals, False, 0, size)
                for i in range(n):
                    keep[i] = keep[i] and nucleus[i]

            # Inverse CDF over the kept tokens in ascending id order.
            var z: Float64 = 0
            for i in range(n):
                if keep[i]:
                    z += weights[i]
            var target_mass = u[r] * z
            var cum: Float64 = 0
            var chosen = -1
            var last_nonzero = -1
            for i in range(n):
                if keep[i]:
                    if weights[i] > 0:
                        last_nonzero = i
                    cum += weights[i]
                    if cum > target_mass:
                        chosen = i
                        break
            if chosen < 0:
                # u * z rounded up to the total: take the last token that has any mass.
                chosen = last_nonzero if last_nonzero >= 0 else 0
            tokens[r] = Int64(ids[chosen])
