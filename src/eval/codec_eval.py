"""Codec evaluation: resynthesize held-out speech through a trained codec and measure what was kept.

For each condition (test_seen, test_unseen, and Debian's five real LibriVox clips): log-mel distance, STOI,
PESQ-WB, SI-SDR, Whisper tiny.en WER of the original and of the resynthesis (same normalizer on both),
codebook usage, streaming-vs-offline SNR, and encode/decode speed in x real time. Writes JSON, a markdown
table and a figure of original vs reconstruction mel spectrograms.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.data.dataset import build_dataset
from voxlm.eval.asr import WhisperJudge
from voxlm.eval.audio_metrics import (
    code_repeat,
    codebook_usage,
    log_mel_distance,
    pesq_wb,
    si_sdr,
    snr_db,
    stoi,
)
from voxlm.eval.report import markdown_table, plot_mel_pairs, write_json, write_markdown_table

log = logging.getLogger(__name__)

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")


@dataclass
class Clip:
    id: str
    audio: np.ndarray
    text: str
    speaker: str


def librivox_clips(sample_rate: int) -> list[Clip]:
    """The five real LibriVox clips shipped by Debian's pocketsphinx-testdata, with their transcripts."""
    from voxlm.data.audio import load_audio

    transcripts = {}
    for line in (LIBRIVOX_DIR / "transcription").read_text().splitlines():
        # Sphinx format: "<s> text words </s> (utterance_id)"; the sentence markers are not words
        text, _, utterance_id = line.rpartition(" (")
        text = text.replace("<s>", " ").replace("</s>", " ")
        transcripts[utterance_id.rstrip(")").strip()] = " ".join(text.split())
    clips = []
    for path in sorted(LIBRIVOX_DIR.glob("*.wav")):
        audio, _ = load_audio(path, sample_rate)
        clips.append(Clip(path.stem, audio, transcripts.get(path.stem, ""), "librivox"))
    return clips


def split_clips(data_cfg: DictConfig, split: str, sample_rate: int, limit: int) -> list[Clip]:
    """The first `limit` usable utterances of a split (a fixed, deterministic selection)."""
    dataset = build_dataset(data_cfg, split, sample_rate=sample_rate)
    clips = []
    for i in range(len(dataset)):
        utterance = dataset[i]
        if utterance is not None:
            clips.append(Clip(utterance.id, utterance.audio, utterance.text, utterance.speaker))
        if len(clips) == limit:
            break
    return clips


@torch.inference_mode()
def resynthesize(codec: Codec, audio: np.ndarray, chunk_frames: list[int]) -> dict:
    """Offline encode/decode, plus a streaming decode with the given chunk schedule, with timings. A codec
    with a voice encoder decodes each clip in its own voice (its encoding counts in the encode time)."""
    waveform = torch.from_numpy(audio).float()[None]
    started = time.perf_counter()
    codes = codec.encode(waveform)
    voice = codec.voice(waveform) if codec.has_voice else None
    encode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    offline = codec.decode(codes, voice)[0, : len(audio)].numpy()
    decode_seconds = time.perf_counter() - started
    streamed = stream_decode(codec, codes, chunk_frames, voice)[: len(audio)]
    return {"codes": codes[0].numpy(), "offline": offline, "streamed": streamed,
            "encode_seconds": encode_seconds, "decode_seconds": decode_seconds}


def stream_decode(codec: Codec, codes: torch.Tensor, chunk_frames: list[int],
                  voice: torch.Tensor | None = None) -> np.ndarray:
    """Decode chunk by chunk the way the server does: the schedule's sizes, then its last size repeated."""
    state = codec.init_stream(codes.shape[0], voice)
    pieces, start, step = [], 0, 0
    while start < codes.shape[1]:
        size = chunk_frames[min(step, len(chunk_frames) - 1)]
        audio, state = codec.stream(codes[:, start: start + size], state)
        pieces.append(audio)
        start, step = start + size, step + 1
    tail = codec.flush(state)
    if tail is not None:
        pieces.append(tail)
    return torch.cat(pieces, dim=1)[0].numpy()


def evaluate_condition(codec: Codec, clips: list[Clip], judge: WhisperJudge, chunk_frames: list[int]) -> dict:
    sample_rate = codec.sample_rate
    rows, originals, reconstructions, all_codes = [], [], [], []
    audio_seconds = encode_seconds = decode_seconds = 0.0
    for clip in tqdm(clips, desc="resynthesize", unit="clip", leave=False):
        out = resynthesize(codec, clip.audio, chunk_frames)
        reference, estimate = clip.audio, out["offline"]
        rows.append({
            "mel_distance": log_mel_distance(reference, estimate, sample_rate),
            "stoi": stoi(reference, estimate, sample_rate),
            "pesq_wb": pesq_wb(reference, estimate, sample_rate),
            "si_sdr": si_sdr(reference, estimate),
            "stream_snr_db": snr_db(out["offline"], out["streamed"]),
        })
        originals.append(reference)
        reconstructions.append(estimate)
        all_codes.append(out["codes"])
        audio_seconds += len(reference) / sample_rate
        encode_seconds += out["encode_seconds"]
        decode_seconds += out["decode_seconds"]
    texts = [clip.text for clip in clips]
    heard_original = judge.transcribe(originals, sample_rate)
    heard_resynth = judge.transcribe(reconstructions, sample_rate)
    wer_original = judge.wer(texts, heard_original)
    wer_resynth = judge.wer(texts, heard_resynth)
    # Per speaker: a ratio over a pool dominated by voices Whisper already misreads says little on its own.
    wer_by_speaker = {}
    for speaker in sorted({clip.speaker for clip in clips}):
        members = [i for i, clip in enumerate(clips) if clip.speaker == speaker]
        wer_by_speaker[speaker] = {
            "n": len(members),
            "wer_original": judge.wer([texts[i] for i in members], [heard_original[i] for i in members]),
            "wer_resynth": judge.wer([texts[i] for i in members], [heard_resynth[i] for i in members]),
        }
    usage = codebook_usage(np.concatenate(all_codes), codec.codebook_size)
    summary = {name: float(np.nanmean([row[name] for row in rows])) for name in rows[0]}
    summary["stream_snr_db_min"] = float(np.min([row["stream_snr_db"] for row in rows]))
    summary.update({
        "n": len(clips), "wer_original": wer_original, "wer_resynth": wer_resynth,
        "wer_ratio": wer_resynth / wer_original if wer_original > 0 else math.inf,
        "codebook_share_used": usage["share_used"], "codebook_perplexity": usage["perplexity"],
        "code_repeat": code_repeat(all_codes),
        "encode_x_real_time": audio_seconds / encode_seconds,
        "decode_x_real_time": audio_seconds / decode_seconds,
    })
    return {"summary": summary, "wer_by_speaker": wer_by_speaker,
            "examples": (originals[:3], reconstructions[:3], [c.id for c in clips[:3]])}


def evaluate_codec(codec_dir: Path, data_cfg: DictConfig, out_dir: Path, splits: list[str], limit: int,
                   chunk_frames: list[int], judge: WhisperJudge, include_librivox: bool = True) -> dict:
    """Evaluate the codec of a codec run on each split (+ LibriVox); write JSON, markdown and a figure."""
    codec = load_codec(codec_dir)
    conditions = {split: split_clips(data_cfg, split, codec.sample_rate, limit) for split in splits}
    if include_librivox and LIBRIVOX_DIR.is_dir():
        conditions["librivox"] = librivox_clips(codec.sample_rate)
    results, by_speaker, figure_rows = {}, {}, []
    for name, clips in conditions.items():
        log.info("evaluating %s (%d clips)", name, len(clips))
        evaluated = evaluate_condition(codec, clips, judge, chunk_frames)
        results[name] = evaluated["summary"]
        by_speaker[name] = evaluated["wer_by_speaker"]
        originals, reconstructions, ids = evaluated["examples"]
        figure_rows += [(f"{name}/{clip_id}", original, reconstruction) for clip_id, original, reconstruction
                        in zip(ids[:2], originals, reconstructions, strict=False)]
    report = {
        "codec_run": str(codec_dir), "sample_rate": codec.sample_rate, "frame_rate": codec.frame_rate,
        "codebook_size": codec.codebook_size,
        "bitrate_bps": codec.frame_rate * math.log2(codec.codebook_size),
        "stream_chunk_frames": list(chunk_frames), "conditions": results, "wer_by_speaker": by_speaker,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, out_dir / "codec_eval.json")
    write_markdown_table(results, out_dir / "codec_eval.md",
                         title=f"Codec evaluation: {codec_dir} ({report['bitrate_bps']:.0f} bps)")
    speaker_rows = {f"{name}/{speaker}": row for name, speakers in by_speaker.items()
                    for speaker, row in speakers.items()}
    with open(out_dir / "codec_eval.md", "a") as f:
        f.write("\n## Whisper tiny.en WER by speaker\n\n" + markdown_table(speaker_rows) + "\n")
    plot_mel_pairs(figure_rows, codec.sample_rate, out_dir / "codec_mels.png")
    log.info("codec evaluation written to %s:\n%s", out_dir, json.dumps(results, indent=1))
    return report
