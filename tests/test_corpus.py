"""The offline corpus builder on real engines: a handful of real utterances per engine, deterministic
splits and speakers, held-out speakers and sentences kept out of training, and clear config errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import corpus_config
from datasets import Audio, load_from_disk

from voxlm.data.corpus import SPLITS, plan_jobs, sentence_pool, speakers_from_config


@pytest.fixture(scope="module")
def corpus(tiny_corpus: Path):
    return load_from_disk(str(tiny_corpus))


def test_splits_and_columns(corpus) -> None:
    assert set(corpus) == set(SPLITS)
    for split in SPLITS:
        assert len(corpus[split]) > 0
        assert set(corpus[split].column_names) == {"id", "audio", "text", "speaker", "engine", "duration"}
    assert {"flite", "festival", "espeak"} <= set(corpus["train"]["engine"])


def test_audio_is_real_speech_at_the_configured_rate(corpus) -> None:
    train = corpus["train"].cast_column("audio", Audio(decode=False))
    for row in train:
        audio, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
        assert rate == 16000
        assert audio.ndim == 1
        assert abs(len(audio) / rate - row["duration"]) < 0.01
        assert np.sqrt(np.mean(audio**2)) > 0.01, f"{row['id']} is near silent"
        assert 0.5 < row["duration"] < 20


def test_held_out_speakers_and_sentences_never_train(corpus, tiny_corpus: Path) -> None:
    summary = json.loads((tiny_corpus / "summary.json").read_text())
    unseen = set(summary["config"]["unseen_speakers"])
    assert set(corpus["test_unseen"]["speaker"]) == unseen
    assert not unseen & set(corpus["train"]["speaker"])
    assert not unseen & set(corpus["val"]["speaker"])
    train_text = set(corpus["train"]["text"])
    assert not train_text & set(corpus["test_seen"]["text"])
    assert not train_text & set(corpus["val"]["text"])
    assert not train_text & set(corpus["test_unseen"]["text"])
    assert set(corpus["test_seen"]["speaker"]) <= set(corpus["train"]["speaker"])


def test_summary_matches_dataset(corpus, tiny_corpus: Path) -> None:
    summary = json.loads((tiny_corpus / "summary.json").read_text())
    for split in SPLITS:
        assert summary["splits"][split]["utterances"] == len(corpus[split])
        hours = sum(corpus[split]["duration"]) / 3600
        assert summary["splits"][split]["hours"] == pytest.approx(hours, rel=1e-3)
    assert summary["hours_per_cpu_minute"] > 0


def test_plan_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    cfg = corpus_config("tiny", tmp_path)
    speakers = speakers_from_config(cfg)
    first = plan_jobs(cfg, speakers, sentence_pool(cfg.text, cfg.seed))
    second = plan_jobs(cfg, speakers, sentence_pool(cfg.text, cfg.seed))
    assert [(j.id, j.text, j.split) for j in first] == [(j.id, j.text, j.split) for j in second]
    other = corpus_config("tiny", tmp_path, "seed=7")
    third = plan_jobs(other, speakers, sentence_pool(other.text, other.seed))
    assert [j.text for j in first] != [j.text for j in third]


def test_rebuild_with_same_config_is_skipped(tiny_corpus: Path) -> None:
    from voxlm.data.corpus import build_corpus

    before = (tiny_corpus / "summary.json").stat().st_mtime_ns
    build_corpus(corpus_config("tiny", tiny_corpus, "workers=1"))  # workers do not change the content
    assert (tiny_corpus / "summary.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(("override", "message"), [
    ("hours=0", "hours must be > 0"),
    ("speakers=[{id: x, engine: sapi, voice: y}]", "unknown engine 'sapi'"),
    ("speakers=[{id: x, engine: festival, voice: nobody}]", "unknown festival voice"),
    ("unseen_speakers=[ghost]", "not in the speaker list"),
])
def test_bad_config_errors_clearly(tmp_path: Path, override: str, message: str) -> None:
    cfg = corpus_config("tiny", tmp_path, override)
    with pytest.raises(ValueError, match=message):
        plan_jobs(cfg, speakers_from_config(cfg), sentence_pool(cfg.text, cfg.seed))
