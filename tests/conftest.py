"""Session-scoped fixtures: the tiny corpus is synthesized once (real flite/festival/espeak-ng speech, a few
seconds) and shared by every test that needs real data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module, for tests of its functions (registered in sys.modules, where its
    dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def train_config(*overrides: str) -> DictConfig:
    """configs/train.yaml with overrides (stage=... first), as train.py composes it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


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
    """The judge every evaluation and reward uses: as configs/train.yaml's `judges.asr` describes it."""
    from voxlm.eval.asr import WhisperJudge

    return WhisperJudge.from_config(train_config("stage=sft").judges.asr)


@pytest.fixture(scope="session")
def speaker_judge() -> SpeakerJudge:
    from voxlm.eval.speaker import SpeakerJudge

    return SpeakerJudge()


@pytest.fixture(scope="session")
def dnsmos() -> DnsmosJudge:
    from voxlm.eval.dnsmos import DnsmosJudge

    return DnsmosJudge()


# ---- the tiny pipeline through the real command lines: codec -> tokenize -> pretrain -> sft -> export ----
# Session-scoped: the stage tests check each step, the server tests serve what they made.

PRETRAIN_STEPS = 6


@pytest.fixture(scope="session")
def workspace(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs/ tree of its own (the codec/tokenize tests move `latest` pointers in theirs), reading the
    shared tiny corpus."""
    return tmp_path_factory.mktemp("speechlm-stages")


def train(workspace: Path, tiny_corpus: Path, stage: str, *overrides: str) -> str:
    """`python train.py stage=<stage> experiment=tiny ...` in the workspace; its output."""
    args = [f"stage={stage}", "experiment=tiny", f"paths.root_dir={workspace}",
            f"paths.data_dir={tiny_corpus.parent}", *overrides]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"train.py {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def shards(workspace: Path, tiny_corpus: Path) -> Path:
    # with its CTC head, so that tokenize stores word timings and pretraining can cut phrases
    train(workspace, tiny_corpus, "codec", "codec.train.max_steps=2", "codec.train.val_check_interval=2",
          "codec.loss.weights.ctc=1.0")
    train(workspace, tiny_corpus, "tokenize", "stage.splits=[train,val]")
    return workspace / "runs/tokenize/tiny/shards"


@pytest.fixture(scope="session")
def pretrain_run(workspace: Path, tiny_corpus: Path, shards: Path) -> Path:
    train(workspace, tiny_corpus, "pretrain", "run_name=slm", f"speechlm.pretrain.max_steps={PRETRAIN_STEPS}",
          "speechlm.pretrain.val_check_interval=3", "speechlm.pretrain.mixture.phrase=0.3")
    return workspace / "runs/pretrain/slm"


@pytest.fixture(scope="session")
def sft_runs(workspace: Path, tiny_corpus: Path, pretrain_run: Path) -> dict[str, Path]:
    train(workspace, tiny_corpus, "sft", "run_name=full", "stage.pretrain_run=slm")
    # LoRA in bf16-mixed (the CPU autocast path that the quickstart takes on CPUs with native bf16), with a
    # fifth of its input codes made wrong, from its third step a third of its target codes its own, and
    # half of each code label's target its neighbours on the FSQ grid.
    train(workspace, tiny_corpus, "sft", "run_name=lora", "stage.pretrain_run=slm",
          "speechlm.lora.enabled=true", "speechlm.sft.precision=bf16-mixed", "speechlm.sft.code_noise=0.2",
          "speechlm.sft.scheduled_sampling.share=0.3", "speechlm.sft.scheduled_sampling.ramp_steps=2",
          "speechlm.sft.scheduled_sampling.passes=2", "speechlm.sft.grid_smoothing.weight=0.5")
    return {"full": workspace / "runs/sft/full", "lora": workspace / "runs/sft/lora"}


def export(workspace: Path, tiny_corpus: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = ["experiment=tiny", f"paths.root_dir={workspace}", f"paths.data_dir={tiny_corpus.parent}",
            "parity.utterances=2", f"voices_dir={workspace / 'voices'}", *overrides]
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


@pytest.fixture(scope="session")
def artifact_dir(workspace: Path, tiny_corpus: Path, sft_runs: dict[str, Path], tiny_voices: Path) -> Path:
    """The tiny SFT model and codec exported, with the tiny corpus's voices."""
    out = workspace / "artifacts/tiny"
    result = export(workspace, tiny_corpus, f"speechlm={sft_runs['full']}", f"out={out}",
                    f"voices_dir={tiny_voices}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---- a real HTTP server (uvicorn on a free port, in this process) on the tiny artifact ----

@pytest.fixture(scope="session")
def tiny_voices(workspace: Path, tiny_corpus: Path, shards: Path) -> Path:
    """One saved voice per train speaker of the tiny corpus, encoded by the tiny codec."""
    out = workspace / "voices"
    args = ["experiment=tiny", f"paths.root_dir={workspace}", f"paths.data_dir={tiny_corpus.parent}",
            f"voices.out={out}", "voices.min_seconds=0.5", "voices.max_seconds=6"]
    result = subprocess.run([sys.executable, str(ROOT / "scripts/make_voices.py"), *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def serve_config(*overrides: str) -> DictConfig:
    """configs/serve.yaml with overrides, as serve.py composes it."""
    sys.path.insert(0, str(ROOT))
    from serve import compose_config

    return compose_config(list(overrides))


@dataclass
class RunningServer:
    url: str
    server: object          # voxlm.serve.server.Server: its engine, backend, metrics
    uvicorn: object
    thread: threading.Thread

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


def start_server(*overrides: str) -> RunningServer:
    import uvicorn

    from voxlm.serve.process import free_port
    from voxlm.serve.server import build_server

    port = free_port()
    server = build_server(serve_config(f"port={port}", *overrides))
    config = uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not runner.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", server, runner, thread)


# Greedy decoding: every request's audio is a function of its text and voice, so tests can compare them;
# and a tighter length guard, since the tiny model rarely says [speech_end] by itself.
GREEDY = ("sampling.do_sample=false", "sampling.repetition_penalty=1.0", "api.base_seconds=0.5",
          "api.seconds_per_text_token=0.15")


@pytest.fixture(scope="session")
def max_server(artifact_dir: Path, tiny_voices: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The MAX backend on the tiny artifact, voices from the tiny corpus, a small pool and queue (so the
    tests reach their limits), greedy decoding."""
    writable = tmp_path_factory.mktemp("served-voices")
    for voice in tiny_voices.iterdir():  # the server saves uploads here; start it with the corpus voices
        (writable / voice.name).mkdir()
        for file in voice.iterdir():
            (writable / voice.name / file.name).write_bytes(file.read_bytes())
    running = start_server(f"artifact={artifact_dir}", f"api.voices_dir={writable}",
                           "engine.max_active_streams=4", "engine.max_queue=4", *GREEDY)
    yield running
    running.stop()
