"""`python train.py stage=codec`: train the neural audio codec on random crops of the corpus named by `data`.

Reads: cfg.data (any source of the data layer), cfg.codec (model, loss, optim and train sections).
Writes into the run folder: checkpoints/last.ckpt (carries its config), codec.pt (the bare generator and its
config, what the tokenize stage, export and the server load), metrics.json and samples/.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from voxlm.codec.module import CodecModule
from voxlm.data.dataset import build_dataset, collate_utterances
from voxlm.runs import write_metrics
from voxlm.training import build_trainer, config_dict, fit, seed_everything

log = logging.getLogger(__name__)


def train_loaders(cfg: DictConfig) -> tuple[DataLoader, DataLoader, list[str]]:
    """Shuffled random-crop batches for training; fixed crops of the first utterances for validation; the
    training speakers (sorted), which the speaker adversary names."""
    train = cfg.codec.train
    sample_rate = int(cfg.codec.model.sample_rate)
    crop_samples = int(train.crop_seconds * sample_rate)
    train_set = build_dataset(cfg.data, "train", sample_rate=sample_rate)
    val_set = build_dataset(cfg.data, "val", sample_rate=sample_rate)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    train_loader = DataLoader(
        train_set, batch_size=int(train.batch_size), shuffle=True, drop_last=True,
        num_workers=int(train.num_workers), persistent_workers=int(train.num_workers) > 0,
        collate_fn=partial(collate_utterances, crop_samples=crop_samples), generator=generator,
    )
    # Validation takes the first seconds of each clip: the same audio every time, so its losses, samples
    # and mel images are comparable across the run.
    val_loader = DataLoader(
        val_set, batch_size=int(train.batch_size), shuffle=False,
        collate_fn=partial(leading_crop_collate, crop_samples=int(train.val_crop_seconds * sample_rate)),
    )
    return train_loader, val_loader, sorted(set(train_set.speakers))


def leading_crop_collate(batch: list, crop_samples: int) -> dict | None:
    """Padded batch cut to its first crop_samples (deterministic, unlike training's random crops)."""
    batch = collate_utterances(batch)
    if batch is not None:
        batch["cropped"] = batch["lengths"] > crop_samples
        batch["audio"] = batch["audio"][:, :crop_samples]
        batch["lengths"] = batch["lengths"].clamp(max=crop_samples)
    return batch


def run(cfg: DictConfig, run_dir: Path) -> None:
    seed_everything(cfg)
    torch.set_float32_matmul_precision("high")
    train_loader, val_loader, speakers = train_loaders(cfg)
    module = CodecModule(
        model_cfg=config_dict(cfg.codec.model), loss_cfg=config_dict(cfg.codec.loss),
        optim_cfg=config_dict(cfg.codec.optim), log_cfg=config_dict(cfg.codec.log), speakers=speakers,
    )
    trainer = build_trainer(cfg, run_dir)
    fit(trainer, module, run_dir, train_dataloaders=train_loader, val_dataloaders=val_loader)
    codec_path = save_codec(module, Path(run_dir) / "codec.pt")
    write_metrics(run_dir, {"codec_checkpoint": str(codec_path), **module.training_summary()})
    log.info("codec written to %s", codec_path)


def save_codec(module: CodecModule, path: Path) -> Path:
    """The generator alone (no discriminators, no optimizer state) with the config that rebuilds it."""
    torch.save({"config": module.model_cfg, "state_dict": module.codec.state_dict()}, path)
    return path

