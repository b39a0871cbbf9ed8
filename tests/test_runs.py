"""Run folders: layout, the `latest` pointer, resumed runs keeping their previous config, metrics merging,
and the error a user gets when a named run does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from voxlm.runs import find_run, prepare_run, resume_checkpoint, write_metrics


def run_config(root: Path, run_name: str, lr: float = 1e-3):
    return OmegaConf.create({
        "run_name": run_name, "stage": {"name": "codec"}, "lr": lr,
        "paths": {"runs_dir": str(root / "runs"), "run_dir": "${paths.runs_dir}/${stage.name}/${run_name}"},
    })


def test_prepare_run_layout_and_latest(tmp_path: Path) -> None:
    first = prepare_run(run_config(tmp_path, "a"))
    assert (first / "config.yaml").exists()
    assert (first / "checkpoints").is_dir() and (first / "samples").is_dir()
    assert OmegaConf.load(first / "config.yaml").paths.run_dir == str(tmp_path / "runs/codec/a")
    second = prepare_run(run_config(tmp_path, "b"))
    latest = tmp_path / "runs/codec/latest"
    assert latest.is_symlink() and latest.resolve() == second.resolve()
    assert find_run("latest", tmp_path / "runs", "codec") == second.resolve()
    assert find_run("a", tmp_path / "runs", "codec") == first.resolve()
    assert find_run(str(first), tmp_path / "runs", "codec") == first.resolve()


def test_resumed_run_with_changed_config_keeps_previous(tmp_path: Path) -> None:
    run_dir = prepare_run(run_config(tmp_path, "a", lr=1e-3))
    assert resume_checkpoint(run_dir) is None
    (run_dir / "checkpoints/last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(run_dir) == run_dir / "checkpoints/last.ckpt"
    prepare_run(run_config(tmp_path, "a", lr=1e-3))
    assert not (run_dir / "config.yaml.prev").exists(), "an unchanged config is not a change"
    prepare_run(run_config(tmp_path, "a", lr=5e-4))
    assert OmegaConf.load(run_dir / "config.yaml.prev").lr == 1e-3
    assert OmegaConf.load(run_dir / "config.yaml").lr == 5e-4


def test_metrics_merge(tmp_path: Path) -> None:
    write_metrics(tmp_path, {"loss": 1.0, "steps": 10})
    write_metrics(tmp_path, {"loss": 0.5})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"loss": 0.5, "steps": 10}


def test_missing_run_error_names_what_exists(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="stage=codec"):
        find_run("latest", tmp_path / "runs", "codec")
    prepare_run(run_config(tmp_path, "quick"))
    with pytest.raises(FileNotFoundError, match="quick"):
        find_run("nope", tmp_path / "runs", "codec")
