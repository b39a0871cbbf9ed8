"""The offline speech engines the corpus is made from: flite, festival and espeak-ng (Debian packages).

A `Speaker` is one engine voice with fixed settings (pitch, rate) that make it a distinct voice.
`synthesize(speaker, items, sample_rate, seed)` speaks a list of (id, text) with one speaker and returns
mono float32 audio at `sample_rate` per id; an utterance the engine fails on comes back as an error string,
never raised, so one bad sentence cannot stop a corpus build. festival speaks a whole list in one process
(its start-up costs ~0.2 s); flite and espeak-ng start in milliseconds, one process per utterance.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxlm.data.audio import load_audio

ENGINES = ("flite", "festival", "espeak")
BINARIES = {"flite": "flite", "festival": "festival", "espeak": "espeak-ng"}
PACKAGES = {"flite": "flite", "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
            "espeak": "espeak-ng"}
# festival voices are Scheme functions; the HTS voice takes its rate from the HTS engine and has no pitch
# setting that takes effect (measured), the diphone voices take both through Duration_Stretch/int_lr_params.
FESTIVAL_VOICES = {"voice_kal_diphone": "diphone", "voice_ked_diphone": "diphone",
                   "voice_cmu_us_slt_arctic_hts": "hts"}
# What each engine's params may set (see Speaker).
PARAMS = {"flite": {"f0_mean", "duration_stretch"}, "festival": {"f0_mean", "duration_stretch"},
          "espeak": {"pitch", "speed"}}
ENGINE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Speaker:
    """One voice of the corpus.

    voice, by engine: flite a voice name (awb, rms, slt, kal16); festival a voice function
    (voice_kal_diphone, ...); espeak-ng '<accent>+<variant>' (en-gb+f4).
    params, by engine: flite {f0_mean: Hz, duration_stretch}; festival {duration_stretch, f0_mean: Hz
    (diphone voices only)}; espeak {pitch: 0-99, speed: words per minute}.
    duration_jitter varies the speaking rate per utterance by up to +-jitter (a fraction), deterministically
    from the seed and the utterance id. weight is the speaker's share of its engine's training hours.
    """

    id: str
    engine: str
    voice: str
    params: dict = field(default_factory=dict)
    duration_jitter: float = 0.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        where = f"speaker '{self.id}'"
        if self.engine not in ENGINES:
            raise ValueError(f"{where}: unknown engine '{self.engine}' (choose from {', '.join(ENGINES)})")
        unknown = set(self.params) - PARAMS[self.engine]
        if unknown:
            raise ValueError(f"{where}: {self.engine} has no params {sorted(unknown)} "
                             f"(it takes {sorted(PARAMS[self.engine])})")
        if self.engine == "festival" and self.voice not in FESTIVAL_VOICES:
            raise ValueError(f"{where}: unknown festival voice '{self.voice}' "
                             f"(choose from {', '.join(FESTIVAL_VOICES)})")
        if self.engine == "festival" and FESTIVAL_VOICES[self.voice] == "hts" and "f0_mean" in self.params:
            raise ValueError(f"{where}: {self.voice} ignores f0_mean; vary it with duration_stretch")
        if not 0 <= self.duration_jitter < 1 or self.weight <= 0:
            raise ValueError(f"{where}: duration_jitter must be in [0, 1) and weight > 0 "
                             f"(got {self.duration_jitter}, {self.weight})")


def installed_voices(engine: str) -> set[str] | None:
    """Voice names the installed engine offers (espeak: '<accent>' and '+<variant>'); None where the
    engine cannot list them (festival: its voices are checked by loading them)."""
    if engine == "flite":
        listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
        return set(listing.split(":", 1)[-1].split())
    if engine == "espeak":
        accents = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
        variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True,
                                  check=True).stdout
        return ({line.split()[1] for line in accents.splitlines()[1:]}
                | {"+" + line.split()[4].removeprefix("!v/") for line in variants.splitlines()[1:]})
    return None


def check_engines(speakers: list[Speaker]) -> None:
    """Fail before a build starts, saying what to install or fix, when an engine or a voice is missing."""
    for engine in sorted({s.engine for s in speakers}):
        if shutil.which(BINARIES[engine]) is None:
            raise RuntimeError(f"{BINARIES[engine]} is not installed: `apt-get install {PACKAGES[engine]}` "
                               "(scripts/setup.sh installs every engine the corpus uses)")
        voices = installed_voices(engine)
        for speaker in (s for s in speakers if s.engine == engine and voices is not None):
            accent, _, variant = speaker.voice.partition("+")
            missing = [v for v in ([accent, "+" + variant] if variant else [accent]) if v not in voices]
            if missing:
                # Name the installed voices that look like the one asked for, not all 230 of espeak's.
                near = sorted(v for v in voices if v[:2] == missing[0][:2]) or sorted(voices)
                raise ValueError(f"speaker '{speaker.id}': {engine} has no voice {missing[0].lstrip('+')!r} "
                                 f"(installed, e.g.: {' '.join(near)})")
    festival = sorted({s.voice for s in speakers if s.engine == "festival"})
    if festival:
        error = _run(["festival", "-b", *(f"({v})" for v in festival)], ENGINE_TIMEOUT_S)
        if error:
            raise RuntimeError(f"festival cannot load voices {festival} ({error}): "
                               f"`apt-get install {PACKAGES['festival']}`")


def duration_factor(speaker: Speaker, utterance_id: str, seed: int) -> float:
    """The speaker's duration stretch times a per-utterance jitter in [1 - j, 1 + j], stable for an id."""
    jitter = random.Random(f"{seed}/{utterance_id}").uniform(-1, 1) * speaker.duration_jitter
    return float(speaker.params.get("duration_stretch", 1.0)) * (1.0 + jitter)


def _run(command: list[str], timeout: float) -> str | None:
    """Run an engine; None on success, else a short error message."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if result.returncode != 0:
        return f"exit {result.returncode}: {(result.stderr or result.stdout).strip()[-200:]}"
    return None


def _flite(speaker: Speaker, text_file: Path, wav: Path, stretch: float) -> str | None:
    command = ["flite", "-voice", speaker.voice, "-f", str(text_file), "-o", str(wav),
               "--setf", f"duration_stretch={stretch:.3f}"]
    if "f0_mean" in speaker.params:
        command += ["--setf", f"int_f0_target_mean={speaker.params['f0_mean']}"]
    return _run(command, ENGINE_TIMEOUT_S)


def _espeak(speaker: Speaker, text_file: Path, wav: Path, stretch: float) -> str | None:
    speed = round(float(speaker.params.get("speed", 160)) / stretch)
    command = ["espeak-ng", "-v", speaker.voice, "-p", str(speaker.params.get("pitch", 50)), "-s", str(speed),
               "-f", str(text_file), "-w", str(wav)]
    return _run(command, ENGINE_TIMEOUT_S)


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_script(speaker: Speaker, items: list[tuple[str, str, Path]], seed: int) -> str:
    """One Scheme script that speaks every item; each utterance sets its own rate first."""
    lines = [f"({speaker.voice})"]
    if FESTIVAL_VOICES[speaker.voice] == "hts":
        lines.append("(define voxlm-hts-params hts_engine_params)")
    elif "f0_mean" in speaker.params:  # kal's and ked's int_lr_params list target_f0_mean first
        lines.append(f"(set! int_lr_params (cons '(target_f0_mean {speaker.params['f0_mean']}) "
                     "(cdr int_lr_params)))")
    for utterance_id, text, wav in items:
        stretch = duration_factor(speaker, utterance_id, seed)
        if FESTIVAL_VOICES[speaker.voice] == "hts":  # the HTS engine ignores Duration_Stretch; -r is its rate
            lines.append(f"(set! hts_engine_params (append voxlm-hts-params '((\"-r\" {1 / stretch:.3f}))))")
        else:
            lines.append(f"(Parameter.set 'Duration_Stretch {stretch:.3f})")
        # unwind-protect: a sentence festival chokes on is skipped, the rest of the batch goes on
        lines.append(f"(unwind-protect (utt.save.wave (utt.synth (Utterance Text {_scheme_string(text)})) "
                     f"{_scheme_string(str(wav))} 'riff) nil)")
    return "\n".join(lines) + "\n"


def synthesize(speaker: Speaker, items: list[tuple[str, str]], sample_rate: int, seed: int = 0,
               ) -> dict[str, np.ndarray | str]:
    """Speak (id, text) items with one speaker: id -> mono float32 audio at sample_rate, or id -> an error."""
    results: dict[str, np.ndarray | str] = {}
    with tempfile.TemporaryDirectory(prefix="voxlm-synth-") as tmp:
        folder = Path(tmp)
        wavs = {utterance_id: folder / f"{i}.wav" for i, (utterance_id, _) in enumerate(items)}
        batch_error = None
        if speaker.engine == "festival":
            script = folder / "batch.scm"
            script.write_text(_festival_script(speaker, [(u, t, wavs[u]) for u, t in items], seed))
            batch_error = _run(["festival", "-b", str(script)], timeout=ENGINE_TIMEOUT_S + 10 * len(items))
        for utterance_id, text in items:
            wav = wavs[utterance_id]
            if speaker.engine == "festival":
                error = None if wav.exists() else (batch_error or "festival wrote no audio")
            else:
                # Text goes through a file, so a sentence that starts with '-' is never read as an option.
                text_file = wav.with_suffix(".txt")
                text_file.write_text(text + "\n")
                speak = _flite if speaker.engine == "flite" else _espeak
                error = speak(speaker, text_file, wav, duration_factor(speaker, utterance_id, seed))
            if error is None:
                try:
                    results[utterance_id] = load_audio(wav, sample_rate)[0]
                    continue
                except ValueError as exc:  # an unreadable or empty file from the engine
                    error = str(exc)
            results[utterance_id] = error
    return results
