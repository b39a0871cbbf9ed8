"""The quality judge: Microsoft DNSMOS (P.835 SIG/BAK/OVRL and P.808 MOS) from the ONNX models that the
speechmos wheel ships, on the CPU.

DNSMOS scores 9.01 s windows at 16 kHz; a longer clip is scored in windows 1 s apart and averaged, as the
reference implementation does. A shorter clip is repeated to fill exactly one window: speechmos doubles it
until it is long enough, which for a 4 s clip means eight overlapping windows of the same repeated sound and
8x the cost for practically the same score. All windows of a batch of clips go through the models together.

It tells noise (OVRL ~1.1) from clean speech (2.6-3.2), not one TTS voice from another: a floor, not a rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxlm.data.audio import resample

DNSMOS_SAMPLE_RATE = 16000
WINDOW_SECONDS = 9.01
P808_FRAMES = 900  # the P.808 model's mel input is fixed at 900 frames of 10 ms


class DnsmosJudge:
    """Loaded once. `score` returns {"ovrl", "sig", "bak", "p808"} per clip (MOS scale, 1..5)."""

    def __init__(self, personalized: bool = False, hop_seconds: float = 1.0, batch_windows: int = 16) -> None:
        import speechmos
        from speechmos.dnsmos import DNSMOS

        root = Path(speechmos.__file__).parent
        primary = root / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
        # speechmos's DNSMOS object holds the two sessions, the mel features of P.808 and the published
        # polynomial calibration; only its window loop is replaced here.
        self.model = DNSMOS(str(primary), str(root / "dnsmos_models" / "model_v8.onnx"))
        self.personalized = personalized
        self.hop_seconds = hop_seconds
        self.batch_windows = batch_windows

    def _windows(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """[windows, 9.01 s] at 16 kHz for one clip."""
        audio = resample(np.asarray(audio, dtype=np.float32), sample_rate, DNSMOS_SAMPLE_RATE)
        if len(audio) == 0:
            raise ValueError("cannot score an empty clip")
        audio = np.clip(audio, -1.0, 1.0)  # the models were trained on [-1, 1] audio
        window = int(WINDOW_SECONDS * DNSMOS_SAMPLE_RATE)
        if len(audio) < window:
            return np.resize(audio, window)[None]
        hop = int(self.hop_seconds * DNSMOS_SAMPLE_RATE)
        starts = range(0, len(audio) - window + 1, hop)
        return np.stack([audio[s: s + window] for s in starts])

    def _run(self, windows: np.ndarray) -> np.ndarray:
        """[windows, 4] = sig, bak, ovrl (calibrated), p808 for a stack of windows."""
        raw = self.model.onnx_sess.run(None, {"input_1": windows})[0]
        sig, bak, ovrl = self.model.get_polyfit_val(raw[:, 0], raw[:, 1], raw[:, 2], self.personalized)
        mels = np.stack([self.model.audio_melspec(w[:-160]) for w in windows]).astype(np.float32)
        p808 = self.model.p808_onnx_sess.run(None, {"input_1": mels[:, :P808_FRAMES]})[0][:, 0]
        return np.stack([sig, bak, ovrl, p808], axis=1)

    def score(self, audios: list[np.ndarray], sample_rate: int) -> list[dict[str, float]]:
        """DNSMOS of each clip: {"ovrl", "sig", "bak", "p808"}, averaged over the clip's windows."""
        per_clip = [self._windows(audio, sample_rate) for audio in audios]
        if not per_clip:
            return []
        windows = np.concatenate(per_clip).astype(np.float32)
        scores = np.concatenate([self._run(windows[i: i + self.batch_windows])
                                 for i in range(0, len(windows), self.batch_windows)])
        bounds = np.cumsum([0] + [len(w) for w in per_clip])
        results = []
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            sig, bak, ovrl, p808 = scores[start:stop].mean(axis=0)
            results.append({"ovrl": float(ovrl), "sig": float(sig), "bak": float(bak), "p808": float(p808)})
        return results

    def score_one(self, audio: np.ndarray, sample_rate: int) -> dict[str, float]:
        """DNSMOS of one clip."""
        return self.score([audio], sample_rate)[0]
