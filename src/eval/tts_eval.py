"""TTS evaluation: speak held-out sentences in a reference speaker's voice and judge the audio.

Each condition pairs a split of target sentences with where their voice prompts come from: test_seen takes
each prompt from the same speaker's train utterances, test_unseen (zero-shot) from another utterance of the
unseen speaker. A target is spoken by the SpeechLM after its voice prompt (the reference recording's
transcript and codec codes, as `synth.py voice=ref.wav` does) and decoded by the codec. Scored per utterance:

- Whisper tiny.en WER of the synthesis, next to the WER of the ground-truth recording of the same sentence
  and of that recording passed through the codec (the ceiling the SpeechLM can reach with this codec);
- resemblyzer speaker similarity to the reference recording (the ground truth's is the ceiling);
- DNSMOS (overall, signal, background); real-time factor of generation + decoding.

An empty synthesis (the model stopped at once) counts as a failure rather than a gap: it is heard as "",
its speaker similarity is 0 and its DNSMOS the scale's floor, 1. Writes tts_eval.json (per-utterance
records, summaries and bootstrap 95% intervals), tts_eval.md and samples/ (wavs and a mel figure).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from voxlm.codec.model import Codec
from voxlm.codec.module import load_codec
from voxlm.data.audio import save_audio
from voxlm.data.dataset import build_dataset
from voxlm.data.text import normalize_text
from voxlm.eval.asr import WhisperJudge, corpus_wer, utterance_wers
from voxlm.eval.dnsmos import DnsmosJudge
from voxlm.eval.report import bootstrap_ci, markdown_table, plot_mel_pairs, write_json
from voxlm.eval.speaker import SpeakerJudge
from voxlm.speechlm.generate import SamplingConfig, frame_limit, generate_codes
from voxlm.speechlm.model import load_speechlm
from voxlm.speechlm.sequences import tts_prompt
from voxlm.speechlm.tokenizer import SpeechTokenizer
from voxlm.speechlm.voices import decoding_voice

log = logging.getLogger(__name__)

MIN_SCORED_SECONDS = 0.1  # shorter syntheses get the floor scores: the judges cannot embed nothing
DNSMOS_FLOOR = 1.0


@dataclass
class Case:
    """One target sentence, its ground-truth recording, and the reference recording that gives the voice."""

    id: str
    text: str
    speaker: str
    audio: np.ndarray
    reference_id: str
    reference_text: str
    reference_audio: np.ndarray


@dataclass
class Judges:
    """Loaded once, shared by every condition (and by RLHF evaluations)."""

    asr: WhisperJudge
    speaker: SpeakerJudge
    dnsmos: DnsmosJudge

    @classmethod
    def load(cls, judges_cfg: DictConfig) -> Judges:
        """The judges that `judges` (configs/train.yaml) describes."""
        return cls(WhisperJudge.from_config(judges_cfg.asr), SpeakerJudge(), DnsmosJudge())


def build_cases(data_cfg: DictConfig, split: str, reference_split: str, sample_rate: int, limit: int,
                max_prompt_seconds: float, seed: int = 0, max_target_seconds: float = math.inf,
                shuffle: bool = False) -> list[Case]:
    """The first `limit` utterances of `split` (at most max_target_seconds long; in a seeded random order
    with `shuffle`) that have a reference: another utterance of the same speaker in `reference_split`, at most
    max_prompt_seconds long, drawn by a generator seeded with (seed, index)."""
    targets = build_dataset(data_cfg, split, sample_rate=sample_rate)
    references = targets if reference_split == split else build_dataset(data_cfg, reference_split,
                                                                       sample_rate=sample_rate)
    reference_ids = references.ids
    pool: dict[str, list[int]] = defaultdict(list)
    for j, (speaker, duration) in enumerate(zip(references.speakers, references.durations, strict=True)):
        if duration <= max_prompt_seconds:
            pool[speaker].append(j)
    target_ids, target_speakers = targets.ids, targets.speakers
    order = np.random.default_rng(seed).permutation(len(targets)) if shuffle else range(len(targets))
    cases, no_reference = [], set()
    for i in map(int, order):
        if len(cases) == limit:
            break
        if targets.durations[i] > max_target_seconds:
            continue
        candidates = [j for j in pool.get(target_speakers[i], []) if reference_ids[j] != target_ids[i]]
        if not candidates:
            no_reference.add(target_speakers[i])
            continue
        j = candidates[int(np.random.default_rng([seed, i]).integers(len(candidates)))]
        target, reference = targets[i], references[j]
        if target is None or reference is None:  # unreadable audio: skipped and counted by the dataset
            continue
        cases.append(Case(target.id, target.text, target.speaker, target.audio, reference.id, reference.text,
                          reference.audio))
    if no_reference:
        log.warning("%s: no reference of at most %.1f s in %s for speakers %s; their utterances are left out",
                    split, max_prompt_seconds, reference_split, sorted(no_reference))
    if not cases:
        raise ValueError(f"no {split} utterance has a reference in {reference_split}: raise "
                         f"eval.max_prompt_seconds (now {max_prompt_seconds})")
    return cases


@torch.inference_mode()
def encode_audio(codec: Codec, audio: np.ndarray) -> np.ndarray:
    device = codec.quantizer.levels.device
    return codec.encode(torch.from_numpy(audio).float()[None].to(device))[0].cpu().numpy().astype(np.int64)


@torch.inference_mode()
def decode_codes(codec: Codec, codes: torch.Tensor, voice: torch.Tensor | None = None) -> np.ndarray:
    """codes [F] -> audio, in `voice` (voxlm.speechlm.voices.decoding_voice) for a codec with a voice
    encoder."""
    if not len(codes):
        return np.zeros(0, np.float32)
    device = codec.quantizer.levels.device
    return codec.decode(codes[None].to(device), voice)[0].float().cpu().numpy()


def case_prompt(tok: SpeechTokenizer, codec: Codec, case: Case) -> np.ndarray:
    """The tts prompt for a case: the reference's transcript + the target text, then the reference's codes
    (encoded now by this codec, as `synth.py voice=ref.wav` does)."""
    return tts_prompt(tok, normalize_text(case.text), normalize_text(case.reference_text),
                      encode_audio(codec, case.reference_audio))


def synthesize_cases(model: torch.nn.Module, tok: SpeechTokenizer, codec: Codec, cases: list[Case],
                     sampling: SamplingConfig, length_cfg: DictConfig,
                     batch_size: int) -> list[dict[str, Any]]:
    """Speak every case after its voice prompt, in batches: audio, codes, truncated, wall seconds per batch
    shared out by audio length (so the condition's real-time factor is total wall / total audio)."""
    rate = codec.frame_rate
    outputs = []
    for start in tqdm(range(0, len(cases), batch_size), desc="synthesize", unit="batch", leave=False):
        batch = cases[start: start + batch_size]
        prompts, limits = [], []
        spoken = ([tok.spoken_char_ids(normalize_text(case.text)) for case in batch] if tok.interleaved
                  else None)
        for case in batch:
            prompts.append(case_prompt(tok, codec, case))
            num_tokens = len(tok.encode_text(normalize_text(case.text)))
            limits.append(frame_limit(num_tokens, length_cfg.base_seconds * rate,
                                      length_cfg.seconds_per_text_token * rate))
        started = time.perf_counter()
        generation = generate_codes(model, tok, prompts, limits, sampling, spoken=spoken)
        audios = [decode_codes(codec, codes, decoding_voice(codec, case.reference_audio))
                  for codes, case in zip(generation.codes, batch, strict=True)]
        seconds = time.perf_counter() - started
        total_samples = max(1, sum(len(audio) for audio in audios))
        for audio, codes, truncated in zip(audios, generation.codes, generation.truncated, strict=True):
            outputs.append({"audio": audio, "codes": codes.cpu().numpy(), "truncated": bool(truncated),
                            "seconds": seconds * len(audio) / total_samples})
    return outputs


def speaker_similarities(judge: SpeakerJudge, audios: list[np.ndarray], references: list[np.ndarray],
                         sample_rate: int) -> np.ndarray:
    """Cosine similarity of each clip to its reference; 0 for a clip too short to embed."""
    scored = [i for i, audio in enumerate(audios) if len(audio) >= MIN_SCORED_SECONDS * sample_rate]
    values = np.zeros(len(audios))
    if scored:
        values[scored] = judge.similarities([audios[i] for i in scored], [references[i] for i in scored],
                                            sample_rate)
    return values


def dnsmos_scores(judge: DnsmosJudge, audios: list[np.ndarray], sample_rate: int) -> list[dict[str, float]]:
    """DNSMOS of each clip; the floor for a clip too short to score."""
    scored = [i for i, audio in enumerate(audios) if len(audio) >= MIN_SCORED_SECONDS * sample_rate]
    floor = {"ovrl": DNSMOS_FLOOR, "sig": DNSMOS_FLOOR, "bak": DNSMOS_FLOOR, "p808": DNSMOS_FLOOR}
    results = [dict(floor) for _ in audios]
    for i, score in zip(scored, judge.score([audios[i] for i in scored], sample_rate), strict=True):
        results[i] = score
    return results


def judge_condition(cases: list[Case], outputs: list[dict[str, Any]], resynthesized: list[np.ndarray],
                    judges: Judges, sample_rate: int) -> list[dict[str, Any]]:
    """Per-utterance records: what Whisper heard and the scores of the synthesis and of the ground truth."""
    texts = [case.text for case in cases]
    synthesized = [output["audio"] for output in outputs]
    ground_truth = [case.audio for case in cases]
    references = [case.reference_audio for case in cases]
    heard = {name: judges.asr.transcribe(audios, sample_rate) for name, audios in
             (("synth", synthesized), ("ground_truth", ground_truth), ("codec_resynth", resynthesized))}
    wers = {name: utterance_wers(texts, hypotheses) for name, hypotheses in heard.items()}
    similarity = {"synth": speaker_similarities(judges.speaker, synthesized, references, sample_rate),
                  "ground_truth": speaker_similarities(judges.speaker, ground_truth, references, sample_rate)}
    mos = {"synth": dnsmos_scores(judges.dnsmos, synthesized, sample_rate),
           "ground_truth": dnsmos_scores(judges.dnsmos, ground_truth, sample_rate)}
    records = []
    for i, (case, output) in enumerate(zip(cases, outputs, strict=True)):
        records.append({
            "id": case.id, "speaker": case.speaker, "reference_id": case.reference_id, "text": case.text,
            "heard": heard["synth"][i], "heard_ground_truth": heard["ground_truth"][i],
            "heard_codec_resynth": heard["codec_resynth"][i],
            "wer": wers["synth"][i], "wer_ground_truth": wers["ground_truth"][i],
            "wer_codec_resynth": wers["codec_resynth"][i],
            "speaker_sim": float(similarity["synth"][i]),
            "speaker_sim_ground_truth": float(similarity["ground_truth"][i]),
            "dnsmos": mos["synth"][i], "dnsmos_ground_truth": mos["ground_truth"][i],
            "seconds": len(output["audio"]) / sample_rate,
            "seconds_ground_truth": len(case.audio) / sample_rate,
            "wall_seconds": output["seconds"], "truncated": output["truncated"],
        })
    return records


def summarize_condition(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Table rows: the synthesis, the ground truth and the codec resynthesis of the ground truth."""
    texts = [r["text"] for r in records]
    wer = corpus_wer(texts, [r["heard"] for r in records])
    wer_ground_truth = corpus_wer(texts, [r["heard_ground_truth"] for r in records])
    audio_seconds = sum(r["seconds"] for r in records)

    def mean(key: str, sub: str | None = None) -> float:
        return float(np.mean([r[key][sub] if sub else r[key] for r in records]))

    synth = {
        "n": len(records), "wer": wer,
        "wer_ratio": wer / wer_ground_truth if wer_ground_truth > 0 else math.inf,
        "speaker_sim": mean("speaker_sim"), "dnsmos_ovrl": mean("dnsmos", "ovrl"),
        "dnsmos_sig": mean("dnsmos", "sig"), "dnsmos_bak": mean("dnsmos", "bak"),
        "rtf": sum(r["wall_seconds"] for r in records) / audio_seconds if audio_seconds else math.inf,
        "duration_ratio": audio_seconds / sum(r["seconds_ground_truth"] for r in records),
        "truncated_share": mean("truncated"),
    }
    ground_truth = {
        "n": len(records), "wer": wer_ground_truth,
        "speaker_sim": mean("speaker_sim_ground_truth"), "dnsmos_ovrl": mean("dnsmos_ground_truth", "ovrl"),
        "dnsmos_sig": mean("dnsmos_ground_truth", "sig"), "dnsmos_bak": mean("dnsmos_ground_truth", "bak"),
    }
    codec_resynth = {"n": len(records), "wer": corpus_wer(texts, [r["heard_codec_resynth"] for r in records])}
    return {"synth": synth, "ground_truth": ground_truth, "codec_resynth": codec_resynth}


def speaker_rows(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """One row per voice: where a pooled ratio hides that Whisper reads some voices' recordings well and
    others' poorly (an unintelligible synthesis scores ~1 against either)."""
    by_speaker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_speaker[record["speaker"]].append(record)
    rows = {}
    for speaker, group in sorted(by_speaker.items()):
        texts = [r["text"] for r in group]
        rows[speaker] = {
            "n": len(group), "wer": corpus_wer(texts, [r["heard"] for r in group]),
            "wer_ground_truth": corpus_wer(texts, [r["heard_ground_truth"] for r in group]),
            "wer_codec_resynth": corpus_wer(texts, [r["heard_codec_resynth"] for r in group]),
            "speaker_sim": float(np.mean([r["speaker_sim"] for r in group])),
        }
    return rows


def intervals(records: list[dict[str, Any]], seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap 95% intervals of the per-utterance means: [mean, low, high]."""
    return {
        "utterance_wer": list(bootstrap_ci([r["wer"] for r in records], seed=seed)),
        "utterance_wer_ground_truth": list(bootstrap_ci([r["wer_ground_truth"] for r in records], seed=seed)),
        "speaker_sim": list(bootstrap_ci([r["speaker_sim"] for r in records], seed=seed)),
        "dnsmos_ovrl": list(bootstrap_ci([r["dnsmos"]["ovrl"] for r in records], seed=seed)),
    }


def save_samples(name: str, cases: list[Case], outputs: list[dict[str, Any]], count: int, sample_rate: int,
                 out_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The first `count` cases as wavs (synthesis, ground truth, reference); mel pairs for the figure."""
    pairs = []
    for case, output in list(zip(cases, outputs, strict=True))[:count]:
        folder = out_dir / "samples" / name
        save_audio(folder / f"{case.id}.synth.wav", output["audio"], sample_rate)
        save_audio(folder / f"{case.id}.ground_truth.wav", case.audio, sample_rate)
        save_audio(folder / f"{case.id}.reference.wav", case.reference_audio, sample_rate)
        if len(output["audio"]):
            pairs.append((f"{name}/{case.id}", case.audio, output["audio"]))
    return pairs


def evaluate_tts(eval_cfg: DictConfig, data_cfg: DictConfig, judges: Judges) -> dict[str, Any]:
    """Evaluate eval_cfg.speechlm_run with eval_cfg.codec_run on every condition; write the reports."""
    device = "cuda" if eval_cfg.device == "auto" and torch.cuda.is_available() else (
        "cpu" if eval_cfg.device == "auto" else eval_cfg.device)
    codec = load_codec(eval_cfg.codec_run, map_location=device)
    model, tok = load_speechlm(eval_cfg.speechlm_run, codec.codebook_size, device, eval_cfg.dtype,
                               codec_id=codec.code_fingerprint())
    sampling = SamplingConfig(**OmegaConf.to_container(eval_cfg.sampling))
    out_dir = Path(eval_cfg.out)
    sample_rate = codec.sample_rate
    report: dict[str, Any] = {
        "speechlm_run": str(eval_cfg.speechlm_run), "codec_run": str(eval_cfg.codec_run),
        "sampling": OmegaConf.to_container(eval_cfg.sampling), "batch_size": int(eval_cfg.batch_size),
        "device": device, "dtype": eval_cfg.dtype, "judge": {"asr": judges.asr.model_path,
                                                              "beam_size": judges.asr.beam_size},
        "conditions": {}, "intervals": {}, "by_speaker": {}, "records": {},
    }
    table, figure = {}, []
    for name, condition in eval_cfg.conditions.items():
        cases = build_cases(data_cfg, condition.split, condition.reference_split, sample_rate,
                            int(eval_cfg.max_utterances), float(eval_cfg.max_prompt_seconds),
                            int(eval_cfg.seed))
        log.info("%s: %d sentences, voices from %s", name, len(cases), condition.reference_split)
        outputs = synthesize_cases(model, tok, codec, cases, sampling, eval_cfg.length,
                                   int(eval_cfg.batch_size))
        resynthesized = [decode_codes(codec, torch.from_numpy(encode_audio(codec, case.audio)),
                                      decoding_voice(codec, case.reference_audio)) for case in cases]
        records = judge_condition(cases, outputs, resynthesized, judges, sample_rate)
        rows = summarize_condition(records)
        report["conditions"][name] = rows
        report["intervals"][name] = intervals(records, int(eval_cfg.seed))
        report["by_speaker"][name] = speaker_rows(records)
        report["records"][name] = records
        for row_name, row in rows.items():
            table[f"{name}/{row_name}"] = row
        figure += save_samples(name, cases, outputs, int(eval_cfg.num_samples), sample_rate, out_dir)
        log.info("%s: %s", name, rows["synth"])
    write_json(report, out_dir / "tts_eval.json")
    columns = ["n", "wer", "wer_ratio", "speaker_sim", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "rtf",
               "duration_ratio", "truncated_share"]
    lines = [f"# TTS evaluation: {eval_cfg.speechlm_run}", "",
             f"Codec {eval_cfg.codec_run}; sampling {report['sampling']}; batch {report['batch_size']} on "
             f"{device}; Whisper beam {judges.asr.beam_size}. synth: the SpeechLM after a voice prompt; "
             "ground_truth: the recording of the same sentence; codec_resynth: that recording through the "
             "codec.", "",
             markdown_table(table, columns), "", "## Bootstrap 95% intervals [mean, low, high]", "",
             markdown_table({name: {k: f"[{v[0]:.3f}, {v[1]:.3f}, {v[2]:.3f}]" for k, v in ci.items()}
                             for name, ci in report["intervals"].items()}), ""]
    for name, rows in report["by_speaker"].items():
        lines += [f"## {name} by voice", "", markdown_table(rows, ["n", "wer", "wer_ground_truth",
                                                                   "wer_codec_resynth", "speaker_sim"],
                                                      row_label="voice"), ""]
    (out_dir / "tts_eval.md").write_text("\n".join(lines))
    if figure:
        plot_mel_pairs(figure, sample_rate, out_dir / "samples" / "mels.png")
    log.info("TTS evaluation written to %s", out_dir)
    return report
