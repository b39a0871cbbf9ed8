"""The neural audio codec: speech -> one stream of discrete codes (one code per frame) -> speech.

    encode: audio ─► STFT ─► log magnitude ─► ConvNeXt ─► Linear ─► BatchNorm ─► FSQ ─► codes [B, F]
    decode: codes ─► FSQ levels ─► causal ConvNeXt ─► Linear (log magnitude, phase) ─► inverse DFT
            ─► overlap-add ─► audio [B, F * hop]

With `voice_dim > 0` the codec also has a voice encoder: any clip of a speaker ─► one vector [B, voice_dim]
(mean and spread of its frames), which every decoder block adds to its input. The voice (timbre, pitch range)
then need not be in the codes, which can spend their bits on what is said; a SpeechLM over them models the
same units for every speaker (FACodec's global timbre vector, CosyVoice's speaker embedding). Decoding then
takes a voice: `Codec.voice(reference audio)`, from the prompt clip in voice cloning.

The encoder runs offline (tokenizing a corpus, encoding a voice prompt) and may look ahead. The decoder is
built for streaming and for export to MAX graphs: every convolution is causal (left padding only), the
inverse STFT is a matmul with a fixed basis followed by a reshape-and-add overlap-add (no complex tensors,
no torch.istft), so the audio of frame t depends only on codes <= t and a sliding window of past codes
decodes exactly what the whole sequence decodes (see `Codec.stream`).

Time alignment: frame t analyses and synthesizes the window of samples [t * hop, t * hop + n_fft). Samples
[t * hop, (t + 1) * hop) are final once frame t is decoded; the window's last n_fft - hop samples still
wait for the overlap-add of the next frames, which the stream state carries.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hann_window(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64)


class STFT(nn.Module):
    """Short-time Fourier transform as a strided convolution with a fixed windowed DFT basis.

    Frame t covers samples [t * hop, t * hop + n_fft); the input is zero-padded on the right so that a
    signal of F * hop samples gives exactly F frames.
    """

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * bins * torch.arange(n_fft, dtype=torch.float64) / n_fft
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * hann_window(n_fft)
        self.register_buffer("basis", basis.float().unsqueeze(1), persistent=False)  # [2 * bins, 1, n_fft]

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """audio [B, F * hop] -> (real, imag), each [B, n_fft // 2 + 1, F]."""
        padded = F.pad(audio.unsqueeze(1), (0, self.n_fft - self.hop_length))
        return F.conv1d(padded, self.basis, stride=self.hop_length).chunk(2, dim=1)

    def log_magnitude(self, audio: Tensor) -> Tensor:
        """audio [B, F * hop] -> natural-log magnitude [B, n_fft // 2 + 1, F]. Speech spans ~100 dB, a range
        convolutions only handle on a log scale."""
        real, imag = self(audio)
        return 0.5 * torch.log((real**2 + imag**2).clamp(min=1e-10))


class ISTFT(nn.Module):
    """Inverse STFT from export-friendly ops: a matmul with a fixed inverse-DFT basis, then overlap-add.

    The synthesis window is the Hann window divided by the steady-state sum of squared windows at each
    position modulo hop (the dual window), folded into the basis: wherever all overlapping frames are
    present, synthesis exactly inverts `STFT`, with no normalization step after the overlap-add.
    """

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        if n_fft % 2 or n_fft % hop_length or n_fft < 2 * hop_length:
            raise ValueError(f"n_fft ({n_fft}) must be even, a multiple of hop ({hop_length}) and >= 2 hops")
        self.n_fft, self.hop_length = n_fft, hop_length
        window = hann_window(n_fft)
        envelope = (window**2).reshape(n_fft // hop_length, hop_length).sum(0)
        synthesis_window = window / envelope.repeat(n_fft // hop_length)
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * bins * torch.arange(n_fft, dtype=torch.float64) / n_fft
        # A real signal's spectrum is Hermitian: bins 1 .. n_fft/2 - 1 stand for their mirror images too.
        weight = torch.full_like(bins, 2.0 / n_fft)
        weight[0] = weight[-1] = 1.0 / n_fft
        basis = torch.cat([torch.cos(angle) * weight, -torch.sin(angle) * weight]) * synthesis_window
        self.register_buffer("basis", basis.float(), persistent=False)  # [2 * bins, n_fft]

    def frames(self, real: Tensor, imag: Tensor) -> Tensor:
        """Spectra [B, F, bins] (real, imaginary) -> windowed time-domain frames [B, F, n_fft]."""
        return torch.cat([real, imag], dim=-1) @ self.basis

    def overlap_add(self, frames: Tensor) -> Tensor:
        """[B, F, n_fft] -> [B, (F - 1) * hop + n_fft]: frame t's r-th hop of samples lands in block t + r."""
        batch, num_frames, _ = frames.shape
        pieces_per_frame = self.n_fft // self.hop_length
        pieces = frames.reshape(batch, num_frames, pieces_per_frame, self.hop_length)
        blocks = sum(
            F.pad(pieces[:, :, r], (0, 0, r, pieces_per_frame - 1 - r)) for r in range(pieces_per_frame)
        )
        return blocks.reshape(batch, -1)


class ConvNeXtBlock(nn.Module):
    """Vocos' block over frames: depthwise conv, LayerNorm, pointwise MLP, layer scale, residual.

    causal=True pads only on the left, so output frame t depends on input frames <= t.
    """

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float, causal: bool):
        super().__init__()
        self.padding = (kernel_size - 1, 0) if causal else (kernel_size // 2, kernel_size // 2)
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, dim, F] -> [B, dim, F]."""
        residual = x
        x = self.dwconv(F.pad(x, self.padding)).transpose(1, 2)
        x = self.pwconv2(F.gelu(self.pwconv1(self.norm(x))))
        return residual + (self.gamma * x).transpose(1, 2)


def frame_mask(frames: Tensor, num_frames: int) -> Tensor:
    """Each clip's length in frames [B] -> [B, 1, num_frames] float: 1 on its frames, 0 on padding."""
    return (torch.arange(num_frames, device=frames.device) < frames[:, None]).unsqueeze(1).float()


def channel_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm over the channels of a [B, C, F] tensor."""
    return norm(x.transpose(1, 2)).transpose(1, 2)


class Encoder(nn.Module):
    """Audio [B, F * hop] -> normalized pre-quantization latents [B, F, latent_dim]."""

    def __init__(self, n_fft: int, hop_length: int, dim: int, intermediate_dim: int, num_layers: int,
                 kernel_size: int, latent_dim: int):
        super().__init__()
        self.stft = STFT(n_fft, hop_length)
        self.embed = nn.Conv1d(n_fft // 2 + 1, dim, kernel_size, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, kernel_size, 1 / num_layers, causal=False)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, latent_dim)
        # Without a normalization here FSQ collapsed to 1-7 codes (calibration notes): BatchNorm holds each
        # latent dimension near zero mean and unit variance, the range FSQ's tanh bound spreads over levels.
        self.latent_norm = nn.BatchNorm1d(latent_dim)

    def forward(self, audio: Tensor, frames: Tensor | None = None) -> Tensor:
        """frames [B]: each clip's true length in frames, for batches padded to the longest clip. Frames
        past it are zeroed before every convolution, so a clip encodes the same alone or in any batch."""
        x = self.stft.log_magnitude(audio)
        mask = None if frames is None else frame_mask(frames, x.shape[-1]).to(x.dtype)
        masked = (lambda t: t) if mask is None else (lambda t: t * mask)
        x = masked(x)
        x = masked(channel_norm(self.norm, self.embed(x)))
        for block in self.blocks:
            x = masked(block(x))
        x = self.proj(self.final_norm(x.transpose(1, 2)))
        return self.latent_norm(x.transpose(1, 2)).transpose(1, 2)


class VoiceEncoder(nn.Module):
    """Audio [B, F * hop] -> one voice vector per clip [B, voice_dim]: ConvNeXt over the log-magnitude STFT,
    then the mean and standard deviation of the frames (x-vector statistics pooling), projected."""

    def __init__(self, n_fft: int, hop_length: int, dim: int, intermediate_dim: int, num_layers: int,
                 kernel_size: int, voice_dim: int):
        super().__init__()
        self.stft = STFT(n_fft, hop_length)
        self.embed = nn.Conv1d(n_fft // 2 + 1, dim, kernel_size, padding=kernel_size // 2)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, kernel_size, 1 / num_layers, causal=False)
            for _ in range(num_layers)
        )
        self.proj = nn.Linear(2 * dim, voice_dim)
        self.norm = nn.LayerNorm(voice_dim)

    def forward(self, audio: Tensor, frames: Tensor | None = None) -> Tensor:
        """frames [B]: each clip's true length in frames, for batches padded to the longest clip. As in the
        Encoder, frames past it are zeroed before every convolution and left out of the statistics, so a
        clip gives the same voice alone or in any batch."""
        x = self.stft.log_magnitude(audio)
        if frames is None:
            frames = torch.full((x.shape[0],), x.shape[-1], device=audio.device)
        mask = frame_mask(frames, x.shape[-1]).to(x.dtype)
        x = self.embed(x * mask) * mask
        for block in self.blocks:
            x = block(x) * mask
        count = mask.sum(-1).clamp(min=1)
        mean = (x * mask).sum(-1) / count
        spread = (((x - mean[..., None]) ** 2 * mask).sum(-1) / count).clamp(min=1e-6).sqrt()
        return self.norm(self.proj(torch.cat([mean, spread], dim=-1)))


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al., 2023) with one codebook.

    Each latent dimension i is bounded and rounded to one of levels[i] values; the code is the mixed-radix
    number of those digits, so the codebook size is prod(levels) and no codebook is learned. Quantized
    latents are scaled to [-1, 1]. Rounding passes gradients straight through.
    """

    def __init__(self, levels: list[int]):
        super().__init__()
        levels_t = torch.tensor(levels, dtype=torch.long)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1, *levels[:-1]]), 0), persistent=False)
        self.register_buffer("half_width", levels_t // 2, persistent=False)
        self.codebook_size = math.prod(levels)

    def bound(self, z: Tensor) -> Tensor:
        """Squash z into (-(L-1)/2, (L-1)/2), shifted by 1/2 for even L so rounding gives exactly L values."""
        eps = 1e-3
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [..., D] -> (quantized latents in [-1, 1] [..., D], codes LongTensor [...])."""
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / self.half_width, self.latent_to_codes(rounded.detach())

    def latent_to_codes(self, rounded: Tensor) -> Tensor:
        digits = torch.round(rounded).long() + self.half_width
        return (digits * self.basis).sum(-1)

    def digits(self, codes: Tensor) -> Tensor:
        """codes LongTensor [...] -> each code's digits [..., D], digit i in [0, levels[i])."""
        return (codes.unsqueeze(-1) // self.basis) % self.levels

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """codes LongTensor [...] -> quantized latents [..., D] in [-1, 1]."""
        return (self.digits(codes) - self.half_width) / self.half_width

    def codebook(self) -> Tensor:
        """Every code's quantized latent, [codebook_size, D]: a lookup table for export."""
        return self.codes_to_latent(torch.arange(self.codebook_size, device=self.levels.device))


class Decoder(nn.Module):
    """Quantized latents [B, F, latent_dim] (and a voice [B, voice_dim] when voice_dim > 0) -> audio
    [B, F * hop], causal in frames."""

    def __init__(self, latent_dim: int, dim: int, intermediate_dim: int, num_layers: int, kernel_size: int,
                 n_fft: int, hop_length: int, voice_dim: int = 0):
        super().__init__()
        # One projection of the voice per block input, so that no depth of the stack has to carry it.
        self.voice_proj = nn.Linear(voice_dim, dim * num_layers) if voice_dim > 0 else None
        self.kernel_size, self.num_layers = kernel_size, num_layers
        self.embed = nn.Conv1d(latent_dim, dim, kernel_size)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, kernel_size, 1 / num_layers, causal=True)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_fft + 2)  # log magnitude and phase of each of the n_fft / 2 + 1 bins
        self.istft = ISTFT(n_fft, hop_length)
        # A full-scale DC signal has magnitude sum(window) = n_fft / 2: nothing real is louder, and clamping
        # the log keeps exp() finite early in training.
        self.max_log_magnitude = math.log(n_fft / 2)

    @property
    def receptive_field(self) -> int:
        """How many frames (this one included) the output of one frame depends on."""
        return (self.kernel_size - 1) * (self.num_layers + 1) + 1

    def frames(self, latents: Tensor, voice: Tensor | None = None) -> Tensor:
        """latents [B, F, latent_dim] (voice [B, voice_dim]) -> windowed time-domain frames [B, F, n_fft]."""
        if (voice is None) != (self.voice_proj is None):
            raise ValueError("this decoder was built with voice_dim > 0 and needs a voice: Codec.voice(audio)"
                             if voice is None else "this decoder has no voice input (voice_dim is 0)")
        x = self.embed(F.pad(latents.transpose(1, 2), (self.kernel_size - 1, 0)))
        x = channel_norm(self.norm, x)
        shifts = None if voice is None else self.voice_proj(voice).chunk(len(self.blocks), dim=-1)
        for i, block in enumerate(self.blocks):
            if shifts is not None:
                x = x + shifts[i][..., None]
            x = block(x)
        log_magnitude, phase = self.head(self.final_norm(x.transpose(1, 2))).chunk(2, dim=-1)
        magnitude = torch.exp(log_magnitude.clamp(max=self.max_log_magnitude))
        return self.istft.frames(magnitude * torch.cos(phase), magnitude * torch.sin(phase))

    def forward(self, latents: Tensor, voice: Tensor | None = None) -> Tensor:
        num_samples = latents.shape[1] * self.istft.hop_length
        return self.istft.overlap_add(self.frames(latents, voice))[:, :num_samples]


@dataclass
class CodecOutput:
    audio: Tensor  # reconstruction [B, T], trimmed to the input's length
    codes: Tensor  # LongTensor [B, F]
    latents: Tensor  # normalized pre-quantization latents [B, F, D]
    quantized: Tensor  # quantized latents [B, F, D] in [-1, 1], what the decoder reads


@dataclass
class StreamState:
    codes: Tensor  # LongTensor [B, <= left_context_frames]: the decoder's left context
    tail: Tensor  # [B, n_fft - hop]: overlap-add of past frames into samples not yet emitted
    voice: Tensor | None = None  # [B, voice_dim]: the voice every frame is decoded in (voice_dim > 0)


class Codec(nn.Module):
    """Encoder + FSQ + causal decoder, built from config kwargs alone (`Codec(**cfg)`)."""

    def __init__(self, sample_rate: int, hop_length: int, n_fft: int, levels: list[int],
                 encoder_dim: int, encoder_intermediate_dim: int, encoder_layers: int,
                 decoder_dim: int, decoder_intermediate_dim: int, decoder_layers: int,
                 kernel_size: int, left_context_frames: int, voice_dim: int = 0,
                 voice_encoder_layers: int = 2):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.config: dict[str, Any] = dict(
            sample_rate=sample_rate, hop_length=hop_length, n_fft=n_fft, levels=list(levels),
            encoder_dim=encoder_dim, encoder_intermediate_dim=encoder_intermediate_dim,
            encoder_layers=encoder_layers, decoder_dim=decoder_dim,
            decoder_intermediate_dim=decoder_intermediate_dim, decoder_layers=decoder_layers,
            kernel_size=kernel_size, left_context_frames=left_context_frames, voice_dim=voice_dim,
            voice_encoder_layers=voice_encoder_layers,
        )
        self.encoder = Encoder(n_fft, hop_length, encoder_dim, encoder_intermediate_dim, encoder_layers,
                               kernel_size, latent_dim=len(levels))
        self.quantizer = FSQ(list(levels))
        self.decoder = Decoder(len(levels), decoder_dim, decoder_intermediate_dim, decoder_layers,
                               kernel_size, n_fft, hop_length, voice_dim)
        self.voice_encoder = None if voice_dim == 0 else VoiceEncoder(
            n_fft, hop_length, encoder_dim, encoder_intermediate_dim, voice_encoder_layers, kernel_size,
            voice_dim)
        self.left_context_frames = left_context_frames
        if left_context_frames < self.decoder.receptive_field - 1:
            raise ValueError(
                f"left_context_frames={left_context_frames} is shorter than the decoder's receptive field "
                f"({self.decoder.receptive_field} frames, so >= {self.decoder.receptive_field - 1} past "
                "frames): streamed audio would differ from the offline decode"
            )

    @property
    def sample_rate(self) -> int:
        return self.config["sample_rate"]

    @property
    def hop_length(self) -> int:
        return self.config["hop_length"]

    @property
    def frame_rate(self) -> float:
        """Codes per second."""
        return self.sample_rate / self.hop_length

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def pad_to_hop(self, audio: Tensor) -> Tensor:
        return F.pad(audio, (0, -audio.shape[-1] % self.hop_length))

    def code_fingerprint(self) -> str:
        """Which codes this codec gives a sound: sha256 of its encoder's and quantizer's weights (names,
        dtypes, shapes, bytes), 16 hex digits. Codecs of one shape trained apart read each other's codes as
        other sounds; codecs that share these (a decoder fine-tuned apart) read them alike."""
        digest = hashlib.sha256()
        for part in (self.encoder, self.quantizer):
            for name, tensor in sorted(part.state_dict().items()):
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def has_voice(self) -> bool:
        """Whether decoding takes a voice vector (the codec was built with voice_dim > 0)."""
        return self.voice_encoder is not None

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> CodecOutput:
        """Training pass: audio [B, T] -> reconstruction [B, T], codes and latents for the losses. A codec
        with a voice encoder decodes each clip in its own voice (lengths [B] keep padding out of it)."""
        padded = self.pad_to_hop(audio)
        latents = self.encoder(padded)
        quantized, codes = self.quantizer(latents)
        voice = None
        if self.voice_encoder is not None:
            voice = self.voice_encoder(padded, None if lengths is None else self.num_frames(lengths))
        reconstruction = self.decoder(quantized, voice)[:, : audio.shape[-1]]
        return CodecOutput(reconstruction, codes, latents, quantized)

    def num_frames(self, lengths: Tensor) -> Tensor:
        """Clip lengths in samples (LongTensor) -> how many codes each encodes to: ceil(length / hop)."""
        return torch.div(lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")

    @torch.no_grad()
    def encode(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        """audio [B, T] -> codes LongTensor [B, ceil(T / hop)] (T is zero-padded to a multiple of hop).

        lengths [B] (samples) marks zero padding in a batch of unequal clips: each clip's first
        ceil(length / hop) codes then equal what it encodes to alone.
        """
        frames = None if lengths is None else self.num_frames(lengths)
        return self.quantizer(self.encoder(self.pad_to_hop(audio), frames))[1]

    @torch.no_grad()
    def voice(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Reference clips [B, T] of the voices to decode in -> voice vectors [B, voice_dim]."""
        if self.voice_encoder is None:
            raise ValueError("this codec has no voice encoder (voice_dim is 0): decode without a voice")
        frames = None if lengths is None else self.num_frames(lengths)
        return self.voice_encoder(self.pad_to_hop(audio), frames)

    @torch.no_grad()
    def decode(self, codes: Tensor, voice: Tensor | None = None) -> Tensor:
        """codes LongTensor [B, F] (and voice [B, voice_dim] when the codec has one) -> audio [B, F * hop]."""
        return self.decoder(self.quantizer.codes_to_latent(codes), voice)

    def init_stream(self, batch_size: int, voice: Tensor | None = None) -> StreamState:
        """The state before the first code: no left context, nothing pending in the overlap-add."""
        device = self.quantizer.levels.device
        tail = torch.zeros(batch_size, self.decoder.istft.n_fft - self.hop_length, device=device)
        return StreamState(torch.zeros(batch_size, 0, dtype=torch.long, device=device), tail, voice)

    @torch.no_grad()
    def stream(self, codes: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """codes LongTensor [B, n] -> (audio [B, n * hop], next state).

        Concatenating the outputs over any split of a code sequence equals decode() of the whole sequence:
        the new frames are decoded after the last left_context_frames codes (>= the receptive field, checked
        at construction), and the samples their windows add to later blocks wait in state.tail.
        """
        if codes.shape[1] == 0:
            return state.tail.new_zeros(codes.shape[0], 0), state
        context = torch.cat([state.codes, codes], dim=1)
        latents = self.quantizer.codes_to_latent(context)
        frames = self.decoder.frames(latents, state.voice)[:, -codes.shape[1]:]
        audio = self.decoder.istft.overlap_add(frames)
        pending = state.tail.shape[1]
        audio = torch.cat([audio[:, :pending] + state.tail, audio[:, pending:]], dim=1)
        emitted = codes.shape[1] * self.hop_length
        keep = max(0, context.shape[1] - self.left_context_frames)
        next_state = StreamState(context[:, keep:], audio[:, emitted:], state.voice)
        return audio[:, :emitted], next_state

    def flush(self, state: StreamState) -> Tensor:
        """The audio still owed at the end of a stream: none, [B, 0], since decode() also stops at F * hop
        samples (state.tail, the fade-out of the last windows, is dropped by both alike)."""
        return state.tail[:, :0]
