"""Session-scoped fixtures: the tiny corpus is synthesized once (real flite/festival/espeak-ng speech, a few
seconds) and shared by every test that needs real data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
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
