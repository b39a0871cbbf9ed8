"""Voices: a reference recording's transcript and codec codes, the prompt the SpeechLM continues in its voice.

A voice is built once from a wav and its transcript (the audio goes through the same trim and loudness steps
as the training data, at the codec's sample rate, then the codec encoder) and saved as a small folder:

    <voices_dir>/<name>/voice.json     name, transcript, speaker, codec facts (codebook size, rates, and
                                       the fingerprint of the weights that give the codes)
                        codes.npy      int64 [frames]
                        reference.wav  the preprocessed audio that was encoded, to rebuild the voice with
                                       another codec

Codes only mean something to the codec that made them: two codecs of the same shape trained apart give the
same sound different codes. So a voice records its codec's fingerprint (`Codec.code_fingerprint`), and
`voice_for_codec` encodes a voice of another codec again from its reference.wav; one without a recording
is refused (`check_codec`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxlm.codec.model import Codec
from voxlm.data.audio import load_audio, save_audio
from voxlm.data.dataset import Preprocess

META_FILE = "voice.json"
CODES_FILE = "codes.npy"
REFERENCE_FILE = "reference.wav"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

log = logging.getLogger(__name__)


@dataclass
class Voice:
    name: str
    text: str            # what the reference says, as the SpeechLM reads it
    codes: np.ndarray = field(repr=False)  # int64 [frames]
    codebook_size: int
    frame_rate: float
    sample_rate: int
    speaker: str | None = None
    codec_id: str | None = None  # code_fingerprint of the codec that made the codes (None: saved before)

    @property
    def duration(self) -> float:
        return len(self.codes) / self.frame_rate

    def check_codec(self, codec: Codec) -> None:
        """Raise unless `codec` reads these codes: the codec that made them, or for a voice saved before
        voices named their codec, one with the same codebook and rates."""
        ours = (self.codebook_size, self.frame_rate, self.sample_rate)
        theirs = (codec.codebook_size, codec.frame_rate, codec.sample_rate)
        if ours != theirs:
            raise ValueError(
                f"voice '{self.name}' was encoded by a codec with (codes, frames/s, Hz) = {ours}, this codec "
                f"has {theirs}: rebuild the voice from its {REFERENCE_FILE} with this codec")
        if self.codec_id is not None and self.codec_id != (fingerprint := codec.code_fingerprint()):
            raise ValueError(
                f"voice '{self.name}' was encoded by another codec (fingerprint {self.codec_id}, this "
                f"codec's {fingerprint}): rebuild the voice from its {REFERENCE_FILE} with this codec")

    def save(self, folder: str | Path, reference_audio: np.ndarray | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(self).items() if k != "codes"}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        np.save(folder / CODES_FILE, np.asarray(self.codes, dtype=np.int64))
        if reference_audio is not None:
            save_audio(folder / REFERENCE_FILE, reference_audio, self.sample_rate)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Voice:
        folder = Path(folder)
        if not (folder / META_FILE).is_file() or not (folder / CODES_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a voice folder (needs {META_FILE} and {CODES_FILE})")
        meta = json.loads((folder / META_FILE).read_text())
        return cls(codes=np.load(folder / CODES_FILE).astype(np.int64), **meta)


def encode_voice(codec: Codec, audio_path: str | Path, text: str, name: str, speaker: str | None = None,
                 preprocess: Preprocess | None = None, encoder: Any = None) -> tuple[Voice, np.ndarray]:
    """(the voice, the preprocessed audio it encodes) from a recording of `text` in any format and rate."""
    if not text.strip():
        raise ValueError(f"a voice needs the transcript of {audio_path}")
    audio, rate = load_audio(audio_path, codec.sample_rate)
    if preprocess is not None:
        audio = preprocess(audio, rate)
    return voice_from_audio(codec, audio, text, name, speaker, encoder), audio


def voice_from_audio(codec: Codec, audio: np.ndarray, text: str, name: str, speaker: str | None = None,
                     encoder: Any = None, codec_id: str | None = None) -> Voice:
    """A voice from preprocessed audio at the codec's rate. `encoder`: what encodes it, e.g. the MAX
    encoder of an artifact (anything with the codec's `encode(audio [1, T]) -> codes [1, F]`); default the
    codec itself. `codec_id`: the codec's code_fingerprint, when the caller has it (one hash per codec)."""
    device = codec.quantizer.levels.device
    codes = (encoder or codec).encode(torch.from_numpy(audio)[None].to(device))[0]
    codes = codes.cpu().numpy().astype(np.int64)
    return Voice(name, text.strip(), codes, codec.codebook_size, codec.frame_rate, codec.sample_rate, speaker,
                 codec_id or codec.code_fingerprint())


def voice_for_codec(voice: Voice, codec: Codec, reference_audio: np.ndarray | None, encoder: Any = None,
                    codec_id: str | None = None) -> Voice:
    """`voice` in `codec`'s codes: as saved when this codec made them, else encoded again from its reference
    recording (a voice of another codec, or one saved before voices named their codec). A voice of another
    codec without its recording raises (`check_codec`); one whose codec is unknown is used as saved.
    `codec_id`: the codec's code_fingerprint, when the caller has it (callers going over many voices)."""
    codec_id = codec_id or codec.code_fingerprint()
    if voice.codec_id == codec_id:
        return voice
    if reference_audio is None:
        voice.check_codec(codec)
        log.warning("voice '%s' names no codec and has no %s to encode again: its codes are used as saved, "
                    "which is right only if this codec made them", voice.name, REFERENCE_FILE)
        return voice
    return voice_from_audio(codec, reference_audio, voice.text, voice.name, voice.speaker, encoder, codec_id)


def check_name(name: str) -> str:
    """A voice name is one plain folder name, never a path."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad voice name '{name}': use letters, digits, '_', '-' and '.'")
    return name


def list_voices(voices_dir: str | Path) -> list[str]:
    voices_dir = Path(voices_dir)
    if not voices_dir.is_dir():
        return []
    return sorted(p.name for p in voices_dir.iterdir() if (p / META_FILE).is_file())


def save_voice(voice: Voice, voices_dir: str | Path, reference_audio: np.ndarray | None = None) -> Path:
    """Save under <voices_dir>/<voice.name>/ (replacing a voice of that name)."""
    return voice.save(Path(voices_dir) / check_name(voice.name), reference_audio)


def voice_folder(reference: str | Path, voices_dir: str | Path) -> Path:
    """A voice's folder, by path or by name under voices_dir; the error lists the voices that exist."""
    path = Path(reference)
    if (path / META_FILE).is_file():
        return path
    named = Path(voices_dir) / str(reference)
    if (named / META_FILE).is_file():
        return named
    existing = list_voices(voices_dir)
    hint = f"voices in {voices_dir}: {', '.join(existing)}" if existing else (
        f"no voices saved in {voices_dir} yet")
    raise FileNotFoundError(
        f"no voice '{reference}' ({hint}); to clone a recording, pass voice=path/to/ref.wav "
        "voice_text=\"its transcript\"")


def load_voice(reference: str | Path, voices_dir: str | Path) -> Voice:
    """A voice by folder path or by name under voices_dir."""
    return Voice.load(voice_folder(reference, voices_dir))


@torch.no_grad()
def decoding_voice(codec: Codec, reference_audio: np.ndarray | None,
                   encoder: Any = None) -> torch.Tensor | None:
    """What a codec decodes a voice prompt's speech in: for a codec with a voice encoder (voice_dim > 0), the
    voice [1, voice_dim] of the prompt's reference recording (preprocessed, at the codec's rate); None for a
    codec without one, which decodes codes alone. `encoder`: what computes it, e.g. the MAX encoder of an
    artifact (anything with the codec's `voice(audio [1, T]) -> [1, voice_dim]`); default the codec itself."""
    if not codec.has_voice:
        return None
    if reference_audio is None:
        raise ValueError("this codec decodes in a voice (voice_dim > 0) and needs the voice's recording, the "
                         "prompt's reference clip: pass voice=ref.wav with its voice_text, or a saved voice "
                         "that kept its reference.wav")
    device = codec.quantizer.levels.device
    return (encoder or codec).voice(torch.from_numpy(reference_audio).float()[None].to(device))


def load_reference_audio(reference: str | Path, voices_dir: str | Path,
                         sample_rate: int) -> np.ndarray | None:
    """The recording a saved voice was encoded from, at `sample_rate`; None when it was saved without one.
    A codec with a voice encoder (voice_dim > 0) decodes in the voice of this recording."""
    path = voice_folder(reference, voices_dir) / REFERENCE_FILE
    return load_audio(path, sample_rate)[0] if path.is_file() else None
