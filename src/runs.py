"""Run folders: one per stage run, runs/<stage>/<run name>/, holding the resolved config, checkpoints,
metrics.json and samples, with a `latest` pointer per stage so a later stage finds an earlier one's output.
Re-running a stage with the same run name resumes it from checkpoints/last.ckpt."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LAST_CHECKPOINT = "checkpoints/last.ckpt"


def prepare_run(cfg: DictConfig) -> Path:
    """Create the run folder, write its resolved config and point runs/<stage>/latest at it."""
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        # Keep the first config of a resumed run beside the new one: a changed override is then visible.
        previous = OmegaConf.load(config_path)
        if previous != OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)):
            log.warning("run %s resumes with a changed config; the previous one is in %s.prev", run_dir,
                        CONFIG_FILE)
            config_path.replace(run_dir / f"{CONFIG_FILE}.prev")
    OmegaConf.save(cfg, config_path, resolve=True)
    point_latest(run_dir)
    return run_dir


def point_latest(run_dir: Path) -> None:
    """Atomically (re)point the stage's `latest` symlink at run_dir (relative, so the tree can move)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run."""
    path = Path(run_dir) / LAST_CHECKPOINT
    return path if path.exists() else None


def find_run(reference: str | Path, runs_dir: str | Path, stage: str) -> Path:
    """Resolve a run given as a folder path, a run name of `stage`, or 'latest'; error says what exists."""
    candidate = Path(reference)
    if candidate.is_dir():
        return candidate.resolve()
    stage_dir = Path(runs_dir) / stage
    candidate = stage_dir / str(reference)
    if candidate.is_dir():
        return candidate.resolve()
    existing = sorted(p.name for p in stage_dir.iterdir() if p.is_dir()) if stage_dir.is_dir() else []
    hint = f"runs of stage '{stage}': {', '.join(existing)}" if existing else (
        f"no '{stage}' run exists yet under {stage_dir}: run `python train.py stage={stage}` first")
    raise FileNotFoundError(f"cannot find the {stage} run '{reference}' ({hint})")


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """run_dir/metrics.json, or {} for a folder without one."""
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Merge `metrics` into run_dir/metrics.json (later values win) and return its path."""
    path = Path(run_dir) / METRICS_FILE
    merged = read_metrics(run_dir)
    merged.update(metrics)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=float) + "\n")
    return path


def load_run_config(run_dir: Path) -> DictConfig:
    """The resolved config a run was made with."""
    return OmegaConf.load(Path(run_dir) / CONFIG_FILE)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
