"""The speaker-similarity judge: resemblyzer's GE2E voice encoder (shipped inside its wheel) on the CPU.

A clip becomes one 256-dimensional, L2-normalized embedding (the mean of its 1.6 s partial windows);
similarity is the cosine of two embeddings. Measured here: same voice ~0.86, different voices ~0.54.
Used to check that a cloned voice matches its prompt (TTS evaluation, RLHF reward).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from voxlm.data.audio import resample

ENCODER_SAMPLE_RATE = 16000  # resemblyzer.hparams.sampling_rate


class SpeakerJudge:
    """Loaded once; embeds many clips in one batched forward pass of all their partial windows."""

    def __init__(self, device: str = "cpu") -> None:
        with warnings.catch_warnings():
            # webrtcvad (imported by resemblyzer) warns that pkg_resources is deprecated; not ours to fix.
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder, preprocess_wav
            from resemblyzer.audio import wav_to_mel_spectrogram
        self.encoder = VoiceEncoder(device=device, verbose=False).eval()
        self._preprocess = preprocess_wav
        self._mel = wav_to_mel_spectrogram

    def _partial_mels(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """[partials, 160 frames, 40 mels] for one clip, the way VoiceEncoder.embed_utterance slices it."""
        wav = resample(np.asarray(audio, dtype=np.float32), sample_rate, ENCODER_SAMPLE_RATE)
        # Level normalization and shortening of long pauses, as the encoder was trained; a clip with no
        # voice at all would be trimmed to nothing, so keep it whole then.
        processed = self._preprocess(wav)
        wav = processed if len(processed) > 0 else wav
        if len(wav) == 0:
            raise ValueError("cannot embed an empty clip")
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), rate=1.3, min_coverage=0.75)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = self._mel(wav)
        return np.stack([mel[s] for s in mel_slices])

    @torch.inference_mode()
    def embed(self, audios: list[np.ndarray], sample_rate: int) -> np.ndarray:
        """Unit-norm speaker embeddings [N, 256], one per clip."""
        partials = [self._partial_mels(audio, sample_rate) for audio in audios]
        if not partials:
            return np.zeros((0, 256), dtype=np.float32)
        mels = torch.from_numpy(np.concatenate(partials)).to(self.encoder.device)
        partial_embeds = self.encoder(mels).cpu().numpy()
        bounds = np.cumsum([0] + [len(p) for p in partials])
        means = np.stack([partial_embeds[start:stop].mean(axis=0)
                          for start, stop in zip(bounds[:-1], bounds[1:], strict=True)])
        return means / np.linalg.norm(means, axis=1, keepdims=True)

    def similarities(self, audios_a: list[np.ndarray], audios_b: list[np.ndarray],
                     sample_rate: int) -> np.ndarray:
        """Cosine similarity of each pair (audios_a[i], audios_b[i]), embedded in one batch: [N]."""
        if len(audios_a) != len(audios_b):
            raise ValueError(f"{len(audios_a)} clips against {len(audios_b)}")
        embeddings = self.embed(list(audios_a) + list(audios_b), sample_rate)
        a, b = embeddings[: len(audios_a)], embeddings[len(audios_a):]
        return np.sum(a * b, axis=1)

    def similarity(self, audio_a: np.ndarray, audio_b: np.ndarray, sample_rate: int) -> float:
        """Cosine similarity of two clips' speaker embeddings (1 = same embedding)."""
        return float(self.similarities([audio_a], [audio_b], sample_rate)[0])
