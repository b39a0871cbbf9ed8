"""Lightning training of the codec: a generator (codec + optional CTC head) against discriminators.

Each batch: reconstruct; from `adversarial_start_step` on, one discriminator step on real vs. generated
audio; then one generator step on weighted mel L1 + feature matching + adversarial + CTC losses. Before
`adversarial_start_step` the discriminators are not run at all, to save CPU. With a `stability` weight, the
latents' change from frame to frame is penalized too (voxlm.codec.losses.latent_change). With a
`speaker_adversary` weight (for codecs with a voice encoder), a classifier learns to name the speaker from the
codes and the encoder learns to hide it (gradient reversal). A batch whose loss or
gradient is not finite is skipped and counted; `max_consecutive_nonfinite` such batches in a row stop
training. Validation logs mel loss, codebook usage over the whole validation set, and writes a few audio
samples with original-vs-reconstruction mel images into <run folder>/samples (and to the logger when it
takes media, as W&B does).

Batches are dicts: {"audio": FloatTensor[B, T], "lengths": LongTensor[B], "texts": list[str], ...}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from voxlm.codec.discriminators import Discriminators
from voxlm.codec.losses import (
    CTCHead,
    MultiScaleMelLoss,
    SpeakerAdversary,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    latent_change,
)
from voxlm.codec.model import Codec, CodecOutput
from voxlm.eval.audio_metrics import code_repeat, codebook_usage


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str) -> float:
    """Linear warm-up to 1, then cosine or exponential decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "exponential":
        return min_lr_ratio**progress
    raise ValueError(f"unknown lr schedule '{schedule}' (cosine or exponential)")


class CodecModule(L.LightningModule):
    """The codec, its discriminators and losses, built from the codec config's sections (model, optim,
    loss, log); `CodecModule.load_from_checkpoint(path)` rebuilds it from the checkpoint alone."""

    def __init__(self, model_cfg: dict, optim_cfg: dict, loss_cfg: dict, log_cfg: dict | None = None,
                 speakers: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()  # the checkpoint rebuilds this module from these arguments alone
        self.automatic_optimization = False
        self.model_cfg, self.optim_cfg, self.loss_cfg = model_cfg, optim_cfg, loss_cfg
        self.log_cfg = log_cfg or {"val_samples": 0}
        self.codec = Codec(**model_cfg)
        self.mel_loss = MultiScaleMelLoss(model_cfg["sample_rate"], **loss_cfg["mel"])
        self.discriminators = Discriminators(**loss_cfg["discriminator"])
        ctc = loss_cfg["ctc"]
        self.ctc_head = (
            CTCHead(len(model_cfg["levels"]), ctc["dim"], ctc["kernel_size"], ctc["alphabet"])
            if loss_cfg["weights"]["ctc"] > 0 else None
        )
        adversary = loss_cfg.get("speaker_adversary")
        self.speaker_adversary = (
            SpeakerAdversary(len(model_cfg["levels"]), adversary["dim"], adversary["kernel_size"],
                             speakers or [])
            if loss_cfg["weights"].get("speaker_adversary", 0.0) > 0 else None
        )
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.val_codes: list[np.ndarray] = []  # each validation item's codes
        self.last_val: dict[str, float] = {}

    # ---------------------------------------------------------------- optimizers

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        heads = [h for h in (self.ctc_head, self.speaker_adversary) if h is not None]
        return list(self.codec.parameters()) + [p for head in heads for p in head.parameters()]

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        opt_g = torch.optim.AdamW(self.generator_parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                  weight_decay=cfg["weight_decay"])
        opt_d = torch.optim.AdamW(self.discriminators.parameters(), lr=cfg["disc_lr"],
                                  betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
        return [opt_g, opt_d]

    def set_learning_rates(self, opt_g: Any, opt_d: Any) -> float:
        """Both learning rates from global_step (so a resumed run continues its schedule); returns the
        generator's."""
        cfg = self.optim_cfg
        factor = lr_factor(self.global_step, cfg["warmup_steps"], cfg["total_steps"], cfg["min_lr_ratio"],
                           cfg["schedule"])
        for optimizer, lr in ((opt_g, cfg["lr"]), (opt_d, cfg["disc_lr"])):
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
        return cfg["lr"] * factor

    def on_fit_start(self) -> None:
        # The discriminator step bypasses Lightning's optimizer wrapper (see `optimizer_step`), which is
        # where fp16's gradient scaler would unscale its gradients.
        if str(self.trainer.precision).startswith("16"):
            raise RuntimeError("CodecModule supports 32-true and bf16-mixed precision, not fp16")

    def optimizer_step(self, optimizer: Any, loss: Tensor, parameters: list, max_norm: float,
                       counts_as_global_step: bool) -> bool:
        """Backward, clip, step; False (and no step) when the loss or the gradient is not finite.

        Backward runs even on a non-finite loss so that every DDP rank all-reduces (and then skips) alike.
        Lightning counts every optimizer step in global_step; the discriminator steps the raw torch
        optimizer so that global_step, max_steps and the LR schedule count batches (generator steps).
        """
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return False
        (optimizer if counts_as_global_step else optimizer.optimizer).step()
        return True

    # ---------------------------------------------------------------- training

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:  # every clip of this batch was unreadable (the data layer counted them)
            return
        opt_g, opt_d = self.optimizers()
        lr = self.set_learning_rates(opt_g, opt_d)
        audio = batch["audio"]
        norm_stats = self.norm_statistics()
        out = self.codec(audio, batch["lengths"])
        weights = self.loss_cfg["weights"]
        adversarial = self.global_step >= self.loss_cfg["adversarial_start_step"]
        logs: dict[str, Tensor] = {}

        d_ok, real_features, fake = True, None, None
        if adversarial:
            real, fake = self.adversarial_segments(audio, out.audio)
            # Real and generated audio through the discriminators as one batch; the real feature maps
            # (from before this step's update) serve the generator's feature matching, saving a pass.
            outputs = self.discriminators(torch.cat([real, fake.detach()]))
            real_logits = [logits[: len(audio)] for logits, _ in outputs]
            fake_logits = [logits[len(audio):] for logits, _ in outputs]
            real_features = [[f[: len(audio)].detach() for f in features] for _, features in outputs]
            loss_d = discriminator_loss(real_logits, fake_logits, self.loss_cfg["adversarial"])
            d_ok = self.optimizer_step(opt_d, loss_d, list(self.discriminators.parameters()),
                                       self.optim_cfg["disc_grad_clip"], counts_as_global_step=False)
            logs["train/loss_d"] = loss_d.detach()

        losses = self.generator_losses(batch, out, fake, real_features)
        if self.speaker_adversary is not None:
            logs["train/speaker_accuracy"] = self.speaker_adversary.last_accuracy
        loss_g = sum(weights[name] * value for name, value in losses.items())
        g_ok = self.optimizer_step(opt_g, loss_g, self.generator_parameters(), self.optim_cfg["grad_clip"],
                                   counts_as_global_step=True)
        if not g_ok:
            self.restore_norm_statistics(norm_stats)  # a NaN batch must not poison BatchNorm's running stats
        self.count_nonfinite(d_ok and g_ok)

        logs |= {f"train/{name}": value.detach() for name, value in losses.items()}
        logs |= {"train/loss_g": loss_g.detach(), "train/lr": lr,
                 "train/nonfinite_steps": float(self.nonfinite_steps)}
        if g_ok:  # codes of a non-finite batch are garbage
            codes = self.frame_codes(out.codes, batch["lengths"])  # as validation counts them: no padding
            usage = codebook_usage(np.concatenate(codes), self.codec.codebook_size)
            logs |= {"train/codebook_usage": usage["share_used"], "train/perplexity": usage["perplexity"],
                     "train/code_repeat": code_repeat(codes)}
        self.log("train/mel", logs.pop("train/mel"), prog_bar=True, batch_size=len(audio))
        self.log_dict(logs, batch_size=len(audio))

    def adversarial_segments(self, audio: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
        """The same random stretch of real and generated audio: discriminators cost most of an adversarial
        step's compute, and HiFi-GAN-style training judges short segments anyway."""
        seconds = self.loss_cfg["adversarial_segment_seconds"]
        length = audio.shape[1]
        if seconds is not None:
            length = min(length, int(seconds * self.codec.sample_rate))
        start = int(torch.randint(0, audio.shape[1] - length + 1, ()))
        return audio[:, start: start + length], reconstruction[:, start: start + length]

    def generator_losses(self, batch: dict[str, Any], out: CodecOutput, fake: Tensor | None,
                         real_features: list[list[Tensor]] | None) -> dict[str, Tensor]:
        """Unweighted generator losses, named as in loss_cfg['weights']; `fake` is the generated segment
        that the discriminators judge, when the adversarial phase has begun."""
        audio = batch["audio"]
        losses = {"mel": self.mel_loss(out.audio, audio)}
        if fake is not None and real_features is not None:
            # The generator's loss must not train the discriminators; their weight gradients would be waste.
            self.discriminators.requires_grad_(False)
            outputs = self.discriminators(fake)
            self.discriminators.requires_grad_(True)
            losses["adversarial"] = generator_adversarial_loss([o[0] for o in outputs],
                                                               self.loss_cfg["adversarial"])
            losses["feature_matching"] = feature_matching_loss(real_features, [o[1] for o in outputs])
        if self.ctc_head is not None:
            losses["ctc"] = self.ctc_loss(batch, out)
        if self.loss_cfg["weights"].get("stability", 0.0) > 0:
            frames = self.codec.num_frames(batch["lengths"])
            losses["stability"] = latent_change(self.codec.quantizer.bound(out.latents), frames)
        if self.speaker_adversary is not None:
            losses["speaker_adversary"] = self.speaker_adversary(
                out.quantized, self.codec.num_frames(batch["lengths"]), batch["speakers"])
        return losses

    def frame_codes(self, codes: Tensor, lengths: Tensor) -> list[np.ndarray]:
        """Each item's codes [B, F] without the frames of its padding."""
        frames = self.codec.num_frames(lengths).tolist()
        return [row[:n].cpu().numpy() for row, n in zip(codes, frames, strict=True)]

    def ctc_loss(self, batch: dict[str, Any], out: CodecOutput) -> Tensor:
        """CTC on the items whose transcript matches their audio.

        A random crop of a longer utterance does not match the utterance's text. The batch may say which
        items are crops (`cropped`: BoolTensor[B]); otherwise only items shorter than the padded batch
        length are trusted: they were padded, so they were not cropped.
        """
        lengths = batch["lengths"]
        whole = ~batch["cropped"] if "cropped" in batch else lengths < batch["audio"].shape[1]
        keep = [i for i in range(len(lengths)) if whole[i] and batch["texts"][i].strip()]
        if not keep:
            return out.quantized.sum() * 0.0  # keeps the graph (and DDP's gradient all-reduce) uniform
        frames = self.codec.num_frames(lengths[keep])
        return self.ctc_head(out.quantized[keep], frames, [batch["texts"][i] for i in keep])

    def count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.consecutive_nonfinite = 0
            return
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        limit = self.optim_cfg["max_consecutive_nonfinite"]
        if self.consecutive_nonfinite >= limit:
            raise RuntimeError(
                f"{self.consecutive_nonfinite} consecutive batches had a non-finite loss or gradient "
                f"(limit max_consecutive_nonfinite={limit}, {self.nonfinite_steps} in all, at step "
                f"{self.global_step}): training diverged or the data holds NaN/inf. Lower optim.lr, "
                "check the audio, or resume from an earlier checkpoint."
            )

    def norm_statistics(self) -> dict[str, Tensor]:
        """Copies of the codec's BatchNorm running statistics, keyed as in its state dict."""
        return {
            f"{module_name}.{name}": buffer.clone()
            for module_name, module in self.codec.named_modules() if isinstance(module, _BatchNorm)
            for name, buffer in module.named_buffers(recurse=False)
        }

    def restore_norm_statistics(self, stats: dict[str, Tensor]) -> None:
        self.codec.load_state_dict(stats, strict=False)

    # ---------------------------------------------------------------- validation

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        audio = batch["audio"]
        out = self.codec(audio, batch["lengths"])
        self.log("val/mel_loss", self.mel_loss(out.audio, audio), prog_bar=True, batch_size=len(audio))
        self.val_codes.extend(self.frame_codes(out.codes, batch["lengths"]))
        if batch_idx == 0 and self.trainer.is_global_zero:
            self.write_samples(audio, out.audio, batch["lengths"])

    def on_validation_epoch_end(self) -> None:
        if not self.val_codes:
            return
        usage = codebook_usage(np.concatenate(self.val_codes), self.codec.codebook_size)
        repeat = code_repeat(self.val_codes)
        self.val_codes.clear()
        self.log_dict({"val/codebook_usage": usage["share_used"], "val/perplexity": usage["perplexity"],
                       "val/code_repeat": repeat})
        mel = self.trainer.callback_metrics.get("val/mel_loss")
        self.last_val = {"val_mel_loss": float(mel) if mel is not None else float("nan"),
                         "codebook_usage": usage["share_used"], "codebook_perplexity": usage["perplexity"],
                         "code_repeat": repeat}

    def write_samples(self, audio: Tensor, reconstruction: Tensor, lengths: Tensor) -> None:
        """Original and reconstructed audio plus a mel comparison image for the first few items, into
        <run folder>/samples and to every attached logger that takes media."""
        import soundfile as sf

        count = min(self.log_cfg["val_samples"], len(audio))
        if count == 0:
            return
        folder = Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        sr = self.codec.sample_rate
        clips, images, captions = [], [], []
        for i in range(count):
            n = int(lengths[i])
            pair = [audio[i, :n].float().cpu().numpy(), reconstruction[i, :n].float().cpu().numpy()]
            name = f"step{self.global_step:07d}_{i}"
            for kind, clip in zip(("original", "reconstruction"), pair, strict=True):
                sf.write(folder / f"{name}_{kind}.wav", clip, sr)
            image = self.mel_image(audio[i : i + 1, :n], reconstruction[i : i + 1, :n])
            self.save_png(image, folder / f"{name}_mel.png")
            clips += pair
            images.append(image)
            captions += [f"{i} original", f"{i} reconstruction"]
        for logger in self.loggers:
            if hasattr(logger, "log_audio") and hasattr(logger, "log_image"):  # e.g. WandbLogger
                logger.log_audio(key="val/audio", audios=clips, caption=captions,
                                 sample_rate=[sr] * len(clips), step=self.global_step)
                logger.log_image(key="val/mel", images=images, step=self.global_step)

    @torch.no_grad()
    def mel_image(self, original: Tensor, reconstruction: Tensor) -> np.ndarray:
        """An RGB image [H, W, 3] of the two log-mel spectrograms, original above reconstruction."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        scale = len(self.mel_loss.mels) // 2
        mels = [self.mel_loss.log_mel(x.float(), scale)[0].cpu().numpy() for x in (original, reconstruction)]
        figure = Figure(figsize=(8, 5), dpi=80)
        canvas = FigureCanvasAgg(figure)
        for row, (title, mel) in enumerate(zip(("original", "reconstruction"), mels, strict=True)):
            axes = figure.add_subplot(2, 1, row + 1)
            axes.imshow(mel, origin="lower", aspect="auto", vmin=mels[0].min(), vmax=mels[0].max())
            axes.set_title(title)
        figure.tight_layout()
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    @staticmethod
    def save_png(image: np.ndarray, path: Path) -> None:
        import matplotlib.image

        matplotlib.image.imsave(path, image)

    # ---------------------------------------------------------------- bookkeeping

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)

    def training_summary(self) -> dict[str, float]:
        """What metrics.json records about the run beyond the logged scalars."""
        return {"nonfinite_steps": self.nonfinite_steps, **self.last_val}


def load_codec(checkpoint_path: str | Path, map_location: str = "cpu") -> Codec:
    """The codec in eval mode from a CodecModule Lightning checkpoint (.ckpt) or a bare codec.pt
    ({"config", "state_dict"}, as the codec stage writes), or a codec run folder holding codec.pt."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.is_dir():
        checkpoint_path = checkpoint_path / "codec.pt"
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"no codec at {checkpoint_path}: run `python train.py stage=codec` first")
    saved = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    if "hyper_parameters" in saved:
        prefix = "codec."
        config = saved["hyper_parameters"]["model_cfg"]
        state = {k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
    else:
        config, state = saved["config"], saved["state_dict"]
    codec = Codec(**config)
    codec.load_state_dict(state)
    return codec.eval().to(map_location)
