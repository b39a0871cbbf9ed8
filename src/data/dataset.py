"""The one loading path from any source (voxlm.data.sources) to batches for the codec and SpeechLM stages.

    build_dataset(cfg.data, "train")   index a split: ids, texts, speakers, durations; duration filters
    dataset[i]                         decode, resample, trim silence, set loudness -> Utterance (or None)
    DurationBucketSampler              batches of similar duration under a cap of padded seconds
    collate_utterances                 padded (or randomly cropped) float audio [B, T] + lengths + texts

Bad audio never stops a run. Where the source has no durations, headers are read while indexing and what
they reveal (missing, empty, not audio, corrupt) is skipped there; what only decoding reveals (silent, or
any of those when durations come from a column) makes dataset[i] return None, which collate_utterances
drops. `dataset.skipped` counts both by reason. Only a split with no usable utterance is an error.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Sampler

from voxlm.data.audio import AudioError, audio_info, load_audio, normalize_loudness, trim_silence
from voxlm.data.sources import Source, open_source

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 3


@dataclass
class Utterance:
    id: str
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    text: str
    speaker: str

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class SkipReport:
    """Utterances left out of a split, counted by reason, with the first few examples of each."""

    total: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(example)

    @property
    def num_skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: 'skipped 3 of 120 utterances: 1 missing, 1 corrupt, 1 silent'."""
        line = f"skipped {self.num_skipped} of {self.total} utterances"
        if self.counts:
            line += ": " + ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return line

    def details(self) -> str:
        return "; ".join(f"{reason}: {' | '.join(shown)}" for reason, shown in self.examples.items())


@dataclass(frozen=True)
class Preprocess:
    """The signal chain after decoding: trim leading/trailing silence, then set the level."""

    trim_threshold_db: float | None = -40.0  # None keeps clips untrimmed
    trim_margin_seconds: float = 0.1
    trim_frame_seconds: float = 0.02
    target_rms_dbfs: float | None = -20.0  # None keeps levels
    peak_dbfs: float = -1.0

    @classmethod
    def from_config(cls, data_cfg: DictConfig) -> Preprocess:
        trim, loudness = data_cfg.trim, data_cfg.loudness
        return cls(trim.threshold_db, trim.margin_seconds, trim.frame_seconds,
                   loudness.target_rms_dbfs, loudness.peak_dbfs)

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if self.trim_threshold_db is not None:
            audio = trim_silence(audio, sample_rate, self.trim_threshold_db, self.trim_margin_seconds,
                                 self.trim_frame_seconds)
        if self.target_rms_dbfs is not None:
            audio = normalize_loudness(audio, self.target_rms_dbfs, self.peak_dbfs)
        return audio


class SpeechDataset(Dataset):
    """One split's utterances, decoded on access; `durations[i]` (seconds, before trimming) is known early."""

    def __init__(self, source: Source, sample_rate: int, preprocess: Preprocess | None = None,
                 min_duration: float = 0.0, max_duration: float = math.inf) -> None:
        self.source = source
        self.sample_rate = int(sample_rate)
        self.preprocess = preprocess or Preprocess()
        self.skipped = SkipReport(total=len(source) + len(source.rejected))
        self.rows: list[int] = []  # position in the source of each usable utterance
        self.durations: list[float] = []
        self._index(min_duration, max_duration)
        self._failed: set[int] = set()
        if not self.rows:
            raise ValueError(f"no usable utterances in {source.origin}: {self.skipped.summary()}"
                             + (f" ({self.skipped.details()})" if self.skipped.num_skipped else ""))
        log.info("%s: %d utterances, %.2f h; %s", source.origin, len(self.rows), sum(self.durations) / 3600,
                 self.skipped.summary())
        if self.skipped.num_skipped:
            log.warning("%s: first skipped: %s", source.origin, self.skipped.details())

    def _index(self, min_duration: float, max_duration: float) -> None:
        source, seen = self.source, set()
        for reason, detail in source.rejected:
            self.skipped.add(reason, detail)
        rows = zip(source.ids, source.texts, source.durations, strict=True)
        for row, (uid, text, duration) in enumerate(rows):
            if not text or not str(text).strip():
                self.skipped.add("no text", uid)
                continue
            if uid in seen:
                self.skipped.add("duplicate id", uid)
                continue
            if duration is None:  # only then are headers read: a duration column spares a pass over the audio
                try:
                    duration = audio_info(source.audio[row]).duration
                except AudioError as error:
                    self.skipped.add(error.reason, f"{uid}: {error}")
                    continue
            if duration < min_duration:
                self.skipped.add("too short", f"{uid}: {duration:.2f} s < data.min_duration={min_duration}")
                continue
            if duration > max_duration:
                self.skipped.add("too long", f"{uid}: {duration:.2f} s > data.max_duration={max_duration}")
                continue
            seen.add(uid)
            self.rows.append(row)
            self.durations.append(float(duration))

    @property
    def ids(self) -> list[str]:
        return [self.source.ids[row] for row in self.rows]

    @property
    def texts(self) -> list[str]:
        return [str(self.source.texts[row]) for row in self.rows]

    @property
    def speakers(self) -> list[str]:
        return [self.source.speakers[row] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Utterance | None:
        row = self.rows[i]
        uid = self.source.ids[row]
        try:
            audio, rate = load_audio(self.source.audio[row], self.sample_rate)
        except AudioError as error:
            return self._skip(i, error.reason, f"{uid}: {error}")
        if not np.any(audio):
            return self._skip(i, "silent", f"{uid}: every sample is zero")
        return Utterance(uid, self.preprocess(audio, rate), rate, str(self.source.texts[row]),
                         self.source.speakers[row])

    def _skip(self, i: int, reason: str, detail: str) -> None:
        # Counted once per utterance (in the process that loads it: DataLoader workers keep their own counts).
        if i not in self._failed:
            self._failed.add(i)
            self.skipped.add(reason, detail)
            log.warning("skipped %s (%s)", detail, reason)
        return None


def build_dataset(data_cfg: DictConfig, split: str, sample_rate: int | None = None) -> SpeechDataset:
    """One split of the source in data_cfg, resampled to `sample_rate` (default data_cfg.sample_rate)."""
    min_duration = data_cfg.min_duration if data_cfg.min_duration is not None else 0.0
    max_duration = data_cfg.max_duration if data_cfg.max_duration is not None else math.inf
    if min_duration > max_duration:
        raise ValueError(f"data.min_duration={min_duration} exceeds data.max_duration={max_duration}")
    return SpeechDataset(
        open_source(data_cfg, split),
        sample_rate=sample_rate or data_cfg.sample_rate,
        preprocess=Preprocess.from_config(data_cfg),
        min_duration=float(min_duration),
        max_duration=float(max_duration),
    )


class DurationBucketSampler(Sampler[list[int]]):
    """Batches of utterances of similar duration, so little compute goes into padding.

    Utterances are split into `num_buckets` duration quantiles; each epoch every bucket is shuffled and
    packed greedily into batches whose padded length (count x longest) stays within `max_seconds` (or of
    `batch_size` utterances), then the batches of all buckets are shuffled together. The order depends only
    on (seed, epoch): call set_epoch each epoch (Lightning does) to get a new one.

    For DDP give num_replicas and rank (and Lightning `use_distributed_sampler=False`): every rank builds
    the same batches and takes every num_replicas-th; the batch count is made a multiple of num_replicas by
    repeating the first batches (or, with drop_last, dropping the last ones) so all ranks take equal steps.
    """

    def __init__(self, durations: Sequence[float], max_seconds: float | None = None,
                 batch_size: int | None = None, num_buckets: int = 10, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if (max_seconds is None) == (batch_size is None):
            raise ValueError("set exactly one of batching.max_seconds and batching.batch_size (other null)")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if len(durations) == 0:
            raise ValueError("no durations to batch: the dataset is empty")
        longest = max(durations)
        if max_seconds is not None and longest > max_seconds:
            raise ValueError(f"batching.max_seconds={max_seconds} is below the longest utterance "
                             f"({longest:.2f} s): raise it or lower data.max_duration")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batching.batch_size must be at least 1, got {batch_size}")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_seconds = max_seconds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # Quantile buckets hold about as many utterances each, however the durations are spread.
        order = np.argsort(self.durations, kind="stable")
        self.buckets = np.array_split(order, max(1, min(num_buckets, len(order))))
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pack(self, members: np.ndarray) -> list[list[int]]:
        if self.batch_size is not None:
            return [members[k: k + self.batch_size].tolist() for k in range(0, len(members), self.batch_size)]
        batches, batch, longest = [], [], 0.0
        for index in members.tolist():
            duration = self.durations[index]
            if batch and (len(batch) + 1) * max(longest, duration) > self.max_seconds:
                batches.append(batch)
                batch, longest = [], 0.0
            batch.append(index)
            longest = max(longest, duration)
        return batches + ([batch] if batch else [])

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket in self.buckets:
            batches += self._pack(rng.permutation(bucket) if self.shuffle else bucket)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if self.num_replicas > 1:
            if self.drop_last:
                batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
            else:
                batches += batches[: -len(batches) % self.num_replicas]
        mine = batches[self.rank:: self.num_replicas]
        self._cache = (self.epoch, mine)
        return mine

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def build_sampler(batching_cfg: DictConfig, dataset: SpeechDataset, seed: int = 0, num_replicas: int = 1,
                  rank: int = 0) -> DurationBucketSampler:
    """A DurationBucketSampler over a dataset's durations, configured by data.batching."""
    return DurationBucketSampler(
        dataset.durations, max_seconds=batching_cfg.max_seconds, batch_size=batching_cfg.batch_size,
        num_buckets=batching_cfg.num_buckets, shuffle=batching_cfg.shuffle, drop_last=batching_cfg.drop_last,
        seed=seed, num_replicas=num_replicas, rank=rank,
    )


def collate_utterances(batch: Sequence[Utterance | None], crop_samples: int | None = None,
                       generator: torch.Generator | None = None) -> dict | None:
    """Pad a list of utterances into audio [B, T] with lengths; None entries (skipped audio) are dropped.

    With crop_samples, each clip is cut to a random window of that many samples (codec training) and
    shorter clips are zero-padded to it. Returns None when nothing in the batch was usable.
    """
    utterances = [u for u in batch if u is not None]
    if not utterances:
        return None
    rates = {u.sample_rate for u in utterances}
    if len(rates) > 1:
        raise ValueError(f"cannot batch clips of different sample rates {sorted(rates)}: resample them first")
    clips = [torch.from_numpy(u.audio) for u in utterances]
    # Which clips a crop cut: their transcripts no longer match the audio (whole-utterance losses skip them).
    cropped = torch.tensor([crop_samples is not None and len(clip) > crop_samples for clip in clips])
    if crop_samples is not None:
        clips = [_random_crop(clip, crop_samples, generator) for clip in clips]
    lengths = torch.tensor([len(clip) for clip in clips], dtype=torch.long)
    width = crop_samples if crop_samples is not None else int(lengths.max())
    audio = torch.zeros(len(clips), width, dtype=torch.float32)
    for row, clip in enumerate(clips):
        audio[row, : len(clip)] = clip
    return {
        "audio": audio,
        "lengths": lengths,
        "texts": [u.text for u in utterances],
        "speakers": [u.speaker for u in utterances],
        "ids": [u.id for u in utterances],
        "cropped": cropped,
        "sample_rate": rates.pop(),
    }


def _random_crop(clip: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    if len(clip) <= size:
        return clip
    start = int(torch.randint(0, len(clip) - size + 1, (1,), generator=generator))
    return clip[start: start + size]
