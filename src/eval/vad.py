"""Voice activity detection: Silero VAD (the ONNX model shipped in the silero-vad wheel) on the CPU.

Gives the speech segments of a clip and the points to trim its leading and trailing silence: the TTS
evaluation measures how much silence a model leaves around its speech, and the server and RLHF rewards use
the trim points. Runs ~180x real time on one core, in 32 ms windows at 16 kHz.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from voxlm.data.audio import resample

VAD_SAMPLE_RATE = 16000


class SileroVad:
    """Loaded once. Not thread-safe: the ONNX wrapper keeps recurrent state between windows."""

    def __init__(self, threshold: float = 0.5, min_speech_ms: int = 250, min_silence_ms: int = 100,
                 speech_pad_ms: int = 30) -> None:
        # Importing silero_vad calls torch.set_num_threads(1) for the whole process; undo that so a
        # training or serving process that loads the judge keeps its threads.
        threads = torch.get_num_threads()
        from silero_vad import get_speech_timestamps, load_silero_vad
        torch.set_num_threads(threads)

        with warnings.catch_warnings():  # silero_vad uses the deprecated importlib.resources.path
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = load_silero_vad(onnx=True)
        self._timestamps = get_speech_timestamps
        self.threshold = threshold
        self.min_speech_ms = min_speech_ms
        self.min_silence_ms = min_silence_ms
        self.speech_pad_ms = speech_pad_ms

    def segments(self, audio: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
        """Speech segments as (start, end) in seconds, padded by `speech_pad_ms` each side."""
        audio = resample(np.asarray(audio, dtype=np.float32), sample_rate, VAD_SAMPLE_RATE)
        if len(audio) == 0:
            return []
        found = self._timestamps(
            torch.from_numpy(np.ascontiguousarray(audio)), self.model, threshold=self.threshold,
            sampling_rate=VAD_SAMPLE_RATE, min_speech_duration_ms=self.min_speech_ms,
            min_silence_duration_ms=self.min_silence_ms, speech_pad_ms=self.speech_pad_ms)
        return [(s["start"] / VAD_SAMPLE_RATE, s["end"] / VAD_SAMPLE_RATE) for s in found]

    def speech_bounds(self, audio: np.ndarray, sample_rate: int) -> tuple[float, float] | None:
        """(start of the first speech, end of the last speech) in seconds; None when there is no speech."""
        found = self.segments(audio, sample_rate)
        if not found:
            return None
        return found[0][0], min(found[-1][1], len(audio) / sample_rate)

    def trim(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """The clip without its leading and trailing silence (empty when there is no speech at all)."""
        bounds = self.speech_bounds(audio, sample_rate)
        if bounds is None:
            return audio[:0]
        return audio[int(bounds[0] * sample_rate): int(round(bounds[1] * sample_rate))]
