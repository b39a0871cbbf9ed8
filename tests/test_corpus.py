"""The offline corpus builder on real engines: a handful of real utterances per engine, deterministic
splits and speakers, held-out speakers and sentences kept out of training, failures counted not fatal, and
clear errors for bad configs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import corpus_config
from datasets import Audio, load_from_disk

from voxlm.data.corpus import (
    SPLITS,
    Job,
    build_corpus,
    plan_jobs,
    sentence_pool,
    speakers_from_config,
    synthesize_jobs,
)
from voxlm.data.synth import Speaker, check_engines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tiny_corpus: Path):
    return load_from_disk(str(tiny_corpus))


@pytest.fixture(scope="module")
def summary(tiny_corpus: Path) -> dict:
    return json.loads((tiny_corpus / "summary.json").read_text())


def test_splits_columns_and_engines(corpus) -> None:
    assert set(corpus) == set(SPLITS)
    for split in SPLITS:
        assert len(corpus[split]) > 0
        assert set(corpus[split].column_names) == {"id", "audio", "text", "speaker", "engine", "duration"}
        assert corpus[split].features["audio"] == Audio(sampling_rate=16000)
    assert set(corpus["train"]["engine"]) == {"flite", "festival", "espeak"}


def test_audio_is_real_speech_at_the_configured_rate(corpus) -> None:
    for split in SPLITS:
        for row in corpus[split].cast_column("audio", Audio(decode=False)):
            audio, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
            assert rate == 16000 and audio.ndim == 1
            assert abs(len(audio) / rate - row["duration"]) < 1e-3
            assert np.sqrt(np.mean(audio**2)) > 0.01, f"{row['id']} is near silent"
            # about 2-5 words a second: speech of the sentence, not a click or a stuck engine
            words_per_second = len(row["text"].split()) / row["duration"]
            assert 1.5 < words_per_second < 6, (row["id"], row["text"], row["duration"])


def test_held_out_speakers_and_sentences_never_train(corpus, summary: dict) -> None:
    unseen = set(summary["config"]["split"]["unseen_speakers"])
    assert set(corpus["test_unseen"]["speaker"]) == unseen
    assert not unseen & (set(corpus["train"]["speaker"]) | set(corpus["val"]["speaker"]))
    seen = set(corpus["train"]["speaker"])
    assert set(corpus["test_seen"]["speaker"]) == seen == set(corpus["val"]["speaker"])
    train_text = set(corpus["train"]["text"])
    for split in ("val", "test_seen", "test_unseen"):
        assert not train_text & set(corpus[split]["text"]), split
    assert not set(corpus["val"]["text"]) & set(corpus["test_seen"]["text"])


def test_summary_matches_dataset(corpus, summary: dict) -> None:
    for split in SPLITS:
        s = summary["splits"][split]
        assert s["utterances"] == len(corpus[split])
        assert s["hours"] == pytest.approx(sum(corpus[split]["duration"]) / 3600, rel=1e-4)
        assert s["speaker_ids"] == sorted(set(corpus[split]["speaker"]))
        assert s["speakers"] == len(s["speaker_ids"])
        assert sum(s["hours_by_engine"].values()) == pytest.approx(s["hours"])
    assert summary["total"]["utterances"] == sum(len(corpus[split]) for split in SPLITS)
    assert summary["total"]["speakers"] == 8
    assert summary["hours"] == pytest.approx(sum(summary["splits"][s]["hours"] for s in SPLITS))
    assert summary["planned"] == summary["total"]["utterances"] + sum(summary["failures"].values())
    assert summary["hours_per_cpu_minute"] == pytest.approx(summary["hours"] / summary["cpu_minutes"])
    assert 0 < summary["cpu_minutes"] and 0 < summary["wall_seconds"] < 120


def test_corpus_is_the_seeded_plan(corpus, tiny_corpus: Path) -> None:
    """Who says what in which split is a pure function of the config and seed; the build follows it."""
    cfg = corpus_config("tiny", tiny_corpus)
    speakers = speakers_from_config(cfg)
    first = plan_jobs(cfg, speakers, sentence_pool(cfg.text, cfg.seed))
    second = plan_jobs(cfg, speakers, sentence_pool(cfg.text, cfg.seed))
    assert [(j.id, j.text, j.speaker.id, j.split) for j in first] == \
        [(j.id, j.text, j.speaker.id, j.split) for j in second]
    built = {(row["id"], row["text"], row["speaker"], split)
             for split in SPLITS for row in corpus[split].remove_columns("audio")}
    assert built == {(j.id, j.text, j.speaker.id, j.split) for j in first}
    other = corpus_config("tiny", tiny_corpus, "seed=7")
    third = plan_jobs(other, speakers, sentence_pool(other.text, other.seed))
    assert [j.text for j in first] != [j.text for j in third]


def test_quickstart_voices_exist_and_hours_follow_the_weights(tmp_path: Path) -> None:
    cfg = corpus_config("quickstart", tmp_path, "hours=1.0", "text.bible=false")
    speakers = speakers_from_config(cfg)
    check_engines(speakers)  # every configured voice is installed
    jobs = [j for j in plan_jobs(cfg, speakers, sentence_pool(cfg.text, cfg.seed)) if j.split == "train"]
    by_engine = Counter(j.speaker.engine for j in jobs)
    assert by_engine["festival"] / len(jobs) == pytest.approx(0.4, abs=0.02)
    assert by_engine["espeak"] / len(jobs) == pytest.approx(0.2, abs=0.02)
    by_speaker = Counter(j.speaker.id for j in jobs)
    assert by_speaker["festival_slt_hts"] == pytest.approx(2 * by_speaker["festival_kal"], abs=1)
    assert len(jobs) == pytest.approx(3600 / cfg.mean_utterance_seconds, rel=0.02)


def test_rebuild_with_same_config_is_skipped(tiny_corpus: Path) -> None:
    before = (tiny_corpus / "summary.json").stat().st_mtime_ns
    build_corpus(corpus_config("tiny", tiny_corpus, "workers=1"))  # workers do not change the content
    assert (tiny_corpus / "summary.json").stat().st_mtime_ns == before


def test_command_line_prints_the_summary(tiny_corpus: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts/build_corpus.py"), "corpus=tiny",
                             f"out={tiny_corpus}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test_unseen" in result.stdout and "h per CPU-minute" in result.stdout
    assert not list(tmp_path.iterdir())  # no log file or outputs/ folder left in the working directory


def test_failed_and_silent_utterances_are_skipped_and_counted(tmp_path: Path) -> None:
    cfg = corpus_config("tiny", tmp_path, "workers=1")
    good = Speaker("good", "espeak", "en-us+m3")
    broken = Speaker("broken", "espeak", "xx-nope")  # check_engines would refuse it; the engine fails
    jobs = [Job("good-train-0", "A sentence that the engine reads well.", good, "train"),
            Job("good-train-1", "...", good, "train"),  # speaks nothing
            Job("broken-train-0", "This one never becomes audio.", broken, "train")]
    rows, failures = synthesize_jobs(jobs, cfg)
    assert [row["id"] for row in rows["train"]] == ["good-train-0"]
    assert failures == Counter({"engine error": 1, "empty or silent": 1})


ONE_SPEAKER = "split.unseen_speakers=[]"


@pytest.mark.parametrize(("overrides", "message"), [
    (["hours=0"], "hours must be a number > 0"),
    (["speakers=[{id: x, engine: sapi, voice: y}]", ONE_SPEAKER], "unknown engine 'sapi'"),
    (["speakers=[{id: x, engine: festival, voice: nobody}]", ONE_SPEAKER], "unknown festival voice"),
    (["speakers=[{id: x, engine: flite, voice: rms, params: {f0: 3}}]", ONE_SPEAKER], "flite has no params"),
    (["speakers=[{id: x, engine: espeak, voice: en-gb+m42}]", ONE_SPEAKER], "espeak has no voice 'm42'"),
    (["split.unseen_speakers=[ghost]"], "not in the speaker list"),
    (["engine_weights.festival=0"], r"needs a weight > 0 for \['festival'\]"),
    (["split.test_sentences=100000"], "too few for split.test_sentences"),
])
def test_bad_config_errors_clearly(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_corpus(corpus_config("tiny", tmp_path / "out", *overrides))
    assert not (tmp_path / "out").exists()
