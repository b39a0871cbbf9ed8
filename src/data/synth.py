"""The offline speech engines the corpus is made from: flite, festival and espeak-ng (Debian packages).

`synthesize(speaker, items, sample_rate)` speaks a list of (id, text) with one speaker and returns mono float32
audio at `sample_rate` per id; an utterance the engine fails on is returned as an error string, never raised,
so one bad sentence cannot stop a corpus build. festival speaks a whole list in one process (its start-up
costs ~0.2 s); flite and espeak-ng start in milliseconds, one process per utterance.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxlm.data.audio import load_audio

ENGINES = ("flite", "festival", "espeak")
ENGINE_BINARIES = {"flite": "flite", "festival": "festival", "espeak": "espeak-ng"}
FESTIVAL_VOICES = {"kal": "voice_kal_diphone", "ked": "voice_ked_diphone",
                   "slt_hts": "voice_cmu_us_slt_arctic_hts"}


@dataclass(frozen=True)
class Speaker:
    """One voice of the corpus: an engine's voice with fixed settings (pitch, rate) that make it distinct.

    params, by engine: flite {f0_mean: Hz, duration_stretch}; festival {duration_stretch};
    espeak {pitch: 0-99, speed: words per minute}. `duration_jitter` varies speaking rate per utterance
    by up to +-jitter (as a fraction), deterministically from the utterance id.
    """

    id: str
    engine: str
    voice: str
    params: dict = field(default_factory=dict)
    duration_jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"speaker {self.id}: unknown engine '{self.engine}' (choose from {ENGINES})")
        if self.engine == "festival" and self.voice not in FESTIVAL_VOICES:
            raise ValueError(f"speaker {self.id}: unknown festival voice '{self.voice}' "
                             f"(choose from {sorted(FESTIVAL_VOICES)})")


def check_engines(speakers: list[Speaker]) -> None:
    """Fail early, naming the Debian package to install, when an engine a speaker needs is missing."""
    for engine in sorted({s.engine for s in speakers}):
        if shutil.which(ENGINE_BINARIES[engine]) is None:
            package = {"flite": "flite", "festival": "festival", "espeak": "espeak-ng"}[engine]
            raise RuntimeError(f"{ENGINE_BINARIES[engine]} is not installed: `apt-get install {package}` "
                               "(scripts/setup.sh installs every engine the corpus uses)")


def rate_factor(speaker: Speaker, utterance_id: str) -> float:
    """A per-utterance duration factor in [1 - jitter, 1 + jitter], stable for a given id."""
    if not speaker.duration_jitter:
        return 1.0
    unit = (int.from_bytes(utterance_id.encode(), "little") * 2654435761 % 2**32) / 2**32
    return 1.0 + speaker.duration_jitter * (2 * unit - 1)


def _run(command: list[str], timeout: float) -> str | None:
    """Run an engine; None on success, else a short error message."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if result.returncode != 0:
        return f"exit {result.returncode}: {result.stderr.strip()[-200:]}"
    return None


def _flite(speaker: Speaker, text: str, path: Path, utterance_id: str) -> str | None:
    stretch = speaker.params.get("duration_stretch", 1.0) * rate_factor(speaker, utterance_id)
    command = ["flite", "-voice", speaker.voice, "-t", text, "-o", str(path),
               "--setf", f"duration_stretch={stretch:.3f}"]
    if "f0_mean" in speaker.params:
        command += ["--setf", f"int_f0_target_mean={speaker.params['f0_mean']}"]
    return _run(command, timeout=60)


def _espeak(speaker: Speaker, text: str, path: Path, utterance_id: str) -> str | None:
    speed = speaker.params.get("speed", 160) / rate_factor(speaker, utterance_id)
    command = ["espeak-ng", "-v", speaker.voice, "-p", str(speaker.params.get("pitch", 50)),
               "-s", str(int(round(speed))), "-w", str(path), text]
    return _run(command, timeout=60)


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_batch(speaker: Speaker, items: list[tuple[str, str]], folder: Path) -> str | None:
    """Speak every item in one festival process through a Scheme script; missing files mark failures."""
    lines = [f"({FESTIVAL_VOICES[speaker.voice]})"]
    for utterance_id, text in items:
        stretch = speaker.params.get("duration_stretch", 1.0) * rate_factor(speaker, utterance_id)
        lines += [
            f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
            # unwind-protect: a sentence festival chokes on is skipped, the rest of the batch goes on
            f"(unwind-protect (utt.save.wave (utt.synth (Utterance Text {_scheme_string(text)})) "
            f"{_scheme_string(str(folder / (utterance_id + '.wav')))} 'riff) nil)",
        ]
    script = folder / "batch.scm"
    script.write_text("\n".join(lines) + "\n")
    return _run(["festival", "-b", str(script)], timeout=30 + 10 * len(items))


def synthesize(speaker: Speaker, items: list[tuple[str, str]], sample_rate: int,
               ) -> dict[str, np.ndarray | str]:
    """Speak (id, text) items with one speaker: id -> audio at sample_rate, or id -> an error message."""
    results: dict[str, np.ndarray | str] = {}
    with tempfile.TemporaryDirectory(prefix="voxlm-synth-") as tmp:
        folder = Path(tmp)
        batch_error = _festival_batch(speaker, items, folder) if speaker.engine == "festival" else None
        for utterance_id, text in items:
            path = folder / f"{utterance_id}.wav"
            if speaker.engine == "flite":
                error = _flite(speaker, text, path, utterance_id)
            elif speaker.engine == "espeak":
                error = _espeak(speaker, text, path, utterance_id)
            else:
                error = None if path.exists() else (batch_error or "festival wrote no audio")
            if error is None:
                try:
                    audio, _ = load_audio(path, sample_rate)
                except ValueError as exc:  # an unreadable or empty file from the engine
                    error = str(exc)
            results[utterance_id] = error if error is not None else audio
    return results
