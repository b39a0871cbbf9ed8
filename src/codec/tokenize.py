"""`python train.py stage=tokenize`: encode every split of a dataset into code shards with a trained codec.

Reads: the codec run named by cfg.stage.codec_run ('latest' by default) and cfg.data.
Writes: <run folder>/shards/<split>/ (see voxlm.data.shards); the SpeechLM stages read only these.
A split whose shards are complete is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from voxlm.codec.module import load_codec
from voxlm.data.dataset import build_dataset
from voxlm.data.shards import ShardWriter, is_complete
from voxlm.runs import find_run, write_metrics

log = logging.getLogger(__name__)


def duration_batches(durations: list[float], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar duration, so little compute goes into padding."""
    order = sorted(range(len(durations)), key=lambda i: durations[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def tokenize_split(codec, dataset, writer: ShardWriter, batch_size: int, desc: str) -> None:
    hop = codec.hop_length
    for batch in tqdm(duration_batches(dataset.durations, batch_size), desc=desc, unit="batch"):
        utterances = [u for u in (dataset[i] for i in batch) if u is not None]
        if not utterances:
            continue
        longest = max(len(u.audio) for u in utterances)
        audio = torch.zeros(len(utterances), longest)
        for row, utterance in enumerate(utterances):
            audio[row, : len(utterance.audio)] = torch.from_numpy(utterance.audio)
        lengths = torch.tensor([len(u.audio) for u in utterances])
        codes = codec.encode(audio, lengths).cpu().numpy()
        for row, utterance in enumerate(utterances):
            frames = math.ceil(len(utterance.audio) / hop)
            writer.add(utterance.id, codes[row, :frames], utterance.text, utterance.speaker,
                       len(utterance.audio) / utterance.sample_rate)


def run(cfg: DictConfig, run_dir: Path) -> None:
    stage = cfg.stage
    codec_dir = find_run(stage.codec_run, cfg.paths.runs_dir, "codec")
    codec = load_codec(codec_dir)
    meta = {"codec_run": str(codec_dir), "codebook_size": codec.codebook_size,
            "frame_rate": codec.frame_rate, "sample_rate": codec.sample_rate, "hop_length": codec.hop_length}
    summary = {}
    for split in stage.splits:
        split_dir = Path(run_dir) / "shards" / split
        if is_complete(split_dir):
            log.info("split %s already tokenized in %s: skipped", split, split_dir)
            continue
        started = time.perf_counter()
        dataset = build_dataset(cfg.data, split, sample_rate=codec.sample_rate)
        writer = ShardWriter(split_dir, max_codes_per_shard=int(stage.max_codes_per_shard))
        tokenize_split(codec, dataset, writer, int(stage.batch_size), desc=f"tokenize {split}")
        written = writer.close({**meta, "split": split, "skipped": dataset.skipped.summary()})
        seconds = time.perf_counter() - started
        audio_seconds = written["num_codes"] / codec.frame_rate
        summary[split] = {"utterances": written["num_utterances"], "codes": written["num_codes"],
                          "audio_hours": audio_seconds / 3600, "x_real_time": audio_seconds / seconds}
        log.info("%s: %d utterances, %d codes, %.0fx real time", split, written["num_utterances"],
                 written["num_codes"], audio_seconds / seconds)
    write_metrics(run_dir, {"tokenize": summary, **meta})
