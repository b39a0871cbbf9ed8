"""`python train.py stage=tokenize`: encode every split of a dataset into code shards with a trained codec.

Reads: the codec run named by cfg.stage.codec_run ('latest' by default) and cfg.data.
Writes: <run folder>/shards/<split>/ (see voxlm.data.shards); the SpeechLM stages read only these. When the
codec run has a CTC head, every utterance's word and character timings go with its codes
(voxlm.codec.align).
A split whose shards are complete and were made from the same data and codec is skipped, so an interrupted
run resumes where it stopped; a changed corpus or codec is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from voxlm.codec.align import load_ctc_head, transcript_timings
from voxlm.codec.module import load_codec
from voxlm.data.dataset import build_dataset
from voxlm.data.shards import ShardWriter, is_complete
from voxlm.runs import file_digest, find_run, write_metrics

log = logging.getLogger(__name__)


def duration_batches(durations: list[float], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar duration, so little compute goes into padding."""
    order = sorted(range(len(durations)), key=lambda i: durations[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def data_fingerprint(data_cfg: DictConfig, max_files: int = 10_000) -> str:
    """What the shards were made from: the resolved data config plus the size and mtime of the files under
    its path (a corpus rebuilt in place, or an edited manifest, changes it)."""
    digest = hashlib.sha256(json.dumps(OmegaConf.to_container(data_cfg, resolve=True), sort_keys=True,
                                       default=str).encode())
    root = Path(str(data_cfg.path))
    files = sorted(p for p in root.rglob("*") if p.is_file())[:max_files] if root.is_dir() else [root]
    for path in files:
        if path.exists():
            stat = path.stat()
            digest.update(f"{path.relative_to(root) if root.is_dir() else path.name}:{stat.st_size}:"
                          f"{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def made_from(split_dir: Path, source: dict) -> bool:
    """True when the split's complete shards were written from exactly this source."""
    if not is_complete(split_dir):
        return False
    return json.loads((split_dir / "meta.json").read_text()).get("source") == source


@torch.inference_mode()
def tokenize_split(codec, dataset, writer: ShardWriter, batch_size: int, desc: str, ctc_head=None) -> int:
    """Encode the dataset into the writer; with a CTC head, align each transcript too (word cuts and
    character starts). Returns how many utterances were aligned."""
    hop = codec.hop_length
    aligned = 0
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
            cuts = starts = None
            if ctc_head is not None:
                cuts, starts = transcript_timings(ctc_head, codec.quantizer, codes[row, :frames],
                                                  utterance.text)
            aligned += cuts is not None
            writer.add(utterance.id, codes[row, :frames], utterance.text, utterance.speaker,
                       len(utterance.audio) / utterance.sample_rate, word_cuts=cuts, char_starts=starts)
    return aligned


def run(cfg: DictConfig, run_dir: Path) -> None:
    stage = cfg.stage
    codec_dir = find_run(stage.codec_run, cfg.paths.runs_dir, "codec")
    codec = load_codec(codec_dir)
    meta = {"codec_run": str(codec_dir), "codec_id": codec.code_fingerprint(),
            "codebook_size": codec.codebook_size, "frame_rate": codec.frame_rate,
            "sample_rate": codec.sample_rate, "hop_length": codec.hop_length}
    ctc_head = load_ctc_head(codec_dir)
    if ctc_head is not None:
        meta["alphabet"] = ctc_head.alphabet  # what char_starts count: voxlm.codec.losses.spoken_characters
    source = {"data": data_fingerprint(cfg.data), "codec": file_digest(codec_dir / "codec.pt")[:16],
              "word_cuts": ctc_head is not None, "char_starts": ctc_head is not None}
    summary = {}
    for split in stage.splits:
        split_dir = Path(run_dir) / "shards" / split
        if made_from(split_dir, source):
            log.info("split %s already tokenized from this data and codec in %s: skipped", split, split_dir)
            continue
        if is_complete(split_dir):
            log.info("split %s: the data or the codec changed since it was tokenized: re-encoding", split)
        started = time.perf_counter()
        dataset = build_dataset(cfg.data, split, sample_rate=codec.sample_rate)
        writer = ShardWriter(split_dir, max_codes_per_shard=int(stage.max_codes_per_shard))
        aligned = tokenize_split(codec, dataset, writer, int(stage.batch_size), desc=f"tokenize {split}",
                                 ctc_head=ctc_head)
        written = writer.close({**meta, "source": source, "split": split, "word_cuts": aligned,
                                "skipped": dataset.skipped.summary()})
        seconds = time.perf_counter() - started
        audio_seconds = written["num_codes"] / codec.frame_rate
        summary[split] = {"utterances": written["num_utterances"], "codes": written["num_codes"],
                          "word_cuts": aligned,
                          "audio_hours": audio_seconds / 3600, "x_real_time": audio_seconds / seconds}
        log.info("%s: %d utterances, %d codes, %.0fx real time", split, written["num_utterances"],
                 written["num_codes"], audio_seconds / seconds)
    write_metrics(run_dir, {"tokenize": summary, **meta})
