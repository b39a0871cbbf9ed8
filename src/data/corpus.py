"""The offline multi-speaker English corpus: real speech from flite, festival and espeak-ng voices reading
sentences from Debian's fortunes and the King James Bible.

build_corpus(cfg) writes a Hugging Face DatasetDict (save_to_disk) with splits
    train        training speakers, training sentences
    val          training speakers, held-out sentences (model selection)
    test_seen    training speakers, held-out sentences never in train or val
    test_unseen  held-out speakers (never in train), test sentences: zero-shot voice cloning
and columns id, audio (embedded 16-bit wav), text, speaker, engine, duration; plus summary.json.
Everything is deterministic for a seed: the sentence pool, the split of sentences and the utterance plan.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import subprocess
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from voxlm.data.synth import Speaker, check_engines, synthesize
from voxlm.data.text import clean_sentence, split_sentences

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test_seen", "test_unseen")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_ATTRIBUTION_RE = re.compile(r"^\s*--\s")


@dataclass(frozen=True)
class Job:
    id: str
    text: str
    speaker: Speaker
    split: str


# ---------------------------------------------------------------- text

def fortune_sentences(categories: list[str], min_words: int, max_words: int) -> list[str]:
    """Sentences from the fortune cookie files (attributions and verse layouts dropped)."""
    sentences = []
    for category in categories:
        path = FORTUNES_DIR / category
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: `apt-get install fortunes` (scripts/setup.sh does)")
        for cookie in path.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
            prose = " ".join(line for line in cookie.splitlines() if not FORTUNE_ATTRIBUTION_RE.match(line))
            sentences += split_sentences(prose)
    return [s for s in (clean_sentence(s, min_words, max_words) for s in sentences) if s]


def bible_sentences(min_words: int, max_words: int) -> list[str]:
    """Sentences from every verse of the King James Bible (the `bible` command of bible-kjv)."""
    try:
        dump = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                              check=True, timeout=120).stdout
    except FileNotFoundError as exc:
        raise FileNotFoundError("`bible` is missing: `apt-get install bible-kjv bible-kjv-text`") from exc
    verses = [m.group(1) for m in re.finditer(r"^\s+\d+ (.+)$", dump, flags=re.MULTILINE)]
    sentences = [s for verse in verses for s in split_sentences(verse)]
    return [s for s in (clean_sentence(s, min_words, max_words) for s in sentences) if s]


def sentence_pool(text_cfg: DictConfig, seed: int) -> list[str]:
    """Deduplicated, shuffled sentences from the configured sources."""
    sentences = []
    if text_cfg.fortunes:
        sentences += fortune_sentences(list(text_cfg.fortunes), text_cfg.min_words, text_cfg.max_words)
    if text_cfg.bible:
        sentences += bible_sentences(text_cfg.min_words, text_cfg.max_words)
    unique = sorted(set(sentences))
    random.Random(seed).shuffle(unique)
    if not unique:
        raise ValueError("no sentences: enable text.fortunes categories and/or text.bible")
    return unique


# ---------------------------------------------------------------- plan

def speakers_from_config(cfg: DictConfig) -> list[Speaker]:
    speakers = [Speaker(id=s.id, engine=s.engine, voice=s.voice,
                        params=OmegaConf.to_container(s.params) if s.get("params") else {},
                        duration_jitter=float(s.get("duration_jitter", 0.0)))
                for s in cfg.speakers]
    ids = [s.id for s in speakers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"speaker ids must be unique: {[i for i, n in Counter(ids).items() if n > 1]}")
    unknown = set(cfg.unseen_speakers) - set(ids)
    if unknown:
        raise ValueError(f"unseen_speakers names speakers not in the speaker list: {sorted(unknown)}")
    if set(cfg.unseen_speakers) == set(ids):
        raise ValueError("every speaker is in unseen_speakers: leave some for training")
    return speakers


def plan_jobs(cfg: DictConfig, speakers: list[Speaker], sentences: list[str]) -> list[Job]:
    """Which speaker says which sentence in which split.

    The sentence pool is cut into disjoint parts first: test sentences, val sentences, train sentences, so
    no held-out sentence is ever heard in training. The training hours go to engines by `engine_weights`
    (intelligible engines get more), split evenly among each engine's training speakers.
    """
    if cfg.hours <= 0:
        raise ValueError(f"hours must be > 0 (got {cfg.hours})")
    per_speaker = cfg.per_speaker
    unseen = [s for s in speakers if s.id in set(cfg.unseen_speakers)]
    seen = [s for s in speakers if s.id not in set(cfg.unseen_speakers)]
    n_test = max(per_speaker.test_seen, per_speaker.test_unseen) * 4
    n_val = per_speaker.val * 4
    test_pool, val_pool, train_pool = sentences[:n_test], sentences[n_test: n_test + n_val], \
        sentences[n_test + n_val:]
    if not train_pool:
        raise ValueError(f"only {len(sentences)} sentences: too few for the held-out splits")

    weights = {engine: float(w) for engine, w in cfg.engine_weights.items()}
    unknown = {s.engine for s in seen} - set(weights)
    if unknown:
        raise ValueError(f"engine_weights lacks {sorted(unknown)}")
    engines = sorted({s.engine for s in seen})
    total_weight = sum(weights[e] for e in engines)
    train_seconds = cfg.hours * 3600
    jobs: list[Job] = []
    cursor = defaultdict(int)

    def take(pool: list[str], key: str, count: int, rng_offset: int) -> list[str]:
        # Each speaker walks the pool from its own offset, so speakers say different sentences.
        start = cursor[key] + rng_offset
        cursor[key] += count
        return [pool[(start + i) % len(pool)] for i in range(count)]

    for index, speaker in enumerate(seen):
        engine_speakers = [s for s in seen if s.engine == speaker.engine]
        seconds = train_seconds * weights[speaker.engine] / total_weight / len(engine_speakers)
        count = max(1, int(round(seconds / cfg.mean_utterance_seconds)))
        offset = index * 7919  # a prime stride spreads speakers over the pool
        for split, pool, n in (("train", train_pool, count), ("val", val_pool, per_speaker.val),
                               ("test_seen", test_pool, per_speaker.test_seen)):
            for i, text in enumerate(take(pool, f"{speaker.id}/{split}", n, offset)):
                jobs.append(Job(f"{speaker.id}-{split}-{i:05d}", text, speaker, split))
    for index, speaker in enumerate(unseen):
        for i, text in enumerate(take(test_pool, f"{speaker.id}/unseen", per_speaker.test_unseen, index * 13)):
            jobs.append(Job(f"{speaker.id}-test_unseen-{i:05d}", text, speaker, "test_unseen"))
    return jobs


# ---------------------------------------------------------------- synthesis

def _synthesize_chunk(jobs: list[Job], sample_rate: int, min_rms: float) -> list[tuple[Job, bytes | str, float]]:
    """Worker: speak a chunk of one speaker's jobs; returns (job, wav bytes or error, duration)."""
    speaker = jobs[0].speaker
    audio_by_id = synthesize(speaker, [(job.id, job.text) for job in jobs], sample_rate)
    results = []
    for job in jobs:
        audio = audio_by_id[job.id]
        if isinstance(audio, str):
            results.append((job, audio, 0.0))
            continue
        if len(audio) == 0 or float(np.sqrt(np.mean(audio**2))) < min_rms:
            results.append((job, "silent", 0.0))
            continue
        buffer = io.BytesIO()
        sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
        results.append((job, buffer.getvalue(), len(audio) / sample_rate))
    return results


def chunked(jobs: list[Job], size: int) -> list[list[Job]]:
    by_speaker = defaultdict(list)
    for job in jobs:
        by_speaker[job.speaker.id].append(job)
    return [group[i: i + size] for group in by_speaker.values() for i in range(0, len(group), size)]


def synthesize_jobs(jobs: list[Job], sample_rate: int, workers: int, chunk_size: int, min_rms: float,
                    ) -> tuple[dict[str, list[dict]], Counter]:
    """Run every job on a process pool; returns rows per split and failure counts by reason."""
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    failures: Counter = Counter()
    chunks = chunked(jobs, chunk_size)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_synthesize_chunk, chunk, sample_rate, min_rms) for chunk in chunks]
        with tqdm(total=len(jobs), desc="synthesize", unit="utt") as progress:
            for future in as_completed(futures):
                for job, audio, duration in future.result():
                    progress.update(1)
                    if isinstance(audio, str):
                        failures["silent" if audio == "silent" else "engine error"] += 1
                        log.debug("%s failed: %s", job.id, audio)
                        continue
                    rows[job.split].append({
                        "id": job.id, "audio": {"bytes": audio, "path": f"{job.id}.wav"}, "text": job.text,
                        "speaker": job.speaker.id, "engine": job.speaker.engine, "duration": round(duration, 4),
                    })
    for split_rows in rows.values():
        split_rows.sort(key=lambda row: row["id"])  # completion order is not deterministic
    return rows, failures


# ---------------------------------------------------------------- output

def summarize(rows: dict[str, list[dict]], failures: Counter, seconds: float, cpu_seconds: float) -> dict:
    splits = {}
    for split, split_rows in rows.items():
        speakers = sorted({row["speaker"] for row in split_rows})
        by_engine = defaultdict(float)
        for row in split_rows:
            by_engine[row["engine"]] += row["duration"] / 3600
        splits[split] = {"utterances": len(split_rows), "hours": sum(r["duration"] for r in split_rows) / 3600,
                         "speakers": len(speakers), "speaker_ids": speakers,
                         "hours_by_engine": dict(sorted(by_engine.items()))}
    hours = sum(s["hours"] for s in splits.values())
    return {"splits": splits, "hours": hours, "failures": dict(failures), "wall_seconds": seconds,
            "cpu_minutes": cpu_seconds / 60,
            "hours_per_cpu_minute": hours / (cpu_seconds / 60) if cpu_seconds else float("nan")}


def save_dataset(rows: dict[str, list[dict]], out: Path, sample_rate: int) -> None:
    from datasets import Audio, Dataset, DatasetDict, Features, Value

    # The audio column is built as a plain {bytes, path} struct and then cast to Audio: encoding through
    # the Audio feature would need torchcodec, the cast stores the same bytes without it.
    audio_struct = {"bytes": Value("binary"), "path": Value("string")}
    features = Features({"id": Value("string"), "audio": audio_struct, "text": Value("string"),
                         "speaker": Value("string"), "engine": Value("string"), "duration": Value("float32")})
    dataset = DatasetDict({
        split: Dataset.from_list(split_rows, features=features).cast_column(
            "audio", Audio(sampling_rate=sample_rate))
        for split, split_rows in rows.items()})
    dataset.save_to_disk(str(out))


def build_corpus(cfg: DictConfig) -> dict:
    """Build the corpus described by cfg into cfg.out; returns the summary (also in out/summary.json).

    A corpus already built from the same config is kept as it is (the build is skipped).
    """
    out = Path(cfg.out)
    # What decides the corpus' content; where it goes and how many workers make it do not.
    fingerprint = {key: value for key, value in OmegaConf.to_container(cfg, resolve=False).items()
                   if key not in ("paths", "out", "workers", "hydra")}
    done = out / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("config") == fingerprint:
        summary = json.loads(done.read_text())
        log.info("corpus at %s is already built from this config: kept", out)
        return summary
    speakers = speakers_from_config(cfg)
    check_engines(speakers)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    sentences = sentence_pool(cfg.text, cfg.seed)
    jobs = plan_jobs(cfg, speakers, sentences)
    log.info("%d sentences, %d speakers, %d utterances to synthesize", len(sentences), len(speakers), len(jobs))
    rows, failures = synthesize_jobs(jobs, cfg.sample_rate, cfg.workers, cfg.chunk_size, cfg.min_rms)
    if not rows["train"]:
        raise RuntimeError(f"no training audio was produced ({dict(failures)}): check the engines")
    out.mkdir(parents=True, exist_ok=True)
    save_dataset(rows, out, cfg.sample_rate)
    summary = summarize(rows, failures, time.perf_counter() - started, _cpu_seconds() - cpu_started)
    summary["config"] = fingerprint
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the synthesis workers and engines)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def format_summary(summary: dict) -> str:
    lines = [f"{'split':<12}{'utterances':>11}{'hours':>8}{'speakers':>10}"]
    for split, s in summary["splits"].items():
        lines.append(f"{split:<12}{s['utterances']:>11}{s['hours']:>8.3f}{s['speakers']:>10}")
    lines.append(f"total {summary['hours']:.3f} h of audio in {summary['wall_seconds']:.0f} s "
                 f"({summary['cpu_minutes']:.1f} CPU-minutes: {summary['hours_per_cpu_minute']:.2f} h per "
                 f"CPU-minute); failures: {summary['failures'] or 'none'}")
    return "\n".join(lines)
