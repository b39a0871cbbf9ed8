"""The train.py command line: stage listing, errors for a missing or unknown stage, and Hydra composition
of every stage x experiment with all interpolations resolved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_config
from hydra.utils import get_method
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_stages_exist() -> None:
    assert {"codec", "tokenize"} <= set(train.available_stages())


def test_missing_stage_lists_stages() -> None:
    result = run_train()
    assert result.returncode == 2
    assert "missing stage=<name>" in result.stderr
    for stage in train.available_stages():
        assert stage in result.stderr


def test_unknown_stage_lists_stages() -> None:
    result = run_train("stage=dance", "experiment=tiny")
    assert result.returncode == 2
    assert "unknown stage 'dance'" in result.stderr
    assert "codec" in result.stderr


def test_help_lists_stages() -> None:
    result = run_train("--help")
    assert result.returncode == 0
    assert "stages:" in result.stdout and "codec" in result.stdout


def test_unknown_override_is_a_clear_error() -> None:
    result = run_train("stage=codec", "experiment=tiny", "codec=nonexistent")
    assert result.returncode != 0
    assert "nonexistent" in result.stderr


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", train.available_stages())
def test_every_stage_and_experiment_composes(stage: str, experiment: str, tmp_path: Path) -> None:
    cfg = train_config(f"stage={stage}", f"experiment={experiment}", f"paths.root_dir={tmp_path}")
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation must resolve
    assert resolved["stage"]["name"] == stage
    assert resolved["paths"]["run_dir"] == f"{tmp_path}/runs/{stage}/{cfg.run_name}"
    assert callable(get_method(cfg.stage.run))
    # The interleaved recipes align with DPO, the algorithm measured on them.
    interleaved = resolved["speechlm"]["tokenizer"]["interleave"]
    assert resolved["algorithm"]["name"] == ("dpo" if interleaved else "grpo")
