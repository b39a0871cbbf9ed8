"""The data layer on real speech: espeak-ng (22.05 kHz) and flite (16 kHz) clips served through each source
kind (corpus DatasetDict, parquet folder with other column names, JSONL manifest) with broken files mixed
in; then the signal steps, the duration-bucket sampler and the collate function."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from voxlm.data.audio import (
    AudioError,
    audio_info,
    load_audio,
    normalize_loudness,
    rms_dbfs,
    save_audio,
    trim_silence,
)
from voxlm.data.dataset import (
    DurationBucketSampler,
    Utterance,
    build_dataset,
    build_sampler,
    collate_utterances,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
RATE = 16000


@dataclass
class Clip:
    id: str
    path: Path
    text: str
    speaker: str


SPEECH = [  # (engine, voice, text)
    ("espeak", "en-us", "The quick brown fox jumps over the lazy dog."),
    ("espeak", "en-gb", "A stitch in time saves nine, or so the old saying goes, my friend."),
    ("espeak", "en-gb-scotland", "Bright sunlight filled the quiet room."),
    ("espeak", "en-us", "Please call Stella and ask her to bring these things with her from the store."),
    ("flite", "slt", "Every morning the baker opens his shop at six."),
    ("flite", "awb", "She sells sea shells by the sea shore."),
    ("flite", "rms", "Nothing is certain except death and taxes."),
    ("flite", "slt", "The early bird catches the worm."),
]


def synthesize(engine: str, voice: str, text: str, path: Path) -> None:
    if engine == "espeak":
        command = ["espeak-ng", "-v", voice, "-w", str(path), text]  # 22.05 kHz
    else:
        command = ["flite", "-voice", voice, "-t", text, "-o", str(path)]  # 16 kHz
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Eight good clips, a padded one, a stereo FLAC, and broken files of every kind."""
    root = tmp_path_factory.mktemp("speech")
    wavs = root / "wavs"
    wavs.mkdir()
    clips = []
    for k, (engine, voice, text) in enumerate(SPEECH):
        path = wavs / f"utt{k}.wav"
        synthesize(engine, voice, text, path)
        clips.append(Clip(f"utt{k}", path, text, f"{engine}-{voice}"))
    first, rate = sf.read(clips[0].path, dtype="float32")
    lead = np.zeros(int(0.6 * rate), np.float32)
    padded = save_audio(wavs / "padded.wav", np.concatenate([lead, first]), rate)
    flite, flite_rate = sf.read(clips[4].path, dtype="float32")
    stereo = wavs / "stereo.flac"
    sf.write(stereo, np.stack([flite, 0.5 * flite], axis=1), flite_rate)
    good_bytes = clips[1].path.read_bytes()
    broken = {  # name -> (file content or None for a missing file, the reason it is skipped)
        "truncated.wav": (good_bytes[: len(good_bytes) // 2], "corrupt"),
        "zero.wav": (b"", "empty"),
        "notes.wav": (b"these are my notes, not audio\n" * 20, "not audio"),
        "missing.wav": (None, "missing"),
    }
    for name, (content, _) in broken.items():
        if content is not None:
            (wavs / name).write_bytes(content)
    silent = save_audio(wavs / "silent.wav", np.zeros(RATE, np.float32), RATE)
    return {"root": root, "clips": clips, "padded": padded, "stereo": stereo, "broken": broken,
            "silent": silent}


def data_config(name: str, data_dir: Path, **overrides) -> DictConfig:
    """configs/data/<name>.yaml as shipped, under a root with paths.data_dir, plus overrides."""
    shipped = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"data_dir": str(data_dir)}}, {"data": shipped}, {"data": overrides})
    return cfg.data


def expect_good(utterances: list[Utterance | None], clips: list[Clip], check_speaker: bool = True) -> None:
    good = [u for u in utterances if u is not None]
    assert sorted(u.text for u in good) == sorted(c.text for c in clips)
    by_text = {c.text: c for c in clips}
    for u in good:
        assert u.sample_rate == RATE and u.audio.dtype == np.float32 and u.audio.ndim == 1
        assert np.abs(u.audio).max() <= 1.0
        # Trimming only shortens: the clip is at most the source length, resampled to 16 kHz.
        source = audio_info(by_text[u.text].path)
        assert 0.5 * source.duration < u.duration <= source.duration + 1e-3
        if check_speaker:
            assert u.speaker == by_text[u.text].speaker


# ---- (a) the project's corpus: a DatasetDict from save_to_disk, duration column present ----

@pytest.fixture(scope="session")
def corpus_dir(speech: dict) -> Path:
    data_dir = speech["root"] / "data"
    clips, broken = speech["clips"], speech["broken"]

    def rows(selected: list[Clip], with_broken: bool) -> datasets.Dataset:
        table = {"id": [], "audio": [], "text": [], "speaker": [], "engine": [], "duration": []}
        for clip in selected:
            table["id"].append(clip.id)
            table["audio"].append({"bytes": clip.path.read_bytes(), "path": clip.path.name})
            table["text"].append(clip.text)
            table["speaker"].append(clip.speaker)
            table["engine"].append(clip.speaker.split("-")[0])
            table["duration"].append(audio_info(clip.path).duration)
        if with_broken:
            extra = {name: content for name, (content, _) in broken.items()}
            extra["silent.wav"] = speech["silent"].read_bytes()
            for name, content in extra.items():
                table["id"].append(name.removesuffix(".wav"))
                # A missing file: no audio at all (save_to_disk itself stats any path it is given).
                table["audio"].append({"bytes": content, "path": name} if content is not None else None)
                table["text"].append("A sentence whose audio is broken.")
                table["speaker"].append("broken")
                table["engine"].append("none")
                table["duration"].append(1.0)
        # datasets needs torchcodec to encode audio; a bytes/path struct cast to Audio is the same thing.
        return datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())

    splits = datasets.DatasetDict({
        "train": rows(clips[:6], with_broken=True),
        "val": rows(clips[6:8], with_broken=False),
        "test_seen": rows(clips[:1], with_broken=False),
        "test_unseen": rows(clips[7:8], with_broken=False),
    })
    splits.save_to_disk(str(data_dir / "corpus-quickstart"))
    return data_dir


def test_corpus_loads_good_clips_and_skips_broken_ones_at_load_time(speech: dict, corpus_dir: Path) -> None:
    dataset = build_dataset(data_config("corpus", corpus_dir), "train")
    # The duration column spares header reads, so broken audio is only found when decoded.
    assert len(dataset) == 6 + 5 and dataset.skipped.num_skipped == 0
    utterances = [dataset[i] for i in range(len(dataset))]
    expect_good(utterances, speech["clips"][:6])
    assert sum(u is None for u in utterances) == 5
    assert dataset.skipped.counts == {"corrupt": 1, "empty": 1, "not audio": 1, "missing": 1, "silent": 1}
    assert dataset.skipped.summary().startswith("skipped 5 of 11 utterances: ")
    [dataset[i] for i in range(len(dataset))]  # a second epoch counts nothing twice
    assert dataset.skipped.num_skipped == 5
    val = build_dataset(data_config("corpus", corpus_dir), "val")
    expect_good([val[i] for i in range(len(val))], speech["clips"][6:8])
    assert val.ids == ["utt6", "utt7"]


def test_sample_rate_argument_overrides_config(corpus_dir: Path) -> None:
    dataset = build_dataset(data_config("corpus", corpus_dir), "test_seen", sample_rate=24000)
    utterance = dataset[0]
    assert utterance.sample_rate == 24000
    assert abs(utterance.duration - dataset.durations[0]) < 0.6  # resampled, only silence trimmed


def test_duration_filters_skip_and_count(speech: dict, corpus_dir: Path) -> None:
    durations = sorted(audio_info(c.path).duration for c in speech["clips"][:6])
    cfg = data_config("corpus", corpus_dir, min_duration=(durations[0] + durations[1]) / 2,
                      max_duration=(durations[-2] + durations[-1]) / 2)
    dataset = build_dataset(cfg, "train")
    assert dataset.skipped.counts["too short"] == 1 + 5  # the five broken rows claim 1.0 s
    assert dataset.skipped.counts["too long"] == 1
    assert all(cfg.min_duration <= d <= cfg.max_duration for d in dataset.durations)
    assert len(dataset) == 4


def test_config_errors_say_what_to_fix(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build_corpus"):
        build_dataset(data_config("corpus", tmp_path), "train")
    with pytest.raises(ValueError, match="no column 'transcript'.*data.columns.text"):
        build_dataset(data_config("corpus", corpus_dir, columns={"text": "transcript"}), "train")
    with pytest.raises(ValueError, match="split 'dev' is not in data.splits"):
        build_dataset(data_config("corpus", corpus_dir), "dev")
    with pytest.raises(ValueError, match="has no split 'validation'"):
        build_dataset(data_config("corpus", corpus_dir, splits={"val": "validation"}), "val")
    with pytest.raises(ValueError, match="data.source='kaldi'"):
        build_dataset(data_config("corpus", corpus_dir, source="kaldi"), "train")


# ---- (b) any Hugging Face dataset: a parquet folder with its own column and split names ----

def test_hf_parquet_folder_with_mapped_columns(speech: dict, tmp_path: Path) -> None:
    folder = tmp_path / "my-hf-data"
    folder.mkdir()
    clips, broken = speech["clips"], speech["broken"]

    def write(name: str, entries: list[tuple[bytes, str, str]]) -> None:
        table = {"wav": [{"bytes": b, "path": None} for b, _, _ in entries],
                 "sentence": [t for _, t, _ in entries], "spk": [s for _, _, s in entries]}
        table = datasets.Dataset.from_dict(table).cast_column("wav", datasets.Audio())
        table.to_parquet(folder / f"{name}.parquet")

    bad = [(content, "Broken audio here.", "x") for content, _ in broken.values() if content is not None]
    write("train", [(c.path.read_bytes(), c.text, c.speaker) for c in clips[:6]] + bad)
    write("validation", [(c.path.read_bytes(), c.text, c.speaker) for c in clips[6:]])
    cfg = data_config("hf", tmp_path, path=str(folder), cache_dir=str(tmp_path / "cache"),
                      splits={"train": "train", "val": "validation"},
                      columns={"audio": "wav", "text": "sentence", "speaker": "spk", "duration": None})
    train = build_dataset(cfg, "train")
    # No duration column: headers are read while indexing, so broken files never enter the index.
    assert len(train) == 6
    assert train.skipped.counts == {"corrupt": 1, "empty": 1, "not audio": 1}
    assert train.ids[0] == "train-0000000"  # no id column: ids from split and row
    expect_good([train[i] for i in range(len(train))], clips[:6])
    val = build_dataset(cfg, "val")
    expect_good([val[i] for i in range(len(val))], clips[6:])


# ---- (c) a JSONL manifest with relative and absolute paths ----

def write_manifest(path: Path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_manifest_with_relative_paths_and_broken_entries(speech: dict) -> None:
    root, clips = speech["root"], speech["clips"]
    lines = [{"audio": f"wavs/{c.path.name}", "text": c.text, "speaker": c.speaker} for c in clips[:5]]
    lines[0]["audio"] = str(clips[0].path)  # absolute
    lines[1]["id"] = "custom-id"
    lines.append({"audio": "wavs/stereo.flac", "text": clips[4].text + " (stereo)", "speaker": "flite-slt"})
    for name in speech["broken"]:
        lines.append({"audio": f"wavs/{name}", "text": "Broken.", "speaker": "x"})
    lines.append({"audio": "wavs/silent.wav", "text": "Silence.", "speaker": "x"})
    lines += ["{not json", {"audio": "wavs/utt0.wav", "transcript": "wrong key", "speaker": "x"}]
    write_manifest(root / "train.jsonl", lines)
    dataset = build_dataset(data_config("manifest", root, path=str(root)), "train")
    assert dataset.skipped.counts == {"corrupt": 1, "empty": 1, "not audio": 1, "missing": 1, "bad line": 2}
    assert "train.jsonl:" in dataset.skipped.details() and "'text'" in dataset.skipped.details()
    assert dataset.ids[:3] == [clips[0].path.with_suffix("").as_posix(), "custom-id", "wavs/utt2"]
    utterances = [dataset[i] for i in range(len(dataset))]
    assert utterances[-1] is None and dataset.skipped.counts["silent"] == 1  # all-zero: found at load time
    expect_good(utterances[:5], clips[:5])
    stereo = utterances[5]
    assert stereo is not None and stereo.text.endswith("(stereo)") and stereo.sample_rate == RATE
    assert dataset.skipped.summary() == (
        "skipped 7 of 13 utterances: 2 bad line, 1 corrupt, 1 empty, 1 not audio, 1 missing, 1 silent")


def test_a_source_with_nothing_usable_is_an_error(speech: dict, tmp_path: Path) -> None:
    wavs = speech["root"] / "wavs"
    write_manifest(tmp_path / "train.jsonl", [{"audio": str(wavs / name), "text": "x", "speaker": "y"}
                                              for name in speech["broken"]])
    summary = "skipped 4 of 4 utterances: 1 corrupt, 1 empty, 1 not audio, 1 missing"
    with pytest.raises(ValueError, match=rf"no usable utterances in manifest .*train.jsonl: {summary}"):
        build_dataset(data_config("manifest", tmp_path, path=str(tmp_path)), "train")
    with pytest.raises(FileNotFoundError, match="no manifest at .*val.jsonl"):
        build_dataset(data_config("manifest", tmp_path, path=str(tmp_path)), "val")


# ---- audio I/O and signal steps ----

def test_load_audio_resamples_downmixes_and_reads_bytes(speech: dict) -> None:
    espeak = speech["clips"][0].path
    info = audio_info(espeak)
    assert info.sample_rate == 22050
    audio, rate = load_audio(espeak, RATE)
    assert rate == RATE and audio.dtype == np.float32
    assert abs(len(audio) - info.frames * RATE / 22050) <= 1
    same, _ = load_audio(espeak.read_bytes(), RATE)
    np.testing.assert_array_equal(audio, same)
    native, native_rate = load_audio(espeak)
    assert native_rate == 22050 and len(native) == info.frames
    stereo, _ = load_audio(speech["stereo"])
    mono, _ = load_audio(speech["clips"][4].path)
    np.testing.assert_allclose(stereo, 0.75 * mono, atol=1e-4)  # the mean of the two channels


def test_broken_files_raise_audio_error_with_reason(speech: dict) -> None:
    wavs = speech["root"] / "wavs"
    for name, (_, reason) in speech["broken"].items():
        for read in (audio_info, load_audio):
            with pytest.raises(AudioError) as error:
                read(wavs / name)
            assert error.value.reason == reason and name in str(error.value)


def test_trim_silence_removes_padding(speech: dict) -> None:
    padded, rate = load_audio(speech["padded"])
    original, _ = load_audio(speech["clips"][0].path)
    margin, frame = int(0.1 * rate), int(0.02 * rate)
    trimmed = trim_silence(padded, rate, threshold_db=-40.0, margin_seconds=0.1, frame_seconds=0.02)
    # 0.6 s of zeros were added in front: at most the margin (plus a frame) of quiet is left there.
    onset = int(np.flatnonzero(np.abs(trimmed) > 1e-3)[0])
    assert onset <= margin + frame
    assert len(trimmed) <= len(padded) - int(0.6 * rate) + margin + frame
    assert abs(len(trimmed) - len(trim_silence(original, rate))) <= margin + frame
    np.testing.assert_array_equal(trim_silence(np.zeros(100, np.float32), rate), np.zeros(100, np.float32))


def test_normalize_loudness_hits_target_under_peak_ceiling(speech: dict) -> None:
    audio, _ = load_audio(speech["clips"][5].path)
    quiet = normalize_loudness(audio * 0.01, target_rms_dbfs=-30.0, peak_dbfs=-1.0)
    assert abs(rms_dbfs(quiet) - (-30.0)) < 0.01
    loud = normalize_loudness(audio, target_rms_dbfs=-3.0, peak_dbfs=-1.0)
    assert abs(20 * np.log10(np.abs(loud).max()) - (-1.0)) < 0.01  # the ceiling wins over the target
    assert rms_dbfs(loud) < -3.0
    silence = np.zeros(10, np.float32)
    np.testing.assert_array_equal(normalize_loudness(silence), silence)


def test_dataset_output_is_trimmed_and_normalized(speech: dict) -> None:
    root = speech["root"]
    write_manifest(root / "padded.jsonl", [{"audio": "wavs/padded.wav", "text": "Padded.", "speaker": "e"}])
    cfg = data_config("manifest", root, path=str(root), splits={"train": "padded.jsonl"})
    utterance = build_dataset(cfg, "train")[0]
    raw_seconds = audio_info(speech["padded"]).duration
    assert utterance.duration < raw_seconds - 0.45
    level, peak = rms_dbfs(utterance.audio), 20 * np.log10(np.abs(utterance.audio).max())
    assert peak <= -1.0 + 1e-3 and (abs(level + 20.0) < 0.05 or abs(peak + 1.0) < 1e-3)


# ---- batching ----

def test_bucket_sampler_covers_caps_and_reshuffles() -> None:
    durations = np.random.default_rng(0).uniform(0.5, 10.0, size=300).tolist()
    sampler = DurationBucketSampler(durations, max_seconds=40.0, num_buckets=10, seed=3)
    epoch0 = list(sampler)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(300))
    assert all(len(b) * max(durations[i] for i in b) <= 40.0 for b in epoch0)
    assert len(sampler) == len(epoch0)
    # Similar durations batch together: little of the padded batch is padding.
    used = sum(durations) / sum(len(b) * max(durations[i] for i in b) for b in epoch0)
    assert used > 0.85
    assert list(DurationBucketSampler(durations, max_seconds=40.0, num_buckets=10, seed=3)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(300))
    fixed = DurationBucketSampler(durations, batch_size=16, seed=3)
    assert all(len(b) <= 16 for b in fixed) and sum(map(len, fixed)) == 300


def test_bucket_sampler_splits_batches_across_ranks() -> None:
    durations = np.random.default_rng(1).uniform(0.5, 5.0, size=101).tolist()
    ranks = [DurationBucketSampler(durations, batch_size=8, seed=0, num_replicas=3, rank=r) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # equal steps on every rank
    seen = [i for r in ranks for batch in r for i in batch]
    assert set(seen) == set(range(101))
    with pytest.raises(ValueError, match="below the longest utterance"):
        DurationBucketSampler(durations, max_seconds=2.0)
    with pytest.raises(ValueError, match="exactly one of"):
        DurationBucketSampler(durations, max_seconds=20.0, batch_size=4)


def test_collate_pads_crops_and_drops_none(corpus_dir: Path) -> None:
    dataset = build_dataset(data_config("corpus", corpus_dir), "train")
    utterances = [dataset[i] for i in range(4)]
    batch = collate_utterances([utterances[0], None, utterances[1], utterances[2]])
    lengths = [len(u.audio) for u in utterances[:3]]
    assert batch["audio"].shape == (3, max(lengths)) and batch["audio"].dtype == torch.float32
    assert batch["lengths"].tolist() == lengths and batch["ids"] == [u.id for u in utterances[:3]]
    assert batch["texts"] == [u.text for u in utterances[:3]] and batch["sample_rate"] == RATE
    row = int(np.argmin(lengths))
    assert not batch["audio"][row, lengths[row]:].any()  # zero padding past each clip
    crop = 8000
    cropped = collate_utterances(utterances, crop_samples=crop, generator=torch.Generator().manual_seed(0))
    assert cropped["audio"].shape == (4, crop)
    for u, window in zip(utterances, cropped["audio"].numpy(), strict=True):
        starts = [s for s in range(len(u.audio) - crop + 1) if np.array_equal(u.audio[s: s + crop], window)]
        assert starts, "a crop must be a contiguous window of its clip"
    again = collate_utterances(utterances, crop_samples=crop, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["audio"], cropped["audio"])
    long_crop = max(len(u.audio) for u in utterances) + 100
    padded = collate_utterances(utterances, crop_samples=long_crop)
    assert padded["audio"].shape == (4, long_crop)
    assert padded["lengths"].tolist() == [len(u.audio) for u in utterances]
    assert collate_utterances([None, None]) is None


def test_dataloader_epoch_with_bucket_sampler(speech: dict, corpus_dir: Path) -> None:
    cfg = data_config("corpus", corpus_dir, batching={"max_seconds": 8.0})
    dataset = build_dataset(cfg, "train")
    loader = DataLoader(dataset, batch_sampler=build_sampler(cfg.batching, dataset, seed=0),
                        collate_fn=collate_utterances)
    ids = [i for batch in loader if batch is not None for i in batch["ids"]]
    assert sorted(ids) == sorted(c.id for c in speech["clips"][:6])
