"""The SpeechLM: a stock transformers LlamaForCausalLM built from a `speechlm` preset's `model` section.

Stock on purpose (design.md): TRL, PEFT, save_pretrained and the MAX exporter all take it as it is. A model is
either built from scratch from the preset, or started from a pretrained text LLM in a local Hugging Face
folder (`init_from`) whose embeddings are grown to the speech vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from voxlm.runs import read_metrics
from voxlm.speechlm.tokenizer import CodecMismatchError, SpeechTokenizer

log = logging.getLogger(__name__)

# Preset keys that shape the network; with init_from they must agree with the pretrained folder, so the
# preset (which checkpoints carry) describes the model that was actually trained.
ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "tie_word_embeddings")


def padded_vocab_size(vocab_size: int, multiple: int | None) -> int:
    """vocab_size rounded up to a multiple (matmul-friendly output layers); the extra rows are never a
    tokenizer's id, so samplers must mask them like any token that is not allowed at that step."""
    multiple = int(multiple or 1)
    return -(-vocab_size // multiple) * multiple


def llama_config(model_cfg: Mapping[str, Any], vocab_size: int,
                 special_ids: Mapping[str, int] | None = None) -> LlamaConfig:
    """A LlamaConfig from a preset's model section, for a vocabulary of vocab_size (before padding)."""
    cfg = _plain(model_cfg)
    special_ids = special_ids or {}
    return LlamaConfig(
        vocab_size=padded_vocab_size(vocab_size, cfg.get("pad_vocab_to_multiple_of")),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim"),
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        initializer_range=float(cfg["initializer_range"]),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        attn_implementation=cfg.get("attn_implementation", "sdpa"),
    )


def build_model(model_cfg: Mapping[str, Any], vocab_size: int,
                special_ids: Mapping[str, int] | None = None) -> LlamaForCausalLM:
    """The SpeechLM for a vocabulary of vocab_size: from scratch, or from a local folder (init_from).

    special_ids (a VocabLayout's, optional) fills the config's bos/eos/pad ids so generate() and the
    exporter find them.
    """
    cfg = _plain(model_cfg)
    if not cfg.get("init_from"):
        return LlamaForCausalLM(llama_config(cfg, vocab_size, special_ids))
    return load_pretrained_llm(cfg, vocab_size, special_ids)


def load_pretrained_llm(model_cfg: Mapping[str, Any], vocab_size: int,
                        special_ids: Mapping[str, int] | None = None) -> LlamaForCausalLM:
    """A pretrained text Llama from model_cfg.init_from, its embeddings grown to the speech vocabulary."""
    cfg = _plain(model_cfg)
    path = cfg["init_from"]
    # float32 master weights: mixed precision is the trainer's job, whatever dtype the folder was saved in.
    model = LlamaForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32,
        attn_implementation=cfg.get("attn_implementation", "sdpa"))
    mismatched = {key: (cfg[key], getattr(model.config, key)) for key in ARCHITECTURE_KEYS
                  if key in cfg and cfg[key] != getattr(model.config, key)}
    if mismatched:
        raise ValueError(
            f"init_from={path} does not have the preset's shape (preset vs folder): {mismatched}; "
            "use the preset that matches the pretrained model")
    old_vocab = model.get_input_embeddings().weight.shape[0]
    new_vocab = padded_vocab_size(vocab_size, cfg.get("pad_vocab_to_multiple_of"))
    if new_vocab < old_vocab:
        raise ValueError(
            f"init_from={path} has {old_vocab} embeddings, more than the speech vocabulary's {new_vocab}: "
            "build the speech tokenizer from the same folder's tokenizer")
    resize_embeddings(model, new_vocab)
    for name in ("bos", "eos", "pad"):
        if special_ids and name in special_ids:
            setattr(model.config, f"{name}_token_id", special_ids[name])
    log.info("loaded %s, embeddings %d -> %d", path, old_vocab, new_vocab)
    return model


@torch.no_grad()
def resize_embeddings(model: LlamaForCausalLM, new_vocab: int) -> None:
    """Grow the input embeddings (and an untied output layer) to new_vocab rows, each new row set to the
    mean of the old ones: a new token then starts as an 'average' token, neither dominating the softmax
    nor sitting far out of the distribution the pretrained layers expect."""
    old_vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(new_vocab, mean_resizing=False)
    layers = [model.get_input_embeddings()]
    if not model.config.tie_word_embeddings:
        layers.append(model.get_output_embeddings())
    for layer in layers:
        weight = layer.weight
        weight[old_vocab:] = weight[:old_vocab].mean(dim=0, keepdim=True)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def trained_codec_run(folder: Path) -> str | None:
    """The codec run whose codes the SpeechLM in a run's hf/ `folder` learned, as its run's metrics.json says
    (an RLHF run names it; pretrain and SFT runs name their tokenize run, which names it); None if unsaid."""
    run = folder.parent
    for _ in range(3):
        metrics = read_metrics(run)
        if metrics.get("codec_run"):
            return str(metrics["codec_run"])
        if not metrics.get("tokenize_run"):
            return None
        run = Path(metrics["tokenize_run"])
    return None


def speechlm_codec(speechlm: str | Path, codec: str | Path | None, fallback: str) -> str:
    """The codec to pair with a SpeechLM: `codec` when given, else the codec run it was trained on (as its
    run's metrics.json says, when that run is still there), else `fallback` (the newest codec run)."""
    if codec:
        return str(codec)
    trained = trained_codec_run(speechlm_folder(speechlm))
    if trained and Path(trained).is_dir():
        log.info("codec: %s, the one %s was trained on", trained, speechlm)
        return trained
    return fallback


def speechlm_folder(path: str | Path) -> Path:
    """The save_pretrained folder: the path itself, or a run folder's hf/."""
    path = Path(path)
    if (path / "hf").is_dir():
        path = path / "hf"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no SpeechLM at {path} (no config.json): train one with "
                                "`python train.py stage=sft` or pass the path of a run or its hf/ folder")
    return path


def load_speechlm(path: str | Path, codebook_size: int, device: str = "cpu", dtype: str = "float32",
                  codec_id: str | None = None) -> tuple[PreTrainedModel, SpeechTokenizer]:
    """(model in eval mode, its SpeechTokenizer) from a save_pretrained folder or a run folder with hf/;
    the tokenizer's code block must match the codec's `codebook_size`, and the codes it learned the codec's
    `codec_id` (Codec.code_fingerprint) where both are known."""
    folder = speechlm_folder(path)
    try:
        tok = SpeechTokenizer.from_pretrained(folder, codebook_size=codebook_size, codec_id=codec_id)
    except CodecMismatchError as error:
        codec_run = trained_codec_run(folder)
        if codec_run is None:
            raise
        raise CodecMismatchError(
            f"{error}. This one was trained on the codes of the codec in {codec_run}") from None
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                 dtype=getattr(torch, dtype))
    return model.to(device).eval(), tok
