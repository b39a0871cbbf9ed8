"""Audio I/O and the small signal steps every utterance goes through: decode, downmix, resample, trim, level.

Decoding uses soundfile (libsndfile: wav, flac, ogg, ...) because torchaudio >= 2.9 has no backend here;
resampling uses torchaudio.functional.resample. The rest are pure NumPy functions on a float32 mono clip in
[-1, 1], easy to test and to port (kernels/ holds a Mojo version of the silence detector).

A file that cannot be used raises AudioError, whose `reason` (missing, empty, not audio, corrupt) is what
the dataset counts when it skips the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

AudioSource = str | Path | bytes

# libsndfile's error code for "format not recognised": the bytes are not an audio file it knows.
_SF_ERR_UNRECOGNISED_FORMAT = 1
# Writers that stream to a pipe leave a placeholder data size; only a real size tells of a truncation.
_WAV_PLACEHOLDER_SIZE = 0x7FFF0000
_WAV_HEADER_BYTES = 4096


class AudioError(ValueError):
    """Audio that cannot be used; `reason` is the short category the dataset counts skips by."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def describe(source: AudioSource) -> str:
    return f"embedded audio ({len(source)} bytes)" if isinstance(source, bytes) else str(source)


def _open(source: AudioSource) -> tuple[io.BytesIO | str, bytes, int]:
    """The object soundfile reads, the file's first bytes and its size; raises for missing or empty input."""
    if isinstance(source, bytes):
        data, size = source[:_WAV_HEADER_BYTES], len(source)
        handle: io.BytesIO | str = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError("missing", f"{path}: no such file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(_WAV_HEADER_BYTES)
        handle = str(path)
    if size == 0:
        raise AudioError("empty", f"{describe(source)}: zero bytes")
    return handle, data, size


def _wav_truncated(head: bytes, size: int) -> bool:
    """True when a RIFF/WAVE header promises more sample data than the file holds (an interrupted write).

    libsndfile quietly reads what is there, which would pair half a clip with the whole transcript.
    """
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos: pos + 4], int.from_bytes(head[pos + 4: pos + 8], "little")
        if chunk == b"data":
            return 0 < length < _WAV_PLACEHOLDER_SIZE and pos + 8 + length > size
        pos += 8 + length + (length & 1)  # RIFF chunks are padded to an even size
    return False


def _check(source: AudioSource) -> io.BytesIO | str:
    handle, head, size = _open(source)
    if _wav_truncated(head, size):
        raise AudioError("corrupt", f"{describe(source)}: truncated WAV (its header promises more data)")
    return handle


def _soundfile_error(source: AudioSource, error: sf.LibsndfileError) -> AudioError:
    if error.code == _SF_ERR_UNRECOGNISED_FORMAT:
        return AudioError("not audio", f"{describe(source)}: not an audio format libsndfile reads "
                                       "(wav, flac, ogg, ...); convert it with sox or ffmpeg")
    return AudioError("corrupt", f"{describe(source)}: unreadable audio ({error.error_string or error})")


def audio_info(source: AudioSource) -> AudioInfo:
    """Frames, sample rate and channels from the header alone (cheap: no samples are decoded)."""
    handle = _check(source)
    try:
        info = sf.info(handle)
    except sf.LibsndfileError as error:
        raise _soundfile_error(source, error) from error
    if info.frames <= 0:
        raise AudioError("empty", f"{describe(source)}: zero samples")
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate), channels=int(info.channels))


def load_audio(source: AudioSource, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode a file path or encoded bytes to float32 mono in [-1, 1], resampled to `sample_rate` if given."""
    handle = _check(source)
    try:
        audio, rate = sf.read(handle, dtype="float32", always_2d=True)
    except sf.LibsndfileError as error:
        raise _soundfile_error(source, error) from error
    if audio.shape[0] == 0:
        raise AudioError("empty", f"{describe(source)}: zero samples")
    audio = audio.mean(axis=1)
    if sample_rate is not None and sample_rate != rate:
        audio, rate = resample(audio, rate, sample_rate), sample_rate
    # Float files and resampling ringing can step past full scale; downstream code assumes [-1, 1].
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False), int(rate)


def save_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write a mono clip as 16-bit PCM WAV (the format every tool here reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited (sinc) resampling of a mono clip."""
    if orig_rate == new_rate:
        return audio.astype(np.float32, copy=False)
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    return torchaudio.functional.resample(waveform, orig_rate, new_rate).numpy()


def frame_energy(audio: np.ndarray, frame: int) -> np.ndarray:
    """Mean square of consecutive frames of `frame` samples (the last one zero-padded)."""
    frames = -(-len(audio) // frame)
    padded = np.zeros(frames * frame, dtype=np.float64)
    padded[: len(audio)] = audio
    return np.mean(padded.reshape(frames, frame) ** 2, axis=1)


def trim_silence(audio: np.ndarray, sample_rate: int, threshold_db: float = -40.0,
                 margin_seconds: float = 0.1, frame_seconds: float = 0.02) -> np.ndarray:
    """Cut leading and trailing frames quieter than the loudest frame by more than -threshold_db dB.

    The threshold is relative to the clip's own peak frame, so it works the same for quiet and loud
    recordings; `margin_seconds` of the cut audio is kept on each side so word onsets survive.
    """
    if threshold_db >= 0:
        raise ValueError(f"trim threshold_db must be negative (dB below the loudest frame): {threshold_db}")
    frame = max(1, round(frame_seconds * sample_rate))
    energy = frame_energy(audio, frame)
    if energy.size == 0 or energy.max() == 0:
        return audio
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (threshold_db / 10))
    margin = round(margin_seconds * sample_rate)
    start = max(0, loud[0] * frame - margin)
    end = min(len(audio), (loud[-1] + 1) * frame + margin)
    return audio[start:end]


def rms_dbfs(audio: np.ndarray) -> float:
    """Root-mean-square level in dB relative to full scale (-inf for silence)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20 * np.log10(rms) if rms > 0 else float("-inf")


def normalize_loudness(audio: np.ndarray, target_rms_dbfs: float = -20.0,
                       peak_dbfs: float = -1.0) -> np.ndarray:
    """Scale to an RMS level, then lower the gain if needed so no sample peaks above `peak_dbfs`."""
    level = rms_dbfs(audio)
    if level == float("-inf"):
        return audio
    gain = 10 ** ((target_rms_dbfs - level) / 20)
    peak = float(np.max(np.abs(audio))) * gain
    ceiling = 10 ** (peak_dbfs / 20)
    if peak > ceiling:
        gain *= ceiling / peak
    return (audio * gain).astype(np.float32)
