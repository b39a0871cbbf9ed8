"""The offline multi-speaker English corpus: flite, festival and espeak-ng voices reading sentences from
Debian's fortunes and the King James Bible.

build_corpus(cfg) writes a Hugging Face DatasetDict (save_to_disk) with splits
    train        training speakers, training sentences
    val          training speakers, held-out val sentences (model selection)
    test_seen    training speakers, held-out test sentences (never in train or val)
    test_unseen  held-out speakers (never in train or val), the same test sentences: zero-shot voice cloning
and columns id, audio (embedded 16-bit wav), text, speaker, engine, duration; plus summary.json.
Everything is deterministic for a seed: the sentence pool, the sentence split and who says what.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import resource
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

from voxlm.data.synth import ENGINES, Speaker, check_engines, synthesize
from voxlm.data.text import clean_sentence, dedup_key, split_sentences

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test_seen", "test_unseen")
FORTUNE_ATTRIBUTION_RE = re.compile(r"^\s*(--|\u2014)\s*\S")  # "-- Mark Twain" closes many cookies
BIBLE_VERSE_RE = re.compile(r"^\s+\d+ (.+)$", flags=re.MULTILINE)


@dataclass(frozen=True)
class Job:
    """One utterance to synthesize."""

    id: str
    text: str
    speaker: Speaker
    split: str


# ---------------------------------------------------------------- text

def fortune_files(folder: Path, include: list[str] | None, exclude: list[str]) -> list[Path]:
    """The fortune cookie files to read: `include` (all when None) minus `exclude`; no index or sub-folders
    (the offensive ones live in off/)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: `apt-get install fortunes` (scripts/setup.sh does)")
    names = include if include is not None else sorted(
        p.name for p in folder.iterdir() if p.is_file() and not p.suffix)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"no fortune files {missing} in {folder} (text.fortunes names them)")
    return [folder / n for n in names if n not in set(exclude)]


def fortune_sentences(path: Path, min_words: int, max_words: int) -> list[str]:
    """Sentences from one fortune file (cookies are separated by '%' lines; attributions are dropped)."""
    sentences = []
    for cookie in re.split(r"^%$", path.read_text(encoding="utf-8", errors="ignore"), flags=re.MULTILINE):
        prose = " ".join(line for line in cookie.splitlines() if not FORTUNE_ATTRIBUTION_RE.match(line))
        sentences += split_sentences(prose)
    return [s for s in (clean_sentence(s, min_words, max_words) for s in sentences) if s]


def bible_sentences(min_words: int, max_words: int) -> list[str]:
    """Sentences from every verse of the King James Bible: one `bible` call dumps all 31,102 verses."""
    try:
        dump = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                              check=True, timeout=120).stdout
    except FileNotFoundError as exc:
        raise FileNotFoundError("`bible` is missing: `apt-get install bible-kjv bible-kjv-text`") from exc
    sentences = [s for verse in BIBLE_VERSE_RE.findall(dump) for s in split_sentences(verse)]
    return [s for s in (clean_sentence(s, min_words, max_words) for s in sentences) if s]


def sentence_pool(text_cfg: DictConfig, seed: int) -> list[str]:
    """Clean sentences from the configured sources, deduplicated (ignoring case and punctuation) and
    shuffled by the seed."""
    sentences = []
    if text_cfg.fortunes is not False:
        include = None if text_cfg.fortunes in (None, True) else list(text_cfg.fortunes)
        for path in fortune_files(Path(text_cfg.fortunes_dir), include, list(text_cfg.fortunes_exclude)):
            sentences += fortune_sentences(path, text_cfg.min_words, text_cfg.max_words)
    if text_cfg.bible:
        sentences += bible_sentences(text_cfg.min_words, text_cfg.max_words)
    unique = sorted({dedup_key(s): s for s in sorted(sentences)}.values())
    if not unique:
        raise ValueError("no sentences: enable text.fortunes and/or text.bible")
    random.Random(seed).shuffle(unique)
    return unique


# ---------------------------------------------------------------- plan

def speakers_from_config(cfg: DictConfig) -> list[Speaker]:
    """The configured speakers, checked: unique ids, known engines and params, held-out ids that exist."""
    if not cfg.speakers:
        raise ValueError("speakers is empty: list at least one training speaker (see configs/corpus/)")
    speakers = [Speaker(id=str(s.id), engine=s.engine, voice=str(s.voice),
                        params=OmegaConf.to_container(s.params) if s.get("params") else {},
                        duration_jitter=float(s.get("duration_jitter", cfg.duration_jitter)),
                        weight=float(s.get("weight", 1.0)))
                for s in cfg.speakers]
    ids = [s.id for s in speakers]
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"speaker ids must be unique; repeated: {repeated}")
    unseen = set(cfg.split.unseen_speakers)
    if unseen - set(ids):
        raise ValueError("split.unseen_speakers names speakers not in the speaker list: "
                         f"{sorted(unseen - set(ids))}")
    if unseen >= set(ids):
        raise ValueError("every speaker is in split.unseen_speakers: leave some for training")
    return speakers


def check_plan_config(cfg: DictConfig, speakers: list[Speaker]) -> None:
    """Catch a config that cannot make a corpus before any text is read or audio made."""
    if not (isinstance(cfg.hours, int | float) and math.isfinite(cfg.hours) and cfg.hours > 0):
        raise ValueError(f"hours must be a number > 0 (hours of training audio; got {cfg.hours})")
    counts = {k: cfg.split[k] for k in ("val_sentences", "test_sentences", "val_per_speaker",
                                        "test_seen_per_speaker", "test_unseen_per_speaker")}
    if any(not isinstance(v, int) or v < 0 for v in counts.values()) or not counts["test_sentences"]:
        raise ValueError(f"split counts must be whole numbers >= 0 and test_sentences > 0 (got {counts})")
    if cfg.mean_utterance_seconds <= 0 or cfg.workers < 1 or cfg.chunk_size < 1:
        raise ValueError("mean_utterance_seconds must be > 0, workers and chunk_size >= 1")
    training = {s.engine for s in speakers if s.id not in set(cfg.split.unseen_speakers)}
    weights = {str(k): v for k, v in cfg.engine_weights.items()}
    if set(weights) - set(ENGINES):
        raise ValueError(f"engine_weights names unknown engines {sorted(set(weights) - set(ENGINES))}")
    without = sorted(e for e in training if not weights.get(e, 0) > 0)
    if without:
        raise ValueError(f"engine_weights needs a weight > 0 for {without}: they have training speakers")


def _draw(pool: list[str], count: int, key: str) -> list[str]:
    """`count` sentences from pool for one speaker and split: without repeats while the pool lasts (then
    cycling through fresh shuffles), stable for a key."""
    if count and not pool:
        raise ValueError(f"{key}: {count} sentences wanted from an empty pool (check the split sizes)")
    rng = random.Random(key)
    drawn: list[str] = []
    while len(drawn) < count:
        drawn += rng.sample(pool, min(len(pool), count - len(drawn)))
    return drawn


def plan_jobs(cfg: DictConfig, speakers: list[Speaker], sentences: list[str]) -> list[Job]:
    """Which speaker says which sentence in which split.

    The sentence pool is cut into disjoint parts first (test, val, train), so no held-out sentence is ever
    heard in training. Training hours go to engines by `engine_weights` (intelligible engines get more), and
    within an engine to its training speakers by their `weight`.
    """
    split = cfg.split
    test_pool = sentences[: split.test_sentences]
    val_pool = sentences[split.test_sentences: split.test_sentences + split.val_sentences]
    train_pool = sentences[split.test_sentences + split.val_sentences:]
    if not train_pool or (split.val_per_speaker and not val_pool):
        raise ValueError(f"only {len(sentences)} sentences: too few for split.test_sentences + "
                         f"split.val_sentences ({split.test_sentences} + {split.val_sentences}) and training")
    unseen = set(split.unseen_speakers)
    seen = [s for s in speakers if s.id not in unseen]
    engines = sorted({s.engine for s in seen})
    engine_total = sum(float(cfg.engine_weights[e]) for e in engines)
    speaker_total = {e: sum(s.weight for s in seen if s.engine == e) for e in engines}

    jobs: list[Job] = []
    for speaker in speakers:
        if speaker.id in unseen:
            counts = {"test_unseen": (test_pool, split.test_unseen_per_speaker)}
        else:
            share = float(cfg.engine_weights[speaker.engine]) / engine_total
            share *= speaker.weight / speaker_total[speaker.engine]
            n_train = max(1, round(cfg.hours * 3600 * share / cfg.mean_utterance_seconds))
            counts = {"train": (train_pool, n_train), "val": (val_pool, split.val_per_speaker),
                      "test_seen": (test_pool, split.test_seen_per_speaker)}
        for name, (pool, count) in counts.items():
            texts = _draw(pool, count, f"{cfg.seed}/{speaker.id}/{name}")
            jobs += [Job(f"{speaker.id}-{name}-{i:05d}", text, speaker, name) for i, text in enumerate(texts)]
    return jobs


# ---------------------------------------------------------------- synthesis

def _synthesize_chunk(jobs: list[Job], sample_rate: int, seed: int, min_rms: float, min_seconds: float,
                      ) -> list[tuple[Job, bytes | str, float]]:
    """Worker: speak a chunk of one speaker's jobs; returns (job, wav bytes or a failure reason, seconds)."""
    audio_by_id = synthesize(jobs[0].speaker, [(job.id, job.text) for job in jobs], sample_rate, seed)
    results = []
    for job in jobs:
        audio = audio_by_id[job.id]
        if isinstance(audio, str):
            log.debug("%s: engine error: %s", job.id, audio)
            results.append((job, "engine error", 0.0))
        elif len(audio) < min_seconds * sample_rate or float(np.sqrt(np.mean(audio**2))) < min_rms:
            results.append((job, "empty or silent", 0.0))
        else:
            buffer = io.BytesIO()
            sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
            results.append((job, buffer.getvalue(), len(audio) / sample_rate))
    return results


def chunked(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs in chunks of one speaker each (festival speaks a chunk in one process)."""
    by_speaker: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_speaker[job.speaker.id].append(job)
    return [group[i: i + size] for group in by_speaker.values() for i in range(0, len(group), size)]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # the pool already runs one process per core; threads inside would oversubscribe


def synthesize_jobs(jobs: list[Job], cfg: DictConfig) -> tuple[dict[str, list[dict]], Counter]:
    """Run every job on a process pool; returns rows per split and failure counts by reason."""
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    failures: Counter = Counter()
    with ProcessPoolExecutor(max_workers=cfg.workers, initializer=_init_worker) as pool, \
            tqdm(total=len(jobs), desc="synthesize", unit="utt") as progress:
        futures = {pool.submit(_synthesize_chunk, chunk, cfg.sample_rate, cfg.seed, cfg.min_rms,
                               cfg.min_seconds): chunk for chunk in chunked(jobs, cfg.chunk_size)}
        for future in as_completed(futures):
            try:
                results = future.result()
            except Exception as exc:  # a crashed worker loses its chunk, not the build
                log.warning("a chunk of %d utterances of %s failed: %s", len(futures[future]),
                            futures[future][0].speaker.id, exc)
                failures["worker error"] += len(futures[future])
                progress.update(len(futures[future]))
                continue
            for job, audio, seconds in results:
                progress.update(1)
                if isinstance(audio, str):
                    failures[audio] += 1
                    continue
                rows[job.split].append({
                    "id": job.id, "audio": {"bytes": audio, "path": f"{job.id}.wav"}, "text": job.text,
                    "speaker": job.speaker.id, "engine": job.speaker.engine, "duration": round(seconds, 4)})
    for split_rows in rows.values():
        split_rows.sort(key=lambda row: row["id"])  # completion order is not deterministic
    return rows, failures


# ---------------------------------------------------------------- output

def _split_summary(rows: list[dict]) -> dict:
    by_engine: dict[str, float] = defaultdict(float)
    for row in rows:
        by_engine[row["engine"]] += row["duration"] / 3600
    speakers = sorted({row["speaker"] for row in rows})
    return {"utterances": len(rows), "hours": sum(row["duration"] for row in rows) / 3600,
            "speakers": len(speakers), "speaker_ids": speakers,
            "hours_by_engine": dict(sorted(by_engine.items()))}


def summarize(rows: dict[str, list[dict]], failures: Counter, wall_seconds: float, cpu_seconds: float,
              ) -> dict:
    """Per split and in total: utterances, hours, speakers, hours per engine; build time and throughput."""
    total = _split_summary([row for split_rows in rows.values() for row in split_rows])
    cpu_minutes = cpu_seconds / 60
    return {"splits": {split: _split_summary(split_rows) for split, split_rows in rows.items()},
            "total": total, "hours": total["hours"], "failures": dict(sorted(failures.items())),
            "wall_seconds": wall_seconds, "cpu_minutes": cpu_minutes,
            "hours_per_cpu_minute": total["hours"] / cpu_minutes if cpu_minutes else float("nan")}


def save_dataset(rows: dict[str, list[dict]], out: Path, sample_rate: int) -> None:
    """A DatasetDict with the wav bytes embedded, so the folder is self-contained."""
    from datasets import Audio, Dataset, DatasetDict, Features, Value

    # The audio column is built as a plain {bytes, path} struct and then cast to Audio: encoding through
    # the Audio feature would need torchcodec; the cast stores the same bytes without it.
    features = Features({"id": Value("string"), "audio": {"bytes": Value("binary"), "path": Value("string")},
                         "text": Value("string"), "speaker": Value("string"), "engine": Value("string"),
                         "duration": Value("float32")})
    audio = Audio(sampling_rate=sample_rate)
    DatasetDict({split: Dataset.from_list(split_rows, features=features).cast_column("audio", audio)
                 for split, split_rows in rows.items()}).save_to_disk(str(out))


def _fingerprint(cfg: DictConfig) -> dict:
    """What decides the corpus' content; where it goes and how many workers make it do not."""
    kept = [key for key in cfg if key not in ("paths", "out", "workers", "hydra")]
    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in kept}


def build_corpus(cfg: DictConfig) -> dict:
    """Build the corpus described by cfg into cfg.out; returns the summary (also in out/summary.json).

    A corpus already built at cfg.out from the same config is kept as it is (the build is skipped).
    """
    out = Path(cfg.out)
    speakers = speakers_from_config(cfg)
    check_plan_config(cfg, speakers)
    done = out / "summary.json"
    if done.exists() and (out / "dataset_dict.json").exists():
        summary = json.loads(done.read_text())
        if summary.get("config") == _fingerprint(cfg):
            log.info("corpus at %s is already built from this config: kept", out)
            return summary
    check_engines(speakers)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    sentences = sentence_pool(cfg.text, cfg.seed)
    jobs = plan_jobs(cfg, speakers, sentences)
    log.info("%d sentences, %d speakers, %d utterances to plan", len(sentences), len(speakers), len(jobs))
    rows, failures = synthesize_jobs(jobs, cfg)
    if not rows["train"]:
        raise RuntimeError(f"no training audio was produced (failures: {dict(failures)}): check the engines")
    done.unlink(missing_ok=True)  # a build that dies while writing must not look finished
    out.mkdir(parents=True, exist_ok=True)
    save_dataset(rows, out, cfg.sample_rate)
    summary = summarize(rows, failures, time.perf_counter() - started, _cpu_seconds() - cpu_started)
    summary |= {"sentences": len(sentences), "planned": len(jobs), "config": _fingerprint(cfg)}
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers and the engines they ran)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def format_summary(summary: dict) -> str:
    """The summary as a table, one line per split, plus build cost and failures."""
    lines = [f"{'split':<12}{'utterances':>11}{'hours':>8}{'speakers':>10}  hours by engine"]
    for name, s in [*summary["splits"].items(), ("total", summary["total"])]:
        engines = ", ".join(f"{e} {h:.3f}" for e, h in s["hours_by_engine"].items())
        lines.append(f"{name:<12}{s['utterances']:>11}{s['hours']:>8.3f}{s['speakers']:>10}  {engines}")
    lines.append(f"test_unseen speakers: {', '.join(summary['splits']['test_unseen']['speaker_ids'])}")
    lines.append(f"{summary['hours']:.3f} h of audio in {summary['wall_seconds']:.0f} s wall, "
                 f"{summary['cpu_minutes']:.1f} CPU-minutes: {summary['hours_per_cpu_minute']:.2f} h per "
                 f"CPU-minute; failures: {summary['failures'] or 'none'}")
    return "\n".join(lines)
