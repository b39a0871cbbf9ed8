# Silence detector: per-frame RMS in dBFS and the trim points of the voiced region.
#
# Frames are non-overlapping runs of `frame_length` samples; the last frame may be partial
# (its RMS is over the samples it has), so F = ceil(N / frame_length) and a clip shorter than
# one frame still gets one frame. A frame is voiced when its RMS >= threshold_db. The voiced
# region runs from the first to the last voiced frame, widened by `hangover` frames on both
# sides (clipped to the clip), and is returned in samples as [start, end).
# No voiced frame (all silent, or N == 0) -> start = end = 0: an explicit empty region.
import extensibility
from extensibility import DeviceContext, InputTensor, OutputTensor
from std.math import log10


@extensibility.register("voxlm_silence_trim")
struct SilenceTrim:
    @staticmethod
    def execute[target: StaticString, frame_length: Int](
        rms_db: OutputTensor[dtype=DType.float32, rank=1, ...],  # [F] frame RMS, dBFS
        trims: OutputTensor[dtype=DType.int64, rank=1, ...],     # [2] start, end sample
        audio: InputTensor[dtype=DType.float32, rank=1, ...],    # [N] mono, full scale 1.0
        threshold_db: InputTensor[dtype=DType.float32, rank=1, ...],  # [1]
        hangover: InputTensor[dtype=DType.int64, rank=1, ...],        # [1] frames
        ctx: DeviceContext,
    ) raises:
        var n = audio.dim_size(0)
        var num_frames = rms_db.dim_size(0)
        # Compared in float64, like the reference, so both make the same voicing decisions.
        # Rank-1 dense input: walk its memory directly so the loads vectorize.
        var samples = audio.unsafe_ptr()
        var threshold = threshold_db[0].cast[DType.float64]()
        var first = -1
        var last = -1
        for f in range(num_frames):
            var begin = f * frame_length
            var stop = min(begin + frame_length, n)
            # Float64 accumulation in SIMD lanes (8 samples per step), then the frame's ragged end.
            var lanes = SIMD[DType.float64, 8](0)
            var i = begin
            while i + 8 <= stop:
                var s = samples.unsafe_load[width=8](i).cast[DType.float64]()
                lanes += s * s
                i += 8
            var acc = lanes.reduce_add()
            while i < stop:
                var s = samples[unsafe_offset=i].cast[DType.float64]()
                acc += s * s
                i += 1
            var mean_sq = acc / Float64(stop - begin)
            # Floor at 1e-10 (-100 dBFS) so digital silence gives a finite number, not -inf.
            var db = 10.0 * log10(max(mean_sq, 1e-10))
            rms_db[f] = db.cast[DType.float32]()
            if db >= threshold:
                if first < 0:
                    first = f
                last = f

        if first < 0:
            trims[0] = 0
            trims[1] = 0
            return
        var h = Int(hangover[0])
        first = max(first - h, 0)
        last = min(last + h, num_frames - 1)
        trims[0] = Int64(first * frame_length)
        trims[1] = Int64(min((last + 1) * frame_length, n))
