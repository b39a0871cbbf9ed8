"""Lightning training of the SpeechLM: a stock transformers LlamaForCausalLM, optionally with PEFT LoRA
adapters, trained on next-token loss from the batch's labels (IGNORE = no loss).

Recipe (a `speechlm` preset's pretrain/sft `optim` section): AdamW (no weight decay on norms), linear
warm-up then cosine decay to lr * min_lr_ratio at max_steps, gradient-norm clipping at grad_clip. Clipping
lives here, not in the Trainer (cfg.trainer.gradient_clip_val must stay null), so one value from the preset
applies under every strategy; FSDP clips with its own sharding-aware clip_grad_norm_.

Logs train/loss, train/lr, train/grad_norm, train/tokens_per_s (non-padding tokens of all ranks per second
of training step, validation excluded), val/loss (token-weighted over the whole validation set, all
ranks) and val/ppl. With grid smoothing on, train/loss is the smoothed loss that is trained on; val/loss
stays the plain next-token loss, comparable across runs. `SpeechLMModule.load_from_checkpoint(path)`
rebuilds the model from the checkpoint alone: it carries the exact Hugging Face config, the recipe and the
vocabulary layout.

Batches are dicts: {"input_ids", "labels", "attention_mask": LongTensor[B, T], ...}.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from voxlm.codec.module import lr_factor
from voxlm.speechlm.alignment import guided_attention_loss, text_speech_spans
from voxlm.speechlm.code_grid import add_code_grid, fold_code_grid
from voxlm.speechlm.generate import filter_top_k
from voxlm.speechlm.grid_smoothing import check_levels, grid_smoothed_loss, grid_targets
from voxlm.speechlm.sequences import IGNORE
from voxlm.speechlm.tokenizer import in_code_block


def hf_config_dict(model: LlamaForCausalLM) -> dict[str, Any]:
    """The model's Hugging Face config as plain JSON types (what checkpoints carry)."""
    return json.loads(model.config.to_json_string(use_diff=False))


def add_lora(model: LlamaForCausalLM, lora_cfg: dict[str, Any]) -> torch.nn.Module:
    """PEFT LoRA adapters on lora_cfg.target_modules; every other weight is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(lora_cfg["r"]), lora_alpha=int(lora_cfg["alpha"]),
                        lora_dropout=float(lora_cfg["dropout"]),
                        target_modules=list(lora_cfg["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def noisy_codes(input_ids: Tensor, code_offset: int, codebook_size: int, share: float) -> Tensor:
    """input_ids with each code token replaced, with probability `share`, by a code drawn uniformly.

    The labels keep the true codes. Taught only from true histories, a speech LM leans on the last few
    frames (at 100 codes/s the next code is mostly the previous one) and, sampling freely, drifts as soon as
    its own codes are off; with some of its history made wrong it must take the next code from the text and
    the longer context too (what Tacotron's always-on pre-net dropout does for spectrogram frames).
    """
    replace = in_code_block(input_ids, code_offset, codebook_size) & (
        torch.rand(input_ids.shape, device=input_ids.device) < share)
    random_codes = torch.randint_like(input_ids, code_offset, code_offset + codebook_size)
    return torch.where(replace, random_codes, input_ids)


@torch.no_grad()
def own_codes(model: torch.nn.Module, batch: dict[str, Any], code_offset: int, codebook_size: int,
              share: float, temperature: float, top_k: int | None, passes: int = 1) -> Tensor:
    """input_ids with each labelled code replaced, with probability `share`, by the code the model samples
    at that position (parallel scheduled sampling: Bengio et al. 2015, Duckworth et al. 2019).

    Taught only from true histories, the model meets its own codes first when it speaks, and at 100 codes/s
    each code leans on the last few: teacher forced its codes read almost as well as the recording's, freely
    they drift (docs/benchmarks.md, "where the speech goes wrong"). Here a share of the history is what the
    model itself would have said, drawn as generation draws (temperature, top-k over the code block), while
    the labels keep the true codes: it learns to get back on track from its own slips. Each pass samples
    from the previous pass's history, so later passes put the model's errors after its own errors too.
    Only codes that carry a label are replaced: a voice prompt's codes stay the real recording's.
    """
    input_ids = mixed = batch["input_ids"]
    target = in_code_block(input_ids[:, 1:], code_offset, codebook_size) & (batch["labels"][:, 1:] != IGNORE)
    replace = target & (torch.rand(target.shape, device=input_ids.device) < share)
    for _ in range(passes):
        logits = model(input_ids=mixed, attention_mask=batch["attention_mask"]).logits
        code_logits = logits[:, :-1, code_offset: code_offset + codebook_size].float()
        flat = filter_top_k(code_logits.reshape(-1, codebook_size) / temperature, top_k)
        sampled = torch.multinomial(flat.softmax(dim=-1), 1).view(target.shape) + code_offset
        mixed = torch.cat([input_ids[:, :1], torch.where(replace, sampled, input_ids[:, 1:])], dim=1)
    return mixed


class SpeechLMModule(L.LightningModule):
    """The SpeechLM and its training recipe.

    model_config: the Hugging Face LlamaConfig as a dict (`hf_config_dict`); optim_cfg: the preset's
    pretrain/sft `optim` section; max_steps: where the cosine ends; lora_cfg: the preset's `lora` section
    (adapters only when enabled); layout: the tokenizer's VocabLayout as a dict; guided_cfg: the recipe's
    `guided_attention` section (voxlm.speechlm.alignment: weight, sigma, layers, heads; weight 0 or no
    section: off); code_grid: {"levels": the codec's FSQ levels, "init_std": the tables' initial scale} to
    train the code rows through voxlm.speechlm.code_grid (None: off); code_noise: the share of input codes
    replaced by random codes in training steps (`noisy_codes`; 0: off); scheduled_sampling: {"share",
    "ramp_steps", "temperature", "top_k", "passes"} to train on a share of the model's own codes
    (`own_codes`; the share grows linearly from 0 over ramp_steps; share 0 or None: off); grid_smoothing:
    {"weight", "sigma", "levels"} to mix each code label's one-hot target with its neighbourhood on the
    codec's FSQ grid (voxlm.speechlm.grid_smoothing; weight 0 or None: off). `model` (not a
    hyperparameter) gives the initial weights, e.g. a pretrained folder's; without it the model is built from
    model_config, as load_from_checkpoint does before loading them.
    """

    def __init__(self, model_config: dict[str, Any], optim_cfg: dict[str, Any], max_steps: int,
                 lora_cfg: dict[str, Any] | None = None, layout: dict[str, Any] | None = None,
                 model: LlamaForCausalLM | None = None, guided_cfg: dict[str, Any] | None = None,
                 code_grid: dict[str, Any] | None = None, code_noise: float = 0.0,
                 scheduled_sampling: dict[str, Any] | None = None,
                 grid_smoothing: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.optim_cfg, self.max_steps = optim_cfg, int(max_steps)
        self.code_noise = float(code_noise)
        if self.code_noise and not layout:
            raise ValueError("code noise needs the vocabulary layout (where the code block is)")
        self.scheduled_sampling = sampling = scheduled_sampling or {}
        if sampling.get("share"):
            if not layout:
                raise ValueError("scheduled sampling needs the vocabulary layout (where the code block is)")
            if not 0 < float(sampling["share"]) <= 1 or int(sampling["passes"]) < 1:
                raise ValueError(f"scheduled_sampling={sampling}: the share must lie in (0, 1] and passes "
                                 "be at least 1")
        smoothing = grid_smoothing or {}
        self.grid_weight = float(smoothing.get("weight") or 0.0)
        if self.grid_weight:
            if not layout:
                raise ValueError("grid smoothing needs the vocabulary layout (where the code block is)")
            if not 0 < self.grid_weight <= 1:
                raise ValueError(f"grid_smoothing.weight={self.grid_weight}: it must lie in (0, 1] (0: off)")
            check_levels(smoothing["levels"], layout["codebook_size"])
            self.register_buffer("grid_targets", grid_targets(smoothing["levels"], float(smoothing["sigma"])),
                                 persistent=False)
        self.lora_enabled = bool(lora_cfg and lora_cfg.get("enabled"))
        self.guided_cfg = guided_cfg or {}
        self.guided_weight = float(self.guided_cfg.get("weight") or 0.0)
        if self.guided_weight and not (layout and layout.get("special_ids")):
            raise ValueError("guided attention needs the vocabulary layout (its text/speech markers)")
        model = model if model is not None else LlamaForCausalLM(LlamaConfig.from_dict(model_config))
        if self.guided_weight:
            model.set_attn_implementation("eager")  # the loss needs the attention probabilities
        if code_grid:
            if self.lora_enabled:
                raise ValueError("LoRA trains adapters only, and a code grid trains the code rows: set "
                                 "speechlm.model.code_grid=null or speechlm.lora.enabled=false")
            if not layout:
                raise ValueError("the code grid needs the vocabulary layout (where the code block is)")
            add_code_grid(model, code_grid["levels"], layout["code_offset"], layout["codebook_size"],
                          float(code_grid["init_std"]))
        self.model = add_lora(model, lora_cfg) if self.lora_enabled else model
        # Throughput and loss bookkeeping; the totals travel in checkpoints so a resumed run reports the
        # whole run's throughput.
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.first_loss: float | None = None
        self.grad_norm: Tensor | None = None
        self._step_start: float | None = None
        self._last_step_end: float | None = None
        self._batch_tokens = 0
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())
        self.last_val: dict[str, float] = {}

    # ---------------------------------------------------------------- model

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Mean next-token loss over the batch's labelled positions (the model shifts the labels)."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    def plain_model(self) -> LlamaForCausalLM:
        """The model as a stock LlamaForCausalLM: LoRA adapters merged into the base weights, a code grid
        folded into the embedding (this unwraps the module's model: call it once training is over)."""
        if self.lora_enabled:
            self.model = self.model.merge_and_unload()
            self.lora_enabled = False
        fold_code_grid(self.model)
        return self.model

    # ---------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        # By name, not by tensor rank: under FSDP the parameters are flattened shards.
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if "norm" in name or name.endswith(".bias") else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(cfg["weight_decay"])},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(cfg["lr"]), betas=tuple(cfg["betas"]))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        cfg = self.optim_cfg
        return lr_factor(step, int(cfg["warmup_steps"]), self.max_steps, float(cfg["min_lr_ratio"]), "cosine")

    def on_fit_start(self) -> None:
        if self.trainer.gradient_clip_val is not None:
            raise ValueError(
                "the SpeechLM clips gradients itself: leave trainer.gradient_clip_val null and set "
                "speechlm.<pretrain|sft>.optim.grad_clip instead")

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        max_norm = self.optim_cfg.get("grad_clip")
        if not max_norm:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, FullyShardedDataParallel):
            self.grad_norm = wrapped.clip_grad_norm_(float(max_norm))  # a norm over every rank's shard
        else:
            params = [p for p in self.parameters() if p.grad is not None]
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, float(max_norm))

    # ---------------------------------------------------------------- training

    def own_code_share(self, step: int) -> float:
        """The scheduled-sampling share at an optimizer step: linear from 0 over ramp_steps, then flat."""
        share = float(self.scheduled_sampling.get("share") or 0.0)
        ramp = int(self.scheduled_sampling.get("ramp_steps") or 0)
        return share * min(1.0, step / ramp) if ramp > 0 else share

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        batch_size = len(batch["input_ids"])
        share = self.own_code_share(self.global_step)
        if share > 0:
            layout, cfg = self.hparams.layout, self.scheduled_sampling
            batch = {**batch, "input_ids": own_codes(
                self.model, batch, layout["code_offset"], layout["codebook_size"], share,
                float(cfg["temperature"]), cfg.get("top_k"), int(cfg["passes"]))}
            self.log("train/own_code_share", share, batch_size=batch_size)
        if self.code_noise:
            layout = self.hparams.layout
            batch = {**batch, "input_ids": noisy_codes(batch["input_ids"], layout["code_offset"],
                                                       layout["codebook_size"], self.code_noise)}
        loss, guided = self.training_losses(batch)
        if guided is not None:
            self.log("train/guided_attention", guided.detach(), batch_size=batch_size)
        self._batch_tokens = int(batch["attention_mask"].sum())
        if self.first_loss is None and self.global_step == 0:
            self.first_loss = float(loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optim_cfg["lr"] * self.lr_factor(self.global_step), batch_size=batch_size)
        return loss if guided is None else loss + self.guided_weight * guided

    def training_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """(next-token loss as trained, guided attention loss or None) from one forward. The next-token
        loss is the model's own, or with grid smoothing on, its code labels smoothed over the grid."""
        if not self.guided_weight and not self.grid_weight:
            return self(batch), None
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=None if self.grid_weight else batch["labels"],
                         output_attentions=bool(self.guided_weight))
        loss = out.loss
        if self.grid_weight:
            loss = grid_smoothed_loss(out.logits, batch["labels"], self.grid_targets,
                                      self.hparams.layout["code_offset"], self.grid_weight)
        if not self.guided_weight:
            return loss, None
        ids = self.hparams.layout["special_ids"]
        spans = text_speech_spans(batch["input_ids"], ids["text_start"], ids["text_end"], ids["speech_start"],
                                  ids["speech_end"])
        layers = self.guided_cfg.get("layers")
        attentions = list(out.attentions) if layers is None else [out.attentions[i] for i in layers]
        guided = guided_attention_loss(attentions, spans, float(self.guided_cfg["sigma"]),
                                       self.guided_cfg.get("heads"))
        return loss, guided

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # From the previous step's end, so data loading counts; but not across validation or start-up.
        now = time.perf_counter()
        self._step_start = self._last_step_end if self._last_step_end is not None else now

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        seconds = now - (self._step_start if self._step_start is not None else now)
        self._last_step_end = now
        # Same-sized batches on every rank is the usual case (packed rows); SFT rows vary a little.
        tokens = self._batch_tokens * self.trainer.world_size
        self.tokens_seen += tokens
        self.train_seconds += seconds
        if seconds > 0:
            self.log("train/tokens_per_s", tokens / seconds, batch_size=1)
        if self.grad_norm is not None:
            self.log("train/grad_norm", self.grad_norm, batch_size=1)
            self.grad_norm = None

    # ---------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._last_step_end = None
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The model's loss is a mean over this batch's labelled tokens (after the shift); weighting it by
        # their count makes val/loss the mean over every token of the validation set.
        count = (batch["labels"][:, 1:] != IGNORE).sum()
        if count == 0:
            return
        self._val_sum += self(batch).double() * count
        self._val_count += count

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if count == 0:
            return
        loss = float(total / count)
        self.last_val = {"val_tokens": int(count)}
        self.log_dict({"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0))}, prog_bar=True, batch_size=1)
        self._last_step_end = None

    # ---------------------------------------------------------------- bookkeeping

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["speechlm_progress"] = {"tokens_seen": self.tokens_seen, "first_loss": self.first_loss,
                                           "train_seconds": self.train_seconds}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        progress = checkpoint.get("speechlm_progress", {})
        self.tokens_seen = int(progress.get("tokens_seen", 0))
        self.train_seconds = float(progress.get("train_seconds", 0.0))
        self.first_loss = progress.get("first_loss")

    def training_summary(self) -> dict[str, Any]:
        """What metrics.json records about the run beyond the logged scalars."""
        summary: dict[str, Any] = {
            "tokens_seen": self.tokens_seen, "train_seconds": round(self.train_seconds, 3),
            "tokens_per_s": self.tokens_seen / self.train_seconds if self.train_seconds > 0 else None,
            "train_loss_first": self.first_loss,
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "lora": bool(self.hparams.get("lora_cfg") and self.hparams["lora_cfg"].get("enabled")),
        }
        return {**summary, **self.last_val}
