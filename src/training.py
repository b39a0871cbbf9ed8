"""Lightning plumbing shared by the training stages: logger and trainer from config, checkpoints in the
run folder, and fit() that resumes from the run's last checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from voxlm.runs import resume_checkpoint, write_metrics

log = logging.getLogger(__name__)


def build_logger(logger_cfg: DictConfig | None, run_dir: Path) -> Any:
    """The experiment logger named by config, or False for `logger=none`."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return False
    if "WandbLogger" in logger_cfg._target_:
        # Offline unless the user set a mode: no account and no network are needed to train.
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    return instantiate(logger_cfg)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[Callback] | None = None) -> L.Trainer:
    """A Trainer from cfg.trainer that checkpoints into run_dir/checkpoints (last.ckpt for resume)."""
    checkpoint = ModelCheckpoint(
        dirpath=Path(run_dir) / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.stage.get("checkpoint_every_n_steps", 200),
    )
    logger = build_logger(cfg.get("logger"), run_dir)
    return instantiate(cfg.trainer, logger=logger, callbacks=[checkpoint, *(callbacks or [])])


def resolve_precision(precision: str | None, accelerator: str) -> str | None:
    """A Lightning precision for a recipe's `precision` setting: None keeps the trainer's own; `auto` is
    bf16-mixed on a GPU or on a CPU with native bf16 dot products (AVX512-BF16 or AMX), where it trains
    small models ~1.6x faster than float32, and 32-true on other CPUs, where bf16 is emulated and slower."""
    if precision != "auto":
        return precision
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "32-true"
    return "bf16-mixed"


def fit(trainer: L.Trainer, module: L.LightningModule, run_dir: Path, **loaders: Any) -> None:
    """Train, resuming from run_dir's last checkpoint when there is one; always leave a last.ckpt."""
    ckpt_path = resume_checkpoint(run_dir)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, ckpt_path=str(ckpt_path) if ckpt_path else None, **loaders)
    # A run that ends between checkpoint intervals still leaves its final state to resume or load.
    trainer.save_checkpoint(Path(run_dir) / "checkpoints" / "last.ckpt")
    write_metrics(run_dir, {"global_step": trainer.global_step, **scalar_metrics(trainer)})


def scalar_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The trainer's last logged scalar metrics as plain floats."""
    return {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if isinstance(value, torch.Tensor) and value.numel() == 1
    }


def seed_everything(cfg: DictConfig) -> None:
    """Seed python, numpy and torch from cfg.seed (dataloader workers too)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy of a config subtree, to store inside checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
