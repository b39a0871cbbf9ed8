"""Session-scoped fixtures: the tiny corpus is synthesized once (real flite/festival/espeak-ng speech, a few
seconds) and shared by every test that needs real data."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import soundfile as sf
from hydra import compose, initialize_config_dir

if TYPE_CHECKING:  # the judges load heavy libraries: imported when a test first asks for one
    from voxlm.eval.asr import WhisperJudge
    from voxlm.eval.dnsmos import DnsmosJudge
    from voxlm.eval.speaker import SpeakerJudge
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def corpus_config(preset: str, out: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("build_corpus", overrides=[f"corpus={preset}", f"out={out}", *overrides])


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny corpus at <tmp>/data/corpus-tiny: where `experiment=tiny paths.root_dir=<tmp>` looks."""
    from voxlm.data.corpus import build_corpus

    root = tmp_path_factory.mktemp("voxlm")
    out = root / "data" / "corpus-tiny"
    build_corpus(corpus_config("tiny", out))
    return out


# ---- real speech and the judges, shared by the evaluation and reward tests ----

SENTENCE_A = "The little boat drifted slowly across the quiet lake at sunset."
SENTENCE_B = "Please remember to close the kitchen window before you leave for work."


def speak(path: Path, engine: str, voice: str, text: str) -> tuple[np.ndarray, int]:
    """Synthesize `text` with flite or espeak-ng into the wav `path` and read it back."""
    if engine == "flite":
        command = ["flite", "-voice", voice, "-t", text, "-o", str(path)]
    else:
        command = ["espeak-ng", "-v", voice, "-w", str(path), text]
    subprocess.run(command, check=True, capture_output=True)
    audio, sample_rate = sf.read(path, dtype="float32")
    return audio, sample_rate


def white_noise(seconds: float, sample_rate: int, std: float = 0.1, seed: int = 0) -> np.ndarray:
    return (std * np.random.default_rng(seed).standard_normal(int(seconds * sample_rate))).astype(np.float32)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, int]]:
    tmp = tmp_path_factory.mktemp("speech")
    voices = {"rms_a": ("flite", "rms", SENTENCE_A), "rms_b": ("flite", "rms", SENTENCE_B),
              "slt_a": ("flite", "slt", SENTENCE_A), "slt_b": ("flite", "slt", SENTENCE_B),
              "espeak_a": ("espeak", "en-us", SENTENCE_A)}  # 22.05 kHz: exercises resampling
    return {name: speak(tmp / f"{name}.wav", *voice) for name, voice in voices.items()}


@pytest.fixture(scope="session")
def whisper() -> WhisperJudge:
    from voxlm.eval.asr import WhisperJudge

    return WhisperJudge()


@pytest.fixture(scope="session")
def speaker_judge() -> SpeakerJudge:
    from voxlm.eval.speaker import SpeakerJudge

    return SpeakerJudge()


@pytest.fixture(scope="session")
def dnsmos() -> DnsmosJudge:
    from voxlm.eval.dnsmos import DnsmosJudge

    return DnsmosJudge()
