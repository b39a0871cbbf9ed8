"""Audio on the wire: the response formats of `POST /v1/audio/speech`, and the speed change.

wav and pcm stream: pcm is raw 16-bit little-endian mono at the codec's rate (what OpenAI's pcm is, at its own
rate), wav is the same after a RIFF header whose sizes say "unknown length" (0xFFFFFFFF), the convention
streaming servers use and that players and Python's wave/soundfile readers accept. flac, mp3 and opus
(Ogg) are encoded by libsndfile when the stream ends, because their containers need the whole signal (or a
seekable file) to be written correctly; they are offered only where the installed libsndfile has the encoder.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import numpy as np
import soundfile as sf

STREAMED = ("wav", "pcm")
ENCODED = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}


def available_formats() -> list[str]:
    """The response formats this machine can produce."""
    formats = list(STREAMED)
    for name, (container, subtype) in ENCODED.items():
        if container in sf.available_formats() and subtype in sf.available_subtypes(container):
            formats.append(name)
    return formats


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int) -> bytes:
    """A 44-byte RIFF/WAVE header for 16-bit mono PCM of unknown length."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def encode_whole(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A complete flac / mp3 / opus file of `audio`."""
    container, subtype = ENCODED[fmt]
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


class SpeedChanger:
    """Streaming time-scale modification by WSOLA (Verhelst & Roelands, 1993): the pitch stays, the duration
    is divided by `speed`. Input comes in chunks of any size; output follows with a ~frame of delay.

    Frames of `frame` samples are overlap-added at a fixed synthesis hop (frame / 2: Hann windows sum to
    one); each is read from the input at hop * speed, shifted by up to `tolerance` samples to where it best
    continues the previous frame's natural continuation (maximum cross-correlation), which avoids the phase
    jumps of plain overlap-add."""

    def __init__(self, speed: float, sample_rate: int, frame_seconds: float = 0.03,
                 tolerance_seconds: float = 0.008) -> None:
        self.speed = speed
        self.frame = 2 * round(frame_seconds * sample_rate / 2)
        self.hop = self.frame // 2
        self.tolerance = round(tolerance_seconds * sample_rate)
        self.window = np.hanning(self.frame + 1)[:-1].astype(np.float32)  # periodic: halves sum to one
        self.input = np.zeros(self.tolerance, np.float32)  # leading zeros: room to search before sample 0
        self.consumed = 0        # input samples dropped from the front of self.input
        self.position = 0.0      # next analysis frame's nominal start, in input samples (without the pad)
        self.previous = None     # where the last frame was read from (absolute, in self.input coordinates)
        self.tail = np.zeros(self.hop, np.float32)
        self.samples_in = 0
        self.samples_out = 0

    def push(self, audio: np.ndarray, final: bool = False) -> np.ndarray:
        self.input = np.concatenate([self.input, np.asarray(audio, np.float32)])
        self.samples_in += len(audio)
        out: list[np.ndarray] = []
        for start in self._frames(final):
            piece = self.input[start - self.consumed: start - self.consumed + self.frame]
            if len(piece) < self.frame:
                piece = np.pad(piece, (0, self.frame - len(piece)))
            windowed = piece * self.window
            out.append(self.tail + windowed[: self.hop])
            self.tail = windowed[self.hop:].copy()
        if final:
            out.append(self.tail)
            self.tail = np.zeros(0, np.float32)
        # Keep what the next frame may read: its search range and the previous frame's continuation.
        keep_from = int(self.position) if self.previous is None else min(int(self.position),
                                                                         self.previous + self.hop)
        drop = max(0, keep_from - self.consumed)
        self.input, self.consumed = self.input[drop:], self.consumed + drop
        result = np.concatenate(out) if out else np.zeros(0, np.float32)
        if final:  # the last frames ran into zero padding: end where the input's duration says
            result = result[: max(0, round(self.samples_in / self.speed) - self.samples_out)]
        self.samples_out += len(result)
        return result

    def _frames(self, final: bool) -> Iterator[int]:
        available = self.consumed + len(self.input)
        while True:
            nominal = int(self.position) + self.tolerance          # in padded coordinates
            if nominal + self.tolerance + self.frame > available:
                if not final or nominal >= available:
                    return
            if self.previous is None:
                start = nominal
            else:
                # The natural continuation of the previous frame, one synthesis hop later.
                target_at = self.previous + self.hop - self.consumed
                target = self.input[target_at: target_at + self.frame]
                lo = max(nominal - self.tolerance, self.consumed)
                hi = min(nominal + self.tolerance, available - self.frame)
                start = nominal
                if len(target) == self.frame and hi > lo:
                    region = self.input[lo - self.consumed: hi - self.consumed + self.frame]
                    scores = np.correlate(region, target, mode="valid")
                    start = lo + int(np.argmax(scores))
            self.previous = start
            self.position += self.hop * self.speed
            yield start
