"""`python train.py stage=pretrain` and `python train.py stage=sft`: train the SpeechLM on code shards.

pretrain reads: the tokenize run named by cfg.stage.tokenize_run ('latest' by default), its train and val
shards; cfg.speechlm (tokenizer, model and pretrain sections). It builds the SpeechTokenizer (a byte-level
BPE trained on the train transcripts, or the local tokenizer at speechlm.tokenizer.path, extended with the
control tokens and the shards' codebook) and the model from the preset, then trains on packed rows drawn
from the preset's mixture (voxlm.speechlm.sequences.PretrainDataset).

sft reads: the pretrain run named by cfg.stage.pretrain_run ('latest' by default), its hf/ folder (weights
and tokenizer), and the shards it trained on (or cfg.stage.tokenize_run); trains TTS pairs with a voice
prompt from the same speaker (SFTDataset). With speechlm.lora.enabled it trains PEFT LoRA adapters only and
merges them into the weights before saving, so hf/ is always a plain Llama model.

Both write into the run folder: tokenizer/ (pretrain), checkpoints/last.ckpt (carries its config; the same
run name resumes from it), hf/ (model + tokenizer in Hugging Face format: what sft, generation, export and
serving load) and metrics.json (loss, val loss/perplexity, tokens/s, steps).

Validation is the TTS loss: every val utterance once, its text then its speech, loss on the speech. It is
deterministic and the same task for both stages, so their val/loss values compare.

Distributed runs (trainer=ddp / fsdp): each rank draws its own pretraining stream (seeded by rank), map-style
SFT data goes through Lightning's distributed sampler, only global rank 0 writes the tokenizer and hf/, and
under FSDP the full weights are gathered before saving.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from voxlm.codec.losses import spoken_characters
from voxlm.data.phonemes import phoneme_inventory, phoneme_symbols
from voxlm.data.shards import CodeShards
from voxlm.runs import find_run, read_metrics, write_metrics
from voxlm.speechlm.model import build_model
from voxlm.speechlm.module import SpeechLMModule, hf_config_dict
from voxlm.speechlm.sequences import (
    PretrainDataset,
    SFTDataset,
    pack,
    pad_collate,
    speakable_rows,
    tts_sequence,
)
from voxlm.speechlm.tokenizer import (
    LAYOUT_FILE,
    SpeechTokenizer,
    load_text_tokenizer,
    train_text_tokenizer,
)
from voxlm.training import build_trainer, config_dict, fit, resolve_precision, seed_everything

log = logging.getLogger(__name__)

HF_DIR = "hf"
TOKENIZER_DIR = "tokenizer"


# ------------------------------------------------------------------------------------------- stages

def run_pretrain(cfg: DictConfig, run_dir: Path) -> None:
    """Tokenizer, model from the preset, mixture rows; writes tokenizer/, checkpoints, hf/, metrics.json."""
    seed_everything(cfg)
    torch.set_float32_matmul_precision("high")
    run_dir = Path(run_dir)
    recipe = cfg.speechlm.pretrain
    tokenize_dir = find_run(cfg.stage.tokenize_run, cfg.paths.runs_dir, "tokenize")
    train_shards, val_shards = split_shards(tokenize_dir, "train"), split_shards(tokenize_dir, "val")
    texts = read_text_corpus(recipe.text_corpus)
    tok = pretrain_tokenizer(cfg.speechlm.tokenizer, train_shards, run_dir / TOKENIZER_DIR, texts)
    model = build_model(cfg.speechlm.model, len(tok), tok.layout.special_ids)
    module = SpeechLMModule(hf_config_dict(model), config_dict(recipe.optim), int(cfg.stage.max_steps),
                            layout=asdict(tok.layout), model=model,
                            guided_cfg=recipe_section(recipe, "guided_attention"),
                            code_grid=code_grid_config(cfg.speechlm.model, fresh=True),
                            code_noise=float(recipe.get("code_noise") or 0.0),
                            scheduled_sampling=recipe_section(recipe, "scheduled_sampling"),
                            grid_smoothing=recipe_section(recipe, "grid_smoothing"))
    data = PretrainData(train_shards, val_shards, tok, recipe, seed=int(cfg.seed), texts=texts)
    trainer = build_trainer(with_recipe(cfg, recipe), run_dir)
    fit(trainer, module, run_dir, datamodule=data)
    finish(trainer, module, tok, run_dir, {"tokenize_run": str(tokenize_dir)})


def run_sft(cfg: DictConfig, run_dir: Path) -> None:
    """The pretrain run's hf/ model (+ LoRA when enabled) on voice-prompted TTS pairs; writes hf/ merged."""
    seed_everything(cfg)
    torch.set_float32_matmul_precision("high")
    run_dir = Path(run_dir)
    recipe = cfg.speechlm.sft
    pretrain_dir = find_run(cfg.stage.pretrain_run, cfg.paths.runs_dir, "pretrain")
    pretrained = pretrain_dir / HF_DIR
    if not (pretrained / "config.json").exists():
        raise FileNotFoundError(f"{pretrain_dir} has no {HF_DIR}/ model: that pretrain run did not finish; "
                                "re-run it with the same run_name to resume and complete it")
    tokenize_dir = find_run(cfg.stage.tokenize_run or pretrain_shards(pretrain_dir), cfg.paths.runs_dir,
                            "tokenize")
    train_shards, val_shards = split_shards(tokenize_dir, "train"), split_shards(tokenize_dir, "val")
    tok = SpeechTokenizer.from_pretrained(pretrained, codebook_size=train_shards.codebook_size,
                                          codec_id=train_shards.codec_id)
    # float32 master weights whatever the folder holds; mixed precision is the trainer's job.
    model = LlamaForCausalLM.from_pretrained(
        str(pretrained), local_files_only=True, dtype=torch.float32,
        attn_implementation=cfg.speechlm.model.get("attn_implementation", "sdpa")).train()
    module = SpeechLMModule(hf_config_dict(model), config_dict(recipe.optim), int(cfg.stage.max_steps),
                            lora_cfg=config_dict(cfg.speechlm.lora), layout=asdict(tok.layout), model=model,
                            guided_cfg=recipe_section(recipe, "guided_attention"),
                            # LoRA trains adapters only: a grid-pretrained model is already folded.
                            code_grid=None if cfg.speechlm.lora.enabled
                            else code_grid_config(cfg.speechlm.model, fresh=False),
                            code_noise=float(recipe.get("code_noise") or 0.0),
                            scheduled_sampling=recipe_section(recipe, "scheduled_sampling"),
                            grid_smoothing=recipe_section(recipe, "grid_smoothing"))
    train_loader, val_loader = sft_loaders(train_shards, val_shards, tok, recipe, int(cfg.seed))
    trainer = build_trainer(with_recipe(cfg, recipe), run_dir)
    fit(trainer, module, run_dir, train_dataloaders=train_loader, val_dataloaders=val_loader)
    finish(trainer, module, tok, run_dir,
           {"pretrain_run": str(pretrain_dir), "tokenize_run": str(tokenize_dir)})


# ------------------------------------------------------------------------------------------- inputs

def split_shards(tokenize_dir: Path, split: str) -> CodeShards:
    return CodeShards(Path(tokenize_dir) / "shards" / split)


def pretrain_shards(pretrain_dir: Path) -> str:
    """The tokenize run a pretrain run trained on (recorded in its metrics.json), else 'latest'."""
    return read_metrics(pretrain_dir).get("tokenize_run") or "latest"


def read_text_corpus(path: str | None) -> list[str] | None:
    """A text file's non-empty lines (the pretraining mixture's `text` source), or None: the transcripts."""
    if not path:
        return None
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"text_corpus {path} holds no text")
    return lines


def pretrain_tokenizer(tok_cfg: DictConfig, shards: CodeShards, folder: Path,
                       texts: list[str] | None = None) -> SpeechTokenizer:
    """The run's SpeechTokenizer: loaded from `folder` when the run made it before (a resumed run keeps its
    vocabulary), else built and saved there.

    Built from the local tokenizer at tok_cfg.path, or a byte-level BPE of tok_cfg.vocab_size trained on the
    train transcripts (and the text corpus, whose text the model also reads). Only global rank 0 builds it;
    other ranks wait for the folder, so every rank uses the very same files.
    """
    if not (folder / LAYOUT_FILE).exists():
        if rank_zero_only.rank == 0:
            if tok_cfg.path:
                text_tokenizer = load_text_tokenizer(tok_cfg.path)
            else:
                corpus = [row["text"] for row in shards.rows] + (texts or [])
                text_tokenizer = train_text_tokenizer(corpus, int(tok_cfg.vocab_size))
            alphabet = None
            if tok_cfg.get("interleave"):
                alphabet = shards.meta.get("alphabet")
                if not alphabet:
                    raise ValueError(
                        f"speechlm.tokenizer.interleave needs character timings, and the code shards in "
                        f"{shards.split_dir} have none: re-run `python train.py stage=tokenize` with a codec "
                        "trained with its CTC head (loss weight ctc > 0)")
            phonemes, voice = None, tok_cfg.get("phoneme_voice")
            spoken = tok_cfg.get("spoken", "letters")
            if spoken not in ("letters", "phonemes") or (spoken == "phonemes" and not alphabet):
                raise ValueError(f"speechlm.tokenizer.spoken is letters or phonemes, got {spoken!r}; "
                                 "phonemes are said in the interleaved format "
                                 "(speechlm.tokenizer.interleave=true)")
            if spoken == "phonemes":
                words = [spoken_characters(row["text"], alphabet) for row in shards.rows]
                phonemes = phoneme_symbols(phoneme_inventory(words, voice))
                log.info("phonemes: %d in the train transcripts (espeak-ng voice %s)", len(phonemes), voice)
            tok = SpeechTokenizer.build(text_tokenizer, shards.codebook_size, spoken_alphabet=alphabet,
                                        lookahead=int(tok_cfg.get("lookahead", 0)), phonemes=phonemes,
                                        phoneme_voice=voice if phonemes else None, codec_id=shards.codec_id)
            save_atomically(tok.save_pretrained, folder)
            log.info("tokenizer written to %s", folder)
        else:
            wait_for(folder / LAYOUT_FILE)
    return SpeechTokenizer.from_pretrained(folder, codebook_size=shards.codebook_size,
                                           codec_id=shards.codec_id)


def save_atomically(save: Any, folder: Path) -> None:
    """save(tmp) into a sibling folder, then swap it in: readers never see a half-written folder."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def wait_for(path: Path, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"global rank 0 did not write {path} within {timeout_s:.0f} s")
        time.sleep(1.0)


def with_recipe(cfg: DictConfig, recipe: DictConfig) -> DictConfig:
    """cfg with the recipe's gradient accumulation and precision in the trainer. The preset counts
    validation in optimizer steps, Lightning in batches: the interval is scaled to match."""
    accumulate = int(recipe.accumulate_grad_batches)
    trainer: dict[str, Any] = {"accumulate_grad_batches": accumulate}
    precision = resolve_precision(recipe.get("precision"), str(cfg.trainer.get("accelerator", "cpu")))
    if precision is not None:
        trainer["precision"] = precision
    if accumulate > 1 and isinstance(cfg.trainer.get("val_check_interval"), int):
        trainer["val_check_interval"] = int(cfg.trainer.val_check_interval) * accumulate
    merged = OmegaConf.merge(cfg, {"trainer": {}})  # a copy: the run's own cfg stays as it was written
    with open_dict(merged):
        merged.trainer.merge_with(trainer)
    return merged


# ------------------------------------------------------------------------------------------- data

class PretrainData(L.LightningDataModule):
    """Packed mixture rows to train on; packed TTS examples of every val utterance to validate on.

    The training stream is endless and seeded by (seed, global rank, first step): a resumed run draws new
    rows instead of replaying the ones it trained on, and every DDP rank draws different ones.
    """

    def __init__(self, train: CodeShards, val: CodeShards, tok: SpeechTokenizer, recipe: DictConfig,
                 seed: int, texts: list[str] | None = None) -> None:
        super().__init__()
        self.train_shards, self.val_shards, self.tok = train, val, tok
        self.recipe, self.seed, self.texts = recipe, seed, texts

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        step, rank = (trainer.global_step, trainer.global_rank) if trainer is not None else (0, 0)
        seed = int(np.random.SeedSequence([self.seed, rank, step]).generate_state(1)[0])
        dataset = PretrainDataset(self.train_shards, self.tok, config_dict(self.recipe.mixture),
                                  int(self.recipe.seq_len), seed=seed, texts=self.texts,
                                  phrase_words=list(self.recipe.phrase_words))
        workers = int(self.recipe.num_workers)
        return DataLoader(dataset, batch_size=int(self.recipe.batch_size), num_workers=workers,
                          persistent_workers=workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(val_rows(self.val_shards, self.tok, int(self.recipe.seq_len)),
                          batch_size=int(self.recipe.batch_size), shuffle=False)


def val_rows(shards: CodeShards, tok: SpeechTokenizer, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Every utterance once in the text_speech format, packed into rows of seq_len (in the interleaved
    format, every utterance with character timings)."""
    utterances = (shards[int(i)] for i in np.flatnonzero(speakable_rows(tok, shards)))
    examples = (tts_sequence(tok, u.text, u.codes, char_starts=u.char_starts) for u in utterances)
    return [{name: torch.from_numpy(value) for name, value in row.items()}
            for row in pack(examples, seq_len, tok.pad_id)]


def sft_loaders(train: CodeShards, val: CodeShards, tok: SpeechTokenizer, recipe: DictConfig,
                seed: int) -> tuple[DataLoader, DataLoader]:
    """Shuffled voice-prompted TTS pairs for training; the val split's pairs, in order, for validation.
    Lightning swaps in a distributed sampler under DDP/FSDP."""
    def dataset(shards: CodeShards) -> SFTDataset:
        return SFTDataset(shards, tok, seed=seed, max_len=int(recipe.max_len),
                          max_prompt_frames=int(recipe.max_prompt_frames))

    collate = partial(pad_collate, pad_id=tok.pad_id)
    batch_size, workers = int(recipe.batch_size), int(recipe.num_workers)
    train_set = dataset(train)
    if len(train_set) < batch_size:
        raise ValueError(f"SFT: {len(train_set)} usable training pairs, fewer than batch_size={batch_size}")
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                              collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(dataset(val), batch_size=batch_size, shuffle=False, collate_fn=collate)
    return train_loader, val_loader


# ------------------------------------------------------------------------------------------- outputs

def finish(trainer: L.Trainer, module: SpeechLMModule, tok: SpeechTokenizer, run_dir: Path,
           extra: dict[str, Any]) -> None:
    """Write hf/ (a plain Llama model + the tokenizer) and the run's summary into metrics.json."""
    summary = module.training_summary()  # before merging LoRA, which changes the trainable parameters
    model = export_model(trainer, module)
    if not trainer.is_global_zero:
        return
    hf_dir = Path(run_dir) / HF_DIR
    save_atomically(partial(save_hf, model, tok), hf_dir)
    write_metrics(run_dir, {**summary, **extra, "steps": trainer.global_step, "hf": str(hf_dir),
                            "precision": str(trainer.precision),
                            "parameters": sum(p.numel() for p in model.parameters())})
    log.info("SpeechLM written to %s (step %d, %.0f tokens/s)", hf_dir, trainer.global_step,
             summary["tokens_per_s"] or float("nan"))


def export_model(trainer: L.Trainer, module: SpeechLMModule) -> LlamaForCausalLM | None:
    """The trained model as a plain LlamaForCausalLM (LoRA merged) on global rank 0; None on other ranks.

    Under FSDP the weights are sharded: every rank takes part in gathering them, and rank 0 loads them into
    a fresh CPU copy of the module.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = trainer.strategy.model
    if isinstance(wrapped, FSDP):
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            state = wrapped.state_dict()
        if not trainer.is_global_zero:
            return None
        module = SpeechLMModule(**module.hparams)
        module.load_state_dict(state)
    elif not trainer.is_global_zero:
        return None
    return module.plain_model().cpu().eval()


def save_hf(model: LlamaForCausalLM, tok: SpeechTokenizer, folder: Path) -> None:
    model.save_pretrained(str(folder))
    tok.save_pretrained(folder)


def code_grid_config(model_cfg: DictConfig, fresh: bool) -> dict[str, Any] | None:
    """The module's code_grid from the preset's model.code_grid levels (None: off). Fresh tables (a model
    from scratch) start at the embeddings' scale, split over the digits; tables added to a trained model
    start at zero, so fine-tuning starts from its outputs unchanged."""
    levels = model_cfg.get("code_grid")
    if not levels:
        return None
    init_std = float(model_cfg.initializer_range) / math.sqrt(len(levels)) if fresh else 0.0
    return {"levels": [int(level) for level in levels], "init_std": init_std}


def recipe_section(recipe: DictConfig, name: str) -> dict[str, Any] | None:
    """One section of the recipe (guided_attention, scheduled_sampling, grid_smoothing) as a plain dict
    (None: absent)."""
    section = recipe.get(name)
    return config_dict(section) if section is not None else None
