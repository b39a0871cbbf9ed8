"""The neural audio codec (voxlm.codec.model.Codec) as Modular MAX graphs: a streaming decoder for the server
and an encoder for voice prompts (and, for a codec with a voice encoder, a voice graph), with runtime classes
that stand in for the PyTorch Codec.

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

A codec with a voice encoder (voice_dim > 0) gets a decoder graph with one more input, voice [B, voice_dim]:
its projection (voice_proj) is added to each block's input, as Decoder.frames does. The voice rides in the
StreamState, as in Codec.stream.

Voice graph (voice_dim > 0): audio blocks [B, F, hop], valid [B, F] -> voice [B, voice_dim]: the encoder's
STFT, non-causal ConvNeXt with the invalid frames zeroed before every conv, then the mean and standard
deviation of the valid frames, a projection and a LayerNorm (voxlm.codec.model.VoiceEncoder).

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
from dataclasses import dataclass, replace

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
    voice_dim: int = 0  # > 0: the graph also takes the voice [B, voice_dim] it decodes in

    @classmethod
    def from_codec(cls, codec: Codec) -> DecoderShape:
        d = codec.decoder
        return cls(codec.codebook_size, len(codec.config["levels"]), codec.config["decoder_dim"],
                   codec.config["decoder_intermediate_dim"], d.num_layers, d.kernel_size, d.istft.n_fft,
                   d.istft.hop_length, d.max_log_magnitude, d.norm.eps, int(codec.config.get("voice_dim", 0)))

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


@dataclass(frozen=True)
class VoiceEncoderShape:
    convnext: EncoderShape  # the STFT and ConvNeXt sizes, as the encoder's but with the voice encoder's depth
    voice_dim: int

    @classmethod
    def from_codec(cls, codec: Codec) -> VoiceEncoderShape:
        if not codec.has_voice:
            raise ValueError("this codec has no voice encoder (voice_dim is 0): it decodes codes alone")
        convnext = replace(EncoderShape.from_codec(codec), num_layers=codec.config["voice_encoder_layers"])
        return cls(convnext, codec.config["voice_dim"])


def graph_name(kind: str, shape: DecoderShape | EncoderShape | VoiceEncoderShape) -> str:
    # MAX matches precompiled graphs by name + signature: the name must change with anything baked in. A
    # decoder without a voice keeps the name it had before DecoderShape had voice_dim, so that artifacts
    # exported then still load their precompiled graphs.
    baked = repr(shape).replace(", voice_dim=0)", ")")
    return f"codec_{kind}_{hashlib.sha1(baked.encode()).hexdigest()[:12]}"


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
    """codes [B, C + N] int64, valid [B, C + N] float32 (and voice [B, voice_dim] float32 when
    s.voice_dim > 0) -> overlap-added blocks [B, (N + P - 1) * hop]."""
    device = device or DeviceRef.CPU()
    k, C = s.kernel_size, s.context
    input_types = [TensorType(DType.int64, ["batch", "slots"], device=device),
                   TensorType(DType.float32, ["batch", "slots"], device=device)]
    if s.voice_dim:
        input_types.append(TensorType(DType.float32, ["batch", s.voice_dim], device=device))
    with Graph(graph_name("decoder", s), input_types=input_types) as graph:
        weight = WeightFn(graph, device)
        codes, valid, *voice = (value.tensor for value in graph.inputs)
        valid = ops.unsqueeze(valid, -1)                                           # [B, T, 1]
        shifts = None
        if s.voice_dim:
            # Each block's input is shifted by its own projection of the voice (Decoder.frames).
            shifts = voice[0] @ weight("voice_proj.weight", s.voice_dim, s.num_layers * s.dim) + weight(
                "voice_proj.bias", s.num_layers * s.dim)
            shifts = ops.unsqueeze(shifts, 1)                                      # [B, 1, L * dim]
        # Slot p of every intermediate is frame p of the input; after the embed and each block the first
        # k - 1 remaining slots are consumed, so `offset` tracks which input slot an intermediate starts at.
        latents = ops.gather(weight("codebook", s.codebook_size, s.latent_dim), codes, axis=0) * valid
        x = dense_conv(latents, weight("embed.weight", k * s.latent_dim, s.dim), weight("embed.bias", s.dim),
                       k)
        x = ops.layer_norm(x, weight("norm.weight", s.dim), weight("norm.bias", s.dim), s.eps)
        offset = k - 1
        for i in range(s.num_layers):
            if shifts is not None:
                x = x + shifts[:, :, i * s.dim: (i + 1) * s.dim]
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
    if d.voice_proj is not None:
        weights.update({"voice_proj.weight": d.voice_proj.weight.T, "voice_proj.bias": d.voice_proj.bias})
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

    @property
    def has_voice(self) -> bool:
        """Whether decoding takes a voice vector, as Codec.has_voice."""
        return self.shape.voice_dim > 0

    def _voice_inputs(self, voice: ArrayLike | None, batch: int) -> list[np.ndarray]:
        """The graph's voice input, checked as Decoder.frames checks it: [] for a codec without one."""
        if (voice is None) == self.has_voice:
            raise ValueError("this decoder was built with voice_dim > 0 and needs a voice: Codec.voice(audio)"
                             if voice is None else "this decoder has no voice input (voice_dim is 0)")
        if voice is None:
            return []
        voice = to_numpy(voice, np.float32)
        if voice.shape != (batch, self.shape.voice_dim):
            raise ValueError(f"voice has shape {voice.shape}, expected ({batch}, {self.shape.voice_dim}): "
                             "one Codec.voice vector per row")
        return [voice]

    def decode_window(self, codes: np.ndarray, valid: np.ndarray,
                      voice: ArrayLike | None = None) -> np.ndarray:
        """The graph itself: codes [B, C + N], valid [B, C + N] (voice [B, voice_dim]) -> blocks
        [B, (N + P - 1) * hop], the previous tail not yet added."""
        codes = to_numpy(codes, np.int64)
        return self._run(codes, to_numpy(valid, np.float32), *self._voice_inputs(voice, len(codes)))[0]

    def decode(self, codes: ArrayLike, voice: ArrayLike | None = None) -> Tensor:
        """codes [B, F] (voice [B, voice_dim] for a voice codec) -> audio [B, F * hop], as Codec.decode: no
        context, so every context slot is empty."""
        codes = to_numpy(codes, np.int64)
        batch, num_frames = codes.shape
        self._voice_inputs(voice, batch)
        if num_frames == 0:
            return torch.zeros(batch, 0)
        window = np.zeros((batch, self.shape.context + num_frames), np.int64)
        window[:, self.shape.context:] = codes
        valid = np.zeros(window.shape, np.float32)
        valid[:, self.shape.context:] = 1
        blocks = self.decode_window(window, valid, voice)
        return torch.from_numpy(blocks[:, : num_frames * self.hop_length].copy())

    def init_stream(self, batch_size: int, voice: ArrayLike | None = None) -> StreamState:
        """As Codec.init_stream: a voice codec's stream keeps its voice [B, voice_dim] in the state."""
        self._voice_inputs(voice, batch_size)
        tail = torch.zeros(batch_size, self.shape.n_fft - self.hop_length)
        voice = None if voice is None else torch.as_tensor(to_numpy(voice, np.float32))
        return StreamState(torch.zeros(batch_size, 0, dtype=torch.long), tail, voice)

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
        blocks = self.decode_window(window, valid, state.voice)
        blocks[:, : tail.shape[1]] += tail
        emitted = n * self.hop_length
        history = np.concatenate([context, codes], axis=1)
        kept = history[:, history.shape[1] - min(C, history.shape[1]):]
        next_state = StreamState(torch.from_numpy(kept.copy()), torch.from_numpy(blocks[:, emitted:].copy()),
                                 state.voice)
        return torch.from_numpy(blocks[:, :emitted].copy()), next_state

    def flush(self, state: StreamState) -> Tensor:
        """None owed, [B, 0], exactly as Codec.flush: decode() also stops at F * hop samples."""
        return torch.as_tensor(state.tail)[:, :0]


# --- encoder ------------------------------------------------------------------------------------------------

def stft_log_magnitude(audio: TensorValue, weight: WeightFn, n_fft: int, hop_length: int) -> TensorValue:
    """STFT.log_magnitude, channels-last: audio as hop blocks [B, F, hop] -> [B, F, n_fft // 2 + 1]. STFT
    frame t = samples [t * hop, t * hop + n_fft) of the signal zero-padded on the right: the concatenation
    of hop blocks t .. t + P - 1, then one matmul with the windowed DFT basis."""
    P, bins = n_fft // hop_length, n_fft // 2 + 1
    blocks = ops.pad(audio, [0, 0, 0, P - 1, 0, 0])                                # [B, F + P - 1, hop]
    windows = ops.concat(taps(blocks, P), axis=-1)                                 # [B, F, n_fft]
    spectrum = windows @ weight("stft.basis", n_fft, 2 * bins)
    real, imag = spectrum[..., :bins], spectrum[..., bins:]
    return 0.5 * ops.log(ops.max(real * real + imag * imag, 1e-10))


def audio_inputs(hop_length: int, device: DeviceRef) -> list[TensorType]:
    """The encoder's and the voice graph's inputs: audio as hop blocks [B, F, hop], valid frames [B, F]."""
    return [TensorType(DType.float32, ["batch", "frames", hop_length], device=device),
            TensorType(DType.float32, ["batch", "frames"], device=device)]


def same_padded(x: TensorValue, kernel_size: int) -> TensorValue:
    """x [B, T, C] zero-padded on both ends: a valid conv of kernel_size over it is a "same" one."""
    half = kernel_size // 2
    return ops.pad(x, [0, 0, half, half, 0, 0])


def embedded_spectrum(graph: Graph, s: EncoderShape,
                      device: DeviceRef) -> tuple[WeightFn, TensorValue, TensorValue, TensorValue]:
    """The first steps of the encoder and the voice graph, inside `graph` (built on `audio_inputs`): (its
    weights, audio [B, F, hop], valid [B, F, 1], the "same" embed conv of the log-magnitude STFT with the
    invalid frames zeroed [B, F, dim])."""
    weight = WeightFn(graph, device)
    audio, valid = (value.tensor for value in graph.inputs)
    valid = ops.unsqueeze(valid, -1)
    x = stft_log_magnitude(audio, weight, s.n_fft, s.hop_length) * valid
    k, bins = s.kernel_size, s.n_fft // 2 + 1
    x = dense_conv(same_padded(x, k), weight("embed.weight", k * bins, s.dim), weight("embed.bias", s.dim), k)
    return weight, audio, valid, x


def audio_blocks(audio: ArrayLike, lengths: ArrayLike | None, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """audio [B, T] (lengths [B] in samples) -> (hop blocks [B, F, hop], valid frames [B, F]), F =
    ceil(T / hop): zero-padded to a multiple of hop as Codec.pad_to_hop, and each clip's frames marked valid
    as Codec.num_frames counts them."""
    audio = to_numpy(audio, np.float32)
    batch, num_samples = audio.shape
    num_frames = -(-num_samples // hop)
    padded = np.zeros((batch, num_frames * hop), np.float32)
    padded[:, :num_samples] = audio
    frames = np.full(batch, num_frames) if lengths is None else -(-to_numpy(lengths, np.int64) // hop)
    valid = (np.arange(num_frames)[None] < frames[:, None]).astype(np.float32)
    return padded.reshape(batch, num_frames, hop), valid

def build_encoder_graph(s: EncoderShape, device: DeviceRef | None = None) -> Graph:
    """audio blocks [B, F, hop] float32, valid [B, F] float32 -> codes [B, F] int64."""
    device = device or DeviceRef.CPU()
    k = s.kernel_size
    levels = np.array(s.levels, np.int64)
    # FSQ's constants, computed by the same torch expressions as FSQ.bound (float32), so they agree bitwise.
    levels_t = torch.tensor(s.levels)
    half_l = (levels_t - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    radix = np.cumprod([1, *s.levels[:-1]]).astype(np.float32)

    def const(values: np.ndarray | Tensor) -> TensorValue:
        return ops.constant(np.asarray(values, np.float32), DType.float32, device=device)

    with Graph(graph_name("encoder", s), input_types=audio_inputs(s.hop_length, device)) as graph:
        weight, audio, valid, x = embedded_spectrum(graph, s, device)
        x = ops.layer_norm(x, weight("norm.weight", s.dim), weight("norm.bias", s.dim), s.eps) * valid
        for i in range(s.num_layers):
            x = convnext(x, same_padded(x, k), weight, f"blocks.{i}.", s) * valid
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


# --- voice encoder ------------------------------------------------------------------------------------------

def build_voice_encoder_graph(shape: VoiceEncoderShape, device: DeviceRef | None = None) -> Graph:
    """audio blocks [B, F, hop] float32, valid [B, F] float32 -> voice [B, voice_dim] float32
    (voxlm.codec.model.VoiceEncoder: ConvNeXt over the log-magnitude STFT, then the mean and standard
    deviation of the valid frames, projected and normalized)."""
    device = device or DeviceRef.CPU()
    s, voice_dim, k = shape.convnext, shape.voice_dim, shape.convnext.kernel_size
    with Graph(graph_name("voice", shape), input_types=audio_inputs(s.hop_length, device)) as graph:
        weight, audio, valid, x = embedded_spectrum(graph, s, device)
        x = x * valid
        for i in range(s.num_layers):
            x = convnext(x, same_padded(x, k), weight, f"blocks.{i}.", s) * valid
        count = ops.max(ops.sum(valid, axis=1), 1.0)                               # [B, 1, 1]
        mean = ops.sum(x, axis=1) / count                                          # [B, 1, dim]
        spread = ops.sqrt(ops.max(ops.sum((x - mean) * (x - mean) * valid, axis=1) / count, 1e-6))
        pooled = ops.concat([mean, spread], axis=-1)                               # [B, 1, 2 dim]
        voice = pooled @ weight("proj.weight", 2 * s.dim, voice_dim) + weight("proj.bias", voice_dim)
        voice = ops.layer_norm(voice, weight("norm.weight", voice_dim), weight("norm.bias", voice_dim), s.eps)
        graph.output(voice.reshape([audio.shape[0], voice_dim]))
    return graph


def voice_encoder_weights(codec: Codec) -> dict[str, Tensor]:
    v = codec.voice_encoder
    weights = {"stft.basis": v.stft.basis[:, 0].T, "embed.weight": dense_conv_weight(v.embed),
               "embed.bias": v.embed.bias, "proj.weight": v.proj.weight.T, "proj.bias": v.proj.bias,
               "norm.weight": v.norm.weight, "norm.bias": v.norm.bias}
    for i, block in enumerate(v.blocks):
        weights.update(convnext_weights(block, f"blocks.{i}."))
    return {name: tensor(t) for name, t in weights.items()}


class MaxCodecEncoder:
    """Codec.encode (and, for a codec with a voice encoder, Codec.voice) on MAX: audio [B, T] -> codes
    [B, ceil(T / hop)] (int64 torch tensor on the host)."""

    def __init__(self, shape: EncoderShape, weights: dict[str, Tensor], device: str = "cpu",
                 voice_shape: VoiceEncoderShape | None = None,
                 voice_weights: dict[str, Tensor] | None = None) -> None:
        self.shape = shape
        self.hop_length = shape.hop_length
        session, compiled = compile_once(("codec_encoder", shape), device,
                                         lambda: build_encoder_graph(shape, device_ref(device)))
        self._run = _Runner(session, compiled, weights, device)
        self._voice = None
        if voice_shape is not None:
            def build() -> Graph:
                return build_voice_encoder_graph(voice_shape, device_ref(device))

            session, compiled = compile_once(("codec_voice", voice_shape), device, build)
            self._voice = _Runner(session, compiled, voice_weights, device)

    @classmethod
    def from_codec(cls, codec: Codec, device: str = "cpu") -> MaxCodecEncoder:
        """The encoder graph, and for a codec with a voice encoder (voice_dim > 0) its voice graph too."""
        if not codec.has_voice:
            return cls(EncoderShape.from_codec(codec), encoder_weights(codec), device)
        return cls(EncoderShape.from_codec(codec), encoder_weights(codec), device,
                   VoiceEncoderShape.from_codec(codec), voice_encoder_weights(codec))

    def encode(self, audio: ArrayLike, lengths: ArrayLike | None = None) -> Tensor:
        """As Codec.encode: T is zero-padded to a multiple of hop; lengths [B] (samples) marks the zero
        padding of a batch of unequal clips, so each clip's codes equal what it encodes to alone."""
        blocks, valid = audio_blocks(audio, lengths, self.hop_length)
        if blocks.shape[1] == 0:
            return torch.zeros(len(blocks), 0, dtype=torch.long)
        codes = self._run(blocks, valid)[0]
        return torch.from_numpy(codes.copy())

    @property
    def has_voice(self) -> bool:
        return self._voice is not None

    def voice(self, audio: ArrayLike, lengths: ArrayLike | None = None) -> Tensor:
        """As Codec.voice: reference clips [B, T] (lengths [B] in samples) -> voice vectors [B, voice_dim]."""
        if self._voice is None:
            raise ValueError("this codec has no voice encoder (voice_dim is 0): decode without a voice")
        blocks, valid = audio_blocks(audio, lengths, self.hop_length)
        if blocks.shape[1] == 0:
            raise ValueError("a voice needs a recording, got 0 samples")
        return torch.from_numpy(self._voice(blocks, valid)[0].copy())

