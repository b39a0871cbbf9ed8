"""The codec's training objectives: multi-scale log-mel L1, adversarial losses (hinge or least squares),
feature matching, an auxiliary CTC head for phonetic supervision, a stability penalty on how far the latents
move from one frame to the next, and codebook usage statistics.

The CTC head exists because mel-only training keeps the spectrogram's shape but loses phonetic detail that
ASR needs (calibration notes): predicting the transcript's characters from the quantized latents pushes
the codes to carry it. It is used in training only and is not part of the codec.

The stability penalty exists for the SpeechLM that reads the codes: a latent that jitters across FSQ's
rounding boundaries changes the code on ~90% of frames (the quickstart codecs, at 100 frames/s, where a steady
sound spans many frames), and that jitter is entropy the SpeechLM must predict but the decoder smooths away.
An L1 penalty on the change favours latents that hold still while the sound does (the total-variation prior
of signal denoising).

The speaker adversary exists for codecs with a voice encoder: the decoder is told the voice, but nothing stops
the codes from carrying it too. A classifier learns to name the speaker from the quantized latents, and its
gradient reaches the encoder reversed (Ganin & Lempitsky's gradient reversal, as FACodec does for its content
codes), so the codes learn to hide the speaker.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from voxlm.codec.model import frame_mask


class MultiScaleMelLoss(nn.Module):
    """Mean over scales of the L1 distance between log-mel spectrograms: short windows judge timing, long
    windows judge pitch and formants."""

    def __init__(self, sample_rate: int, n_ffts: list[int], hop_lengths: list[int], n_mels: list[int]):
        super().__init__()
        self.mels = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate, n_fft=n_fft, hop_length=hop, n_mels=mels, power=1.0, norm="slaney",
                mel_scale="slaney",
            )
            for n_fft, hop, mels in zip(n_ffts, hop_lengths, n_mels, strict=True)
        )

    def log_mel(self, audio: Tensor, scale: int) -> Tensor:
        """audio [B, T] -> log-mel [B, n_mels, frames] at one of the scales."""
        return torch.log(self.mels[scale](audio).clamp(min=1e-5))

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        losses = [
            F.l1_loss(self.log_mel(reconstruction, i), self.log_mel(target, i)) for i in range(len(self.mels))
        ]
        return torch.stack(losses).mean()


def discriminator_loss(real_logits: list[Tensor], fake_logits: list[Tensor], kind: str) -> Tensor:
    """Mean over sub-discriminators; kind is 'hinge' or 'lsgan' (least squares)."""
    losses = []
    for real, fake in zip(real_logits, fake_logits, strict=True):
        if kind == "hinge":
            losses.append(F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        elif kind == "lsgan":
            losses.append(((1 - real) ** 2).mean() + (fake**2).mean())
        else:
            raise ValueError(f"unknown adversarial loss '{kind}' (hinge or lsgan)")
    return torch.stack(losses).mean()


def generator_adversarial_loss(fake_logits: list[Tensor], kind: str) -> Tensor:
    """Mean over sub-discriminators of how far the fakes are from being judged real."""
    if kind not in ("hinge", "lsgan"):
        raise ValueError(f"unknown adversarial loss '{kind}' (hinge or lsgan)")
    losses = [
        F.relu(1 - fake).mean() if kind == "hinge" else ((1 - fake) ** 2).mean() for fake in fake_logits
    ]
    return torch.stack(losses).mean()


def feature_matching_loss(real_features: list[list[Tensor]], fake_features: list[list[Tensor]]) -> Tensor:
    """Mean L1 distance between the discriminators' feature maps of real and generated audio, averaged
    over every layer of every sub-discriminator (real features carry no gradient)."""
    losses = [
        F.l1_loss(fake, real.detach())
        for reals, fakes in zip(real_features, fake_features, strict=True)
        for real, fake in zip(reals, fakes, strict=True)
    ]
    return torch.stack(losses).mean()


def spoken_characters(text: str, alphabet: str) -> str:
    """The characters of `text` a CTC head over `alphabet` reads: lowercased, every other character dropped,
    then runs of spaces made one ("a - b" reads "a b")."""
    kept = "".join(char for char in text.lower() if char in alphabet or char.isspace())
    return re.sub(r"\s+", " ", kept).strip()


class CTCHead(nn.Module):
    """Predicts the transcript's characters from quantized latents, trained with CTC (blank = index 0).

    Text is lowercased and every character outside the alphabet is dropped; runs of spaces collapse.
    """

    def __init__(self, latent_dim: int, dim: int, kernel_size: int, alphabet: str):
        super().__init__()
        self.alphabet = alphabet
        self.char_to_id = {char: i + 1 for i, char in enumerate(alphabet)}
        self.net = nn.Sequential(
            nn.Conv1d(latent_dim, dim, kernel_size, padding=kernel_size // 2),
            nn.GELU(),
            nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2),
            nn.GELU(),
            nn.Conv1d(dim, len(alphabet) + 1, 1),
        )

    def encode_text(self, text: str) -> list[int]:
        return [self.char_to_id[char] for char in spoken_characters(text, self.alphabet)]

    def forward(self, latents: Tensor, frame_lengths: Tensor, texts: list[str]) -> Tensor:
        """latents [B, F, D], frames per item [B], transcripts -> mean CTC loss per target character."""
        log_probs = self.net(latents.transpose(1, 2)).log_softmax(dim=1).permute(2, 0, 1)  # [F, B, V]
        targets = [torch.tensor(self.encode_text(text), dtype=torch.long) for text in texts]
        target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        # zero_infinity: a transcript too long for its frames would otherwise give an infinite loss.
        return F.ctc_loss(log_probs.float(), torch.cat(targets).to(latents.device), frame_lengths,
                          target_lengths.to(latents.device), blank=0, zero_infinity=True)


class ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient backward is negated."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return -grad


class SpeakerAdversary(nn.Module):
    """Names the speaker of each clip from its quantized latents [B, F, D] (convolutions, then the mean over
    the clip's frames); trained with cross-entropy, its gradient into the latents reversed. `last_accuracy`
    is the share of clips it named right in its last batch: how much speaker the codes still give away."""

    def __init__(self, latent_dim: int, dim: int, kernel_size: int, speakers: list[str]):
        super().__init__()
        if not speakers:
            raise ValueError("the speaker adversary needs the training speakers: the codec stage passes them")
        self.speaker_to_id = {speaker: i for i, speaker in enumerate(speakers)}
        self.net = nn.Sequential(
            nn.Conv1d(latent_dim, dim, kernel_size, padding=kernel_size // 2),
            nn.GELU(),
            nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2),
            nn.GELU(),
        )
        self.head = nn.Linear(dim, len(speakers))
        self.last_accuracy = torch.tensor(float("nan"))

    def forward(self, latents: Tensor, frame_lengths: Tensor, speakers: list[str]) -> Tensor:
        """-> the mean cross-entropy over the clips."""
        unknown = sorted(set(speakers) - set(self.speaker_to_id))
        if unknown:
            raise ValueError(f"speakers {unknown} are not among the codec's training speakers")
        x = self.net(ReverseGradient.apply(latents).transpose(1, 2))  # [B, dim, F]
        mask = frame_mask(frame_lengths, x.shape[-1]).to(x.dtype)
        logits = self.head((x * mask).sum(-1) / mask.sum(-1).clamp(min=1))
        targets = torch.tensor([self.speaker_to_id[s] for s in speakers], device=latents.device)
        self.last_accuracy = (logits.argmax(-1) == targets).float().mean().detach()
        return F.cross_entropy(logits.float(), targets)


def latent_change(bounded: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Mean absolute change of the bounded, pre-rounding latents [B, F, D] from each frame to the next, in
    FSQ level units (a change of 1 moves a digit by one level); `lengths` [B] (frames) leaves padding out."""
    change = (bounded[:, 1:] - bounded[:, :-1]).abs().mean(-1)  # [B, F - 1]
    if lengths is None:
        return change.mean()
    valid = torch.arange(change.shape[1], device=change.device)[None] < (lengths[:, None] - 1)
    return (change * valid).sum() / valid.sum().clamp(min=1)
