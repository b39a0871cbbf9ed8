"""Discriminators for the codec's adversarial training: HiFi-GAN's multi-period discriminator (MPD) and
EnCodec's multi-resolution complex-STFT discriminator. Each sub-discriminator returns its logits and the
feature maps that the feature-matching loss compares. Training only: nothing here is exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

LEAKY_SLOPE = 0.1

Output = tuple[Tensor, list[Tensor]]  # (logits, feature maps)


class PeriodDiscriminator(nn.Module):
    """Reshapes audio [B, T] into [B, 1, T / period, period] and convolves along time only, so each
    column sees every period-th sample: periodic structure (pitch) that a plain 1-D view averages out."""

    def __init__(self, period: int, channels: list[int], kernel_size: int, stride: int):
        super().__init__()
        self.period = period
        padding = (kernel_size // 2, 0)
        widths = [1, *channels]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, (kernel_size, 1), (stride, 1), padding))
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.convs.append(weight_norm(nn.Conv2d(channels[-1], channels[-1], (kernel_size, 1), 1, padding)))
        self.post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, (1, 0)))

    def forward(self, audio: Tensor) -> Output:
        x = F.pad(audio, (0, -audio.shape[-1] % self.period), mode="reflect")
        x = x.reshape(x.shape[0], 1, -1, self.period)
        return conv_stack(self.convs, self.post, x)


def conv_stack(convs: nn.ModuleList, post: nn.Module, x: Tensor) -> Output:
    """Leaky-ReLU conv layers then a 1-channel output conv; every activation is kept for feature matching."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LEAKY_SLOPE)
        features.append(x)
    x = post(x)
    features.append(x)
    return x.flatten(1), features


class STFTDiscriminator(nn.Module):
    """Convolves the complex STFT (real and imaginary parts as two channels), as EnCodec's MS-STFT-D does:
    it sees phase, which a magnitude (mel) loss does not constrain."""

    def __init__(self, n_fft: int, channels: int, dilations: list[int]):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([weight_norm(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))])
        for dilation in dilations:  # dilated in time, strided in frequency
            self.convs.append(weight_norm(
                nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(dilation, 1),
                          padding=(dilation, 4))
            ))
        self.convs.append(weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))))
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, audio: Tensor) -> Output:
        spec = torch.stft(audio, self.n_fft, self.n_fft // 4, window=self.window, normalized=True,
                          return_complex=True)
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # [B, 2, frames, bins]
        return conv_stack(self.convs, self.post, x)


class Discriminators(nn.Module):
    """Every sub-discriminator of the MPD and the multi-resolution STFT discriminator, run on one batch."""

    def __init__(self, periods: list[int], period_channels: list[int], period_kernel_size: int,
                 period_stride: int, stft_n_ffts: list[int], stft_channels: int, stft_dilations: list[int]):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [PeriodDiscriminator(p, period_channels, period_kernel_size, period_stride) for p in periods]
            + [STFTDiscriminator(n_fft, stft_channels, stft_dilations) for n_fft in stft_n_ffts]
        )

    def forward(self, audio: Tensor) -> list[Output]:
        """audio [B, T] -> one (logits [B, N], feature maps) per sub-discriminator."""
        return [discriminator(audio) for discriminator in self.discriminators]
