"""Signal-level metrics between a reference clip and an estimate (a codec's resynthesis, a streamed decode),
and codebook usage statistics. Pure functions over mono float arrays; lengths are aligned by trimming both
to the shorter one, since a codec pads its input to whole frames."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torchaudio

from voxlm.data.audio import resample

_MEL_TRANSFORMS: dict[tuple[int, int, int, int], torchaudio.transforms.MelSpectrogram] = {}


def align(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both clips trimmed to the shorter one, as float64 (a codec pads its input to whole frames)."""
    n = min(len(reference), len(estimate))
    return np.asarray(reference[:n], dtype=np.float64), np.asarray(estimate[:n], dtype=np.float64)


def log_mel(audio: np.ndarray, sample_rate: int, n_fft: int = 1024, hop_length: int = 256,
            n_mels: int = 80) -> np.ndarray:
    """log10 mel spectrogram [n_mels, frames], floored at 1e-5."""
    key = (sample_rate, n_fft, hop_length, n_mels)
    if key not in _MEL_TRANSFORMS:
        _MEL_TRANSFORMS[key] = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=1.0)
    mel = _MEL_TRANSFORMS[key](torch.as_tensor(audio, dtype=torch.float32))
    return torch.log10(mel.clamp(min=1e-5)).numpy()


def log_mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of log10 mel spectrograms (lower is better; 0 for identical clips)."""
    reference, estimate = align(reference, estimate)
    return float(np.mean(np.abs(log_mel(reference, sample_rate) - log_mel(estimate, sample_rate))))


def stoi(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Short-time objective intelligibility, 0..1 (pystoi; it resamples to 10 kHz itself)."""
    from pystoi import stoi as pystoi_stoi

    reference, estimate = align(reference, estimate)
    return float(pystoi_stoi(reference, estimate, sample_rate, extended=False))


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Wide-band PESQ (1.0..4.6) at 16 kHz; NaN with a warning for a clip PESQ cannot score."""
    from pesq import pesq

    reference, estimate = align(reference, estimate)
    if sample_rate != 16000:
        reference = resample(reference.astype(np.float32), sample_rate, 16000)
        estimate = resample(estimate.astype(np.float32), sample_rate, 16000)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # pesq divides a silent clip by its zero peak
            return float(pesq(16000, reference, estimate, "wb"))
    except Exception as exc:  # pesq raises its own error types for silent or too-short clips
        warnings.warn(f"PESQ could not score a clip ({exc}); counted as NaN", stacklevel=2)
        return math.nan


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB."""
    reference, estimate = align(reference, estimate)
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    scale = np.dot(estimate, reference) / max(np.dot(reference, reference), 1e-12)
    target = scale * reference
    noise = estimate - target
    return float(10 * np.log10(max(np.dot(target, target), 1e-12) / max(np.dot(noise, noise), 1e-12)))


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-noise ratio of estimate against reference in dB; inf when they are identical."""
    reference, estimate = align(reference, estimate)
    noise = float(np.sum((reference - estimate) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-20) / noise)


def codebook_usage(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Share of the codebook used and the perplexity of the code distribution (codebook_size at best)."""
    codes = np.asarray(codes).ravel()
    if codes.size == 0:
        raise ValueError("no codes to count")
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"codes outside [0, {codebook_size})")
    counts = np.bincount(codes.astype(np.int64), minlength=codebook_size).astype(np.float64)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return {"share_used": float((counts > 0).mean()),
            "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero))))}


def code_repeat(sequences: list[np.ndarray]) -> float:
    """Share of frames whose code equals the previous frame's, over code sequences (one per utterance).

    A unigram perplexity says how many codes a codec uses; this says how predictable its code sequence is from
    one frame to the next: a steady sound that keeps its code is cheap for a SpeechLM to continue."""
    pairs = [np.asarray(codes).ravel() for codes in sequences]
    total = sum(max(len(codes) - 1, 0) for codes in pairs)
    if total == 0:
        raise ValueError("no pair of consecutive codes to compare")
    return float(sum(int((codes[1:] == codes[:-1]).sum()) for codes in pairs) / total)
