"""The neural audio codec (voxlm.codec.model.Codec) as Modular MAX graphs: a streaming decoder for the server
and an encoder for voice prompts, with runtime classes that stand in for the PyTorch Codec.

Decoder graph (one compiled graph serves offline decode and every streaming chunk):

    codes [B, C + N] int64, valid [B, C + N] float32
    ─► FSQ codebook lookup ─► valid conv (embed) ─► LayerNorm ─► L x causal ConvNeXt ─► LayerNorm ─► head
    ─► magnitude, phase ─► inverse-DFT matmul ─► overlap-add ─► blocks [B, (N + P - 1) * hop]

- C = receptive_field - 1 = (kernel_size - 1) * (decoder_layers + 1) is fixed by the config: output frame t
  depends on codes t - C .. t only, so C slots of left context make a chunk's frames exactly what the
  offline decode computes (Codec.stream keeps left_context_frames >= C codes for the same reason; the
  graph needs no more than C). N (new frames) and B are dynamic dims.
- Every convolution is a "valid" one (no padding), written as shifted slices: the embed conv concatenates
  its kernel_size taps into one matmul, a depthwise conv is a sum of kernel_size scaled slices. Each conv
  shortens the sequence by kernel_size - 1, and C is exactly what the embed and the L blocks eat, so the
  head sees the N new frames only and no slot is computed that the output does not need. (Slices rather than
  ops.conv2d: MAX 26.7 rejects constant conv filters on CPU, and slices need no layout plumbing.)
- `valid` marks which slots hold real codes. PyTorch pads each conv's input with zeros on the left; here
  every conv input is multiplied by `valid`, so a slot without a real code is exactly such a zero, whatever
  code the host put there. One graph therefore decodes a stream's first chunk (no context yet), any later
  chunk, and a whole utterance offline (all C context slots empty) - and rows of one batch may have
  different amounts of context.
- Overlap-add runs in the graph (a sum of P = n_fft / hop statically padded hop-sized pieces); the graph
  returns every sample the N windows touch. The runtime adds the previous chunk's pending tail
  (n_fft - hop samples) to the start with one NumPy add, emits the first N * hop samples and keeps the rest
  as the next tail: the same bookkeeping as Codec.stream, and the state is the same `StreamState`.

Encoder graph: audio as hop-sized blocks [B, F, hop] (the runtime zero-pads to a multiple of hop, as
Codec.encode does), valid [B, F] float32 (for batches of unequal clips, like Codec.encode's `lengths`)
-> codes [B, F] int64. The STFT is framing by shifted slices + one matmul with the windowed DFT basis; the
encoder's non-causal convs zero-pad both ends (ops.pad); eval-mode BatchNorm is folded into the projection
before it (scale and shift from the running statistics); FSQ's bound, round (half to even, as torch.round)
and mixed-radix code are elementwise ops.

Weights are bound at init (InferenceSession.init with a weights registry), so a graph compiled for one
config serves any trained weights of that config; graphs are compiled once per process
(voxlm.export.sessions.compile_once). Layouts are channels-last [B, frames, channels] throughout, and
matmul weights are stored [in, out].
Checked on CPU in float32 (tests/test_export_codec.py); device="gpu" is wired but untested.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import CompiledModel, InferenceSession, Model
from max.graph import DeviceRef, Graph, TensorType, TensorValue, Weight, ops
from torch import Tensor

from voxlm.codec.model import Codec, StreamState
from voxlm.export.sessions import compile_once, device_ref, max_device

ArrayLike = Tensor | np.ndarray


# --- shapes: what a graph depends on (weights are bound at init) --------------------------------------------

@dataclass(frozen=True)
class DecoderShape:
    codebook_size: int
    latent_dim: int
    dim: int
    intermediate_dim: int
    num_layers: int
    kernel_size: int
    n_fft: int
    hop_length: int
    max_log_magnitude: float
    eps: float  # the LayerNorms'

    @classmethod
    def from_codec(cls, codec: Codec) -> DecoderShape:
        if codec.has_voice:
            raise ValueError("this codec has a voice encoder (voice_dim > 0), and the MAX decoder graph "
                             "takes codes only: export a codec trained with voice_dim 0")
        d = codec.decoder
        return cls(codec.codebook_size, len(codec.config["levels"]), codec.config["decoder_dim"],
                   codec.config["decoder_intermediate_dim"], d.num_layers, d.kernel_size, d.istft.n_fft,
                   d.istft.hop_length, d.max_log_magnitude, d.norm.eps)

    @property
    def context(self) -> int:
        """C: the left-context slots a chunk needs, the receptive field minus the frame itself."""
        return (self.kernel_size - 1) * (self.num_layers + 1)

    @property
    def pieces(self) -> int:
        """P: how many hops one synthesis window spans."""
        return self.n_fft // self.hop_length


@dataclass(frozen=True)
class EncoderShape:
    n_fft: int
    hop_length: int
    dim: int
    intermediate_dim: int
    num_layers: int
    kernel_size: int
    levels: tuple[int, ...]
    eps: float  # the LayerNorms' (BatchNorm's is folded on the host)

    @classmethod
    def from_codec(cls, codec: Codec) -> EncoderShape:
        c, e = codec.config, codec.encoder
        return cls(c["n_fft"], c["hop_length"], c["encoder_dim"], c["encoder_intermediate_dim"],
                   c["encoder_layers"], c["kernel_size"], tuple(c["levels"]), e.norm.eps)


def graph_name(kind: str, shape: DecoderShape | EncoderShape) -> str:
    # MAX matches precompiled graphs by name + signature: the name must change with anything baked in.
    return f"codec_{kind}_{hashlib.sha1(repr(shape).encode()).hexdigest()[:12]}"


# --- shared pieces ------------------------------------------------------------------------------------------

def taps(x: TensorValue, kernel_size: int) -> list[TensorValue]:
    """The kernel_size shifted views of x [B, T, ...] along axis 1 a valid conv reads: tap j is
    x[:, j : T - (kernel_size - 1) + j], each of length T - (kernel_size - 1)."""
    k = kernel_size - 1
    return [x[:, j: j - k] if j < k else x[:, k:] for j in range(kernel_size)]


def depthwise(x: TensorValue, weight: TensorValue, bias: TensorValue, kernel_size: int) -> TensorValue:
    """Valid depthwise conv over frames: x [B, T, C], weight [K, C] -> [B, T - K + 1, C]."""
    out = None
    for j, tap in enumerate(taps(x, kernel_size)):
        term = tap * weight[j]
        out = term if out is None else out + term
    return out + bias


def dense_conv(x: TensorValue, weight: TensorValue, bias: TensorValue, kernel_size: int) -> TensorValue:
    """Valid conv over frames: x [B, T, C_in], weight [K * C_in, C_out] (tap-major) -> [B, T - K + 1, C_out].
    One matmul over the concatenated taps rather than K small ones."""
    return ops.concat(taps(x, kernel_size), axis=-1) @ weight + bias


def convnext(x: TensorValue, conv_input: TensorValue, weight: WeightFn, prefix: str,
             s: DecoderShape | EncoderShape) -> TensorValue:
    """Vocos' block: x [B, T, dim] the residual, conv_input [B, T + K - 1, dim] the (padded, masked) input
    of the depthwise conv, so that the conv's output lines up with x."""
    p, k = prefix, s.kernel_size
    h = depthwise(conv_input, weight(p + "dwconv.weight", k, s.dim), weight(p + "dwconv.bias", s.dim), k)
    h = ops.layer_norm(h, weight(p + "norm.weight", s.dim), weight(p + "norm.bias", s.dim), s.eps)
    h = h @ weight(p + "pwconv1.weight", s.dim, s.intermediate_dim) + weight(p + "pwconv1.bias",
                                                                              s.intermediate_dim)
    h = ops.gelu(h)  # exact (erf), as F.gelu's default
    h = h @ weight(p + "pwconv2.weight", s.intermediate_dim, s.dim) + weight(p + "pwconv2.bias", s.dim)
    return x + weight(p + "gamma", s.dim) * h


class WeightFn:
    """Declares a float32 graph weight by name and shape (the registry binds its values at init)."""

    def __init__(self, graph: Graph, device: DeviceRef) -> None:
        self.graph, self.device = graph, device

    def __call__(self, name: str, *dims: int) -> TensorValue:
        return self.graph.add_weight(Weight(name, DType.float32, list(dims), device=self.device))


def tensor(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def convnext_weights(block: torch.nn.Module, prefix: str) -> dict[str, Tensor]:
    return {prefix + "dwconv.weight": block.dwconv.weight[:, 0].T,        # [dim, 1, K] -> [K, dim]
            prefix + "dwconv.bias": block.dwconv.bias,
            prefix + "norm.weight": block.norm.weight, prefix + "norm.bias": block.norm.bias,
            prefix + "pwconv1.weight": block.pwconv1.weight.T, prefix + "pwconv1.bias": block.pwconv1.bias,
            prefix + "pwconv2.weight": block.pwconv2.weight.T, prefix + "pwconv2.bias": block.pwconv2.bias,
            prefix + "gamma": block.gamma}


def dense_conv_weight(conv: torch.nn.Conv1d) -> Tensor:
    """[C_out, C_in, K] -> [K * C_in, C_out], tap-major as `dense_conv` concatenates."""
    return conv.weight.permute(2, 1, 0).reshape(-1, conv.weight.shape[0])


def to_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=dtype)


class _Runner:
    """A compiled graph bound to weights on one MAX device: NumPy in, NumPy out."""

    def __init__(self, session: InferenceSession, compiled: CompiledModel, weights: dict[str, Tensor],
                 device: str) -> None:
        self.device = max_device(device)
        self._weights = weights  # kept alive: the MAX model borrows their memory rather than copying it
        self.model: Model = session.init(compiled, weights_registry=weights)

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        buffers = [Buffer.from_dlpack(x) for x in inputs]
        if self.device != CPU():
            buffers = [b.to(self.device) for b in buffers]
        outputs = self.model.execute(*buffers)
        return [(o.to(CPU()) if self.device != CPU() else o).to_numpy() for o in outputs]


# --- decoder ------------------------------------------------------------------------------------------------

def build_decoder_graph(s: DecoderShape, device: DeviceRef | None = None) -> Graph:
    """codes [B, C + N] int64, valid [B, C + N] float32 -> overlap-added blocks [B, (N + P - 1) * hop]."""
    device = device or DeviceRef.CPU()
    k, C = s.kernel_size, s.context
    input_types = [TensorType(DType.int64, ["batch", "slots"], device=device),
                   TensorType(DType.float32, ["batch", "slots"], device=device)]
    with Graph(graph_name("decoder", s), input_types=input_types) as graph:
        weight = WeightFn(graph, device)
        codes, valid = (value.tensor for value in graph.inputs)
        valid = ops.unsqueeze(valid, -1)                                           # [B, T, 1]
        # Slot p of every intermediate is frame p of the input; after the embed and each block the first
        # k - 1 remaining slots are consumed, so `offset` tracks which input slot an intermediate starts at.
        latents = ops.gather(weight("codebook", s.codebook_size, s.latent_dim), codes, axis=0) * valid
        x = dense_conv(latents, weight("embed.weight", k * s.latent_dim, s.dim), weight("embed.bias", s.dim),
                       k)
        x = ops.layer_norm(x, weight("norm.weight", s.dim), weight("norm.bias", s.dim), s.eps)
        offset = k - 1
        for i in range(s.num_layers):
            # Zeroing the slots without a code reproduces PyTorch's left zero padding of this conv's input.
            x = convnext(x[:, k - 1:], x * valid[:, offset:], weight, f"blocks.{i}.", s)
            offset += k - 1
        assert offset == C
        x = ops.layer_norm(x, weight("final_norm.weight", s.dim), weight("final_norm.bias", s.dim), s.eps)
        bins = s.n_fft // 2 + 1
        spectrum = x @ weight("head.weight", s.dim, 2 * bins) + weight("head.bias", 2 * bins)  # [B, N, 2bins]
        log_magnitude, phase = spectrum[..., :bins], spectrum[..., bins:]
        magnitude = ops.exp(ops.min(log_magnitude, s.max_log_magnitude))
        real_imag = ops.concat([magnitude * ops.cos(phase), magnitude * ops.sin(phase)], axis=-1)
        frames = real_imag @ weight("istft.basis", 2 * bins, s.n_fft)                     # [B, N, n_fft]
        B, N = frames.shape[0], frames.shape[1]
        P, hop = s.pieces, s.hop_length
        pieces = frames.reshape([B, N, P, hop])
        # Frame t's r-th hop lands in block t + r: P statically padded shifts, summed.
        blocks = None
        for r in range(P):
            shifted = ops.pad(pieces[:, :, r], [0, 0, r, P - 1 - r, 0, 0])         # [B, N + P - 1, hop]
            blocks = shifted if blocks is None else blocks + shifted
        graph.output(blocks.reshape([B, (N + P - 1) * hop]))
    return graph


def decoder_weights(codec: Codec) -> dict[str, Tensor]:
    d = codec.decoder
    weights = {"codebook": codec.quantizer.codebook(),
               "embed.weight": dense_conv_weight(d.embed), "embed.bias": d.embed.bias,
               "norm.weight": d.norm.weight, "norm.bias": d.norm.bias,
               "final_norm.weight": d.final_norm.weight, "final_norm.bias": d.final_norm.bias,
               "head.weight": d.head.weight.T, "head.bias": d.head.bias, "istft.basis": d.istft.basis}
    for i, block in enumerate(d.blocks):
        weights.update(convnext_weights(block, f"blocks.{i}."))
    return {name: tensor(t) for name, t in weights.items()}


class MaxCodecDecoder:
    """Codec.decode / init_stream / stream / flush on MAX, with the same arguments, results and StreamState
    (states are even interchangeable with the PyTorch codec's). Inputs may be torch tensors or NumPy arrays;
    audio comes back as float32 torch tensors on the host."""

    def __init__(self, shape: DecoderShape, weights: dict[str, Tensor], device: str = "cpu") -> None:
        self.shape = shape
        self.hop_length = shape.hop_length
        self.left_context_frames = shape.context
        session, compiled = compile_once(("codec_decoder", shape), device,
                                         lambda: build_decoder_graph(shape, device_ref(device)))
        self._run = _Runner(session, compiled, weights, device)

    @classmethod
    def from_codec(cls, codec: Codec, device: str = "cpu") -> MaxCodecDecoder:
        """From a Codec in memory (voxlm.codec.module.load_codec loads a trained run's)."""
        return cls(DecoderShape.from_codec(codec), decoder_weights(codec), device)

    def decode_window(self, codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The graph itself: codes [B, C + N], valid [B, C + N] -> blocks [B, (N + P - 1) * hop], the
        previous tail not yet added."""
        return self._run(to_numpy(codes, np.int64), to_numpy(valid, np.float32))[0]

    def decode(self, codes: ArrayLike) -> Tensor:
        """codes [B, F] -> audio [B, F * hop], as Codec.decode: no context, so every context slot is empty."""
        codes = to_numpy(codes, np.int64)
        batch, num_frames = codes.shape
        if num_frames == 0:
            return torch.zeros(batch, 0)
        window = np.zeros((batch, self.shape.context + num_frames), np.int64)
        window[:, self.shape.context:] = codes
        valid = np.zeros(window.shape, np.float32)
        valid[:, self.shape.context:] = 1
        return torch.from_numpy(self.decode_window(window, valid)[:, : num_frames * self.hop_length].copy())

    def init_stream(self, batch_size: int) -> StreamState:
        tail = torch.zeros(batch_size, self.shape.n_fft - self.hop_length)
        return StreamState(torch.zeros(batch_size, 0, dtype=torch.long), tail)

    def stream(self, codes: ArrayLike, state: StreamState) -> tuple[Tensor, StreamState]:
        """codes [B, n] -> (audio [B, n * hop], next state); the outputs over any split of a sequence
        concatenate to decode() of the whole sequence."""
        codes = to_numpy(codes, np.int64)
        batch, n = codes.shape
        tail = to_numpy(state.tail, np.float32)
        if n == 0:
            return torch.zeros(batch, 0), state
        C = self.shape.context
        context = to_numpy(state.codes, np.int64)
        context = context[:, context.shape[1] - min(C, context.shape[1]):]
        have = context.shape[1]
        window = np.zeros((batch, C + n), np.int64)
        window[:, C - have: C] = context
        window[:, C:] = codes
        valid = np.zeros(window.shape, np.float32)
        valid[:, C - have:] = 1
        blocks = self.decode_window(window, valid)
        blocks[:, : tail.shape[1]] += tail
        emitted = n * self.hop_length
        history = np.concatenate([context, codes], axis=1)
        kept = history[:, history.shape[1] - min(C, history.shape[1]):]
        next_state = StreamState(torch.from_numpy(kept.copy()), torch.from_numpy(blocks[:, emitted:].copy()))
        return torch.from_numpy(blocks[:, :emitted].copy()), next_state

    def flush(self, state: StreamState) -> Tensor:
        """None owed, [B, 0], exactly as Codec.flush: decode() also stops at F * hop samples."""
        return torch.as_tensor(state.tail)[:, :0]


# --- encoder ------------------------------------------------------------------------------------------------

def build_encoder_graph(s: EncoderShape, device: DeviceRef | None = None) -> Graph:
    """audio blocks [B, F, hop] float32, valid [B, F] float32 -> codes [B, F] int64."""
    device = device or DeviceRef.CPU()
    k, half = s.kernel_size, s.kernel_size // 2
    P, bins = s.n_fft // s.hop_length, s.n_fft // 2 + 1
    input_types = [TensorType(DType.float32, ["batch", "frames", s.hop_length], device=device),
                   TensorType(DType.float32, ["batch", "frames"], device=device)]
    levels = np.array(s.levels, np.int64)
    # FSQ's constants, computed by the same torch expressions as FSQ.bound (float32), so they agree bitwise.
    levels_t = torch.tensor(s.levels)
    half_l = (levels_t - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    radix = np.cumprod([1, *s.levels[:-1]]).astype(np.float32)

    def const(values: np.ndarray | Tensor) -> TensorValue:
        return ops.constant(np.asarray(values, np.float32), DType.float32, device=device)

    with Graph(graph_name("encoder", s), input_types=input_types) as graph:
        weight = WeightFn(graph, device)
        audio, valid = (value.tensor for value in graph.inputs)
        valid = ops.unsqueeze(valid, -1)                                           # [B, F, 1]
        # STFT frame t = samples [t * hop, t * hop + n_fft) of the signal zero-padded on the right: the
        # concatenation of hop blocks t .. t + P - 1, then one matmul with the windowed DFT basis.
        blocks = ops.pad(audio, [0, 0, 0, P - 1, 0, 0])                            # [B, F + P - 1, hop]
        windows = ops.concat(taps(blocks, P), axis=-1)                             # [B, F, n_fft]
        spectrum = windows @ weight("stft.basis", s.n_fft, 2 * bins)
        real, imag = spectrum[..., :bins], spectrum[..., bins:]
        x = 0.5 * ops.log(ops.max(real * real + imag * imag, 1e-10)) * valid
        # Non-causal ("same") convs: zero padding on both ends, then a valid conv.
        x = dense_conv(ops.pad(x, [0, 0, half, half, 0, 0]), weight("embed.weight", k * bins, s.dim),
                       weight("embed.bias", s.dim), k)
        x = ops.layer_norm(x, weight("norm.weight", s.dim), weight("norm.bias", s.dim), s.eps) * valid
        for i in range(s.num_layers):
            x = convnext(x, ops.pad(x, [0, 0, half, half, 0, 0]), weight, f"blocks.{i}.", s) * valid
        x = ops.layer_norm(x, weight("final_norm.weight", s.dim), weight("final_norm.bias", s.dim), s.eps)
        # The projection with BatchNorm folded in (see `encoder_weights`).
        z = x @ weight("proj.weight", s.dim, len(levels)) + weight("proj.bias", len(levels))
        bounded = ops.tanh(z + const(shift)) * const(half_l) - const(offset)
        digits = ops.round(bounded) + const(levels // 2)
        # Digits are small exact integers in float32, so the mixed-radix sum is exact too.
        code = ops.sum(digits * const(radix), axis=-1)                             # [B, F, 1]
        B, F = audio.shape[0], audio.shape[1]
        graph.output(code.reshape([B, F]).cast(DType.int64))
    return graph


def encoder_weights(codec: Codec) -> dict[str, Tensor]:
    e = codec.encoder
    bn = e.latent_norm
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the encoder's BatchNorm has no running statistics to fold")
    # Eval-mode BatchNorm is an affine map per latent dimension: fold it into the projection before it.
    scale = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    weights = {"stft.basis": e.stft.basis[:, 0].T,                    # [2 bins, 1, n_fft] -> [n_fft, 2 bins]
               "embed.weight": dense_conv_weight(e.embed), "embed.bias": e.embed.bias,
               "norm.weight": e.norm.weight, "norm.bias": e.norm.bias,
               "final_norm.weight": e.final_norm.weight, "final_norm.bias": e.final_norm.bias,
               "proj.weight": (e.proj.weight * scale[:, None]).T, "proj.bias": e.proj.bias * scale + shift}
    for i, block in enumerate(e.blocks):
        weights.update(convnext_weights(block, f"blocks.{i}."))
    return {name: tensor(t) for name, t in weights.items()}


class MaxCodecEncoder:
    """Codec.encode on MAX: audio [B, T] -> codes [B, ceil(T / hop)] (int64 torch tensor on the host)."""

    def __init__(self, shape: EncoderShape, weights: dict[str, Tensor], device: str = "cpu") -> None:
        self.shape = shape
        self.hop_length = shape.hop_length
        session, compiled = compile_once(("codec_encoder", shape), device,
                                         lambda: build_encoder_graph(shape, device_ref(device)))
        self._run = _Runner(session, compiled, weights, device)

    @classmethod
    def from_codec(cls, codec: Codec, device: str = "cpu") -> MaxCodecEncoder:
        return cls(EncoderShape.from_codec(codec), encoder_weights(codec), device)

    def encode(self, audio: ArrayLike, lengths: ArrayLike | None = None) -> Tensor:
        """As Codec.encode: T is zero-padded to a multiple of hop; lengths [B] (samples) marks the zero
        padding of a batch of unequal clips, so each clip's codes equal what it encodes to alone."""
        audio = to_numpy(audio, np.float32)
        batch, num_samples = audio.shape
        hop = self.hop_length
        num_frames = -(-num_samples // hop)
        if num_frames == 0:
            return torch.zeros(batch, 0, dtype=torch.long)
        padded = np.zeros((batch, num_frames * hop), np.float32)
        padded[:, :num_samples] = audio
        frames = np.full(batch, num_frames) if lengths is None else -(-to_numpy(lengths, np.int64) // hop)
        valid = (np.arange(num_frames)[None] < frames[:, None]).astype(np.float32)
        codes = self._run(padded.reshape(batch, num_frames, hop), valid)[0]
        return torch.from_numpy(codes.copy())

