"""The evaluation judges on real audio: speech synthesized here by flite and espeak-ng, noise from numpy, and
Debian's five LibriVox clips. Each judge is loaded once per session."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import ROOT, SENTENCE_A, train_config, white_noise

from voxlm.eval.asr import WhisperJudge, corpus_wer, is_repetition_loop, utterance_wer, utterance_wers
from voxlm.eval.audio_metrics import (
    code_repeat,
    codebook_usage,
    log_mel_distance,
    pesq_wb,
    si_sdr,
    snr_db,
    stoi,
)
from voxlm.eval.best_of_n import kept_rows
from voxlm.eval.dnsmos import DnsmosJudge
from voxlm.eval.report import (
    bootstrap_ci,
    markdown_table,
    plot_mel_pairs,
    summarize,
    write_json,
    write_markdown_table,
)
from voxlm.eval.speaker import SpeakerJudge
from voxlm.eval.tts_eval import build_cases, dnsmos_scores, speaker_similarities
from voxlm.eval.vad import SileroVad

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
def add_noise(audio: np.ndarray, snr: float, seed: int = 0) -> np.ndarray:
    """The clip plus white noise at `snr` dB below the clip's power."""
    noise = np.random.default_rng(seed).standard_normal(len(audio))
    noise *= np.sqrt(np.mean(audio.astype(np.float64) ** 2) / 10 ** (snr / 10))
    return (audio + noise).astype(np.float32)


@pytest.fixture(scope="session")
def vad() -> SileroVad:
    return SileroVad()


# ---- ASR and WER ----

def test_whisper_reads_speech_not_noise(whisper: WhisperJudge, speech: dict) -> None:
    audio, sample_rate = speech["rms_a"]
    noise = white_noise(4.0, sample_rate)
    hypotheses = whisper.transcribe([audio, noise, audio], sample_rate)
    assert hypotheses[0] == hypotheses[2]  # deterministic decoding
    assert utterance_wer(SENTENCE_A, hypotheses[0]) <= 0.25, hypotheses[0]
    assert utterance_wer(SENTENCE_A, hypotheses[1]) >= 0.9, hypotheses[1]
    assert whisper.wer([SENTENCE_A, SENTENCE_A], hypotheses[:2]) > 0.45


def test_repetition_loops_are_told_from_sentences() -> None:
    assert is_repetition_loop("Sure, " * 28)
    assert is_repetition_loop("I'm going to go to the top of the bottom" + " of the bottom" * 20)
    assert not is_repetition_loop(SENTENCE_A)
    assert not is_repetition_loop("and he coupled the five curtains one to another")
    assert not is_repetition_loop("")


def test_loop_guard_rescores_a_saved_evaluation(tmp_path: Path) -> None:
    """scripts/loop_guard.py counts a looping transcript as heard nothing, on both sides of the ratio."""
    records = [{"text": "one two three four", "heard": "one two three four",
                "heard_ground_truth": "one two three four"},
               {"text": "five six", "heard": "sure, " * 20, "heard_ground_truth": "five six"}]
    (tmp_path / "tts_eval.json").write_text(json.dumps({"records": {"test_seen": records}}))
    result = subprocess.run([sys.executable, str(ROOT / "scripts/loop_guard.py"), str(tmp_path)],
                            capture_output=True, text=True, check=True)
    synthesis = next(line for line in result.stdout.splitlines() if "| synthesis |" in line)
    # As judged: 2 misses + 18 insertions in 6 words; as heard nothing: the 2 words missed.
    assert synthesis.endswith(f"| 1 | {20 / 6:.3f} | {2 / 6:.3f} |"), synthesis
    assert "| ground truth | 0 | 0.000 | 0.000 |" in result.stdout
    assert "through the codec" not in result.stdout  # not in these records


def test_wer_normalizes_both_sides() -> None:
    assert corpus_wer(["Mr. Smith paid $5."], ["mister smith paid five dollars"]) == 0.0
    assert corpus_wer(["mister smith paid five dollars"], ["Mr. Smith paid $5!"]) == 0.0
    assert utterance_wers(["the cat sat", "a b", ""], ["the cat", "a b c d", "hello"])[:2] == \
        pytest.approx([1 / 3, 1.0])
    assert math.isnan(utterance_wers(["..."], ["words"])[0])  # nothing to score, not an error
    # Corpus WER weighs utterances by their length: 1 error in 3 words + 0 in 5 words = 1/8.
    assert corpus_wer(["the cat sat", "one two three four five"], ["the cat", "one two three four five"]) \
        == pytest.approx(1 / 8)
    with pytest.raises(ValueError):
        corpus_wer(["a"], ["a", "b"])


@pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="pocketsphinx-testdata is not installed")
def test_whisper_on_librivox(whisper: WhisperJudge) -> None:
    """Real human speech: five LibriVox clips with their Sphinx transcripts ("<s> words </s> (id)")."""
    references = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        text, _, clip_id = line.rpartition(" (")
        references[clip_id.rstrip(")")] = text.replace("<s>", "").replace("</s>", "").strip()
    paths = sorted(LIBRIVOX.glob("*.wav"))
    clips = [sf.read(path, dtype="float32") for path in paths]
    hypotheses = whisper.transcribe([audio for audio, _ in clips], clips[0][1])
    assert corpus_wer([references[path.stem] for path in paths], hypotheses) < 0.15


# ---- speaker similarity ----

def test_same_voice_is_more_similar_than_another(speaker_judge: SpeakerJudge, speech: dict) -> None:
    (rms_a, sr), (rms_b, _), (slt_b, _) = speech["rms_a"], speech["rms_b"], speech["slt_b"]
    same = speaker_judge.similarity(rms_a, rms_b, sr)  # same voice, different sentences
    different = speaker_judge.similarity(rms_a, slt_b, sr)  # different voices, different sentences
    assert same > 0.75
    assert same > different + 0.1
    batched = speaker_judge.similarities([rms_a, rms_a], [rms_b, slt_b], sr)
    np.testing.assert_allclose(batched, [same, different], atol=1e-5)
    embeddings = speaker_judge.embed([rms_a, slt_b], sr)
    assert embeddings.shape == (2, 256)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


# ---- DNSMOS ----

def test_dnsmos_prefers_clean_speech_to_noise(dnsmos: DnsmosJudge, speech: dict) -> None:
    audio, sample_rate = speech["rms_a"]
    clean, noise = dnsmos.score([audio, white_noise(3.0, sample_rate)], sample_rate)
    assert set(clean) == {"ovrl", "sig", "bak", "p808"}
    assert noise["ovrl"] < 2.0 < clean["ovrl"]
    assert clean["bak"] > noise["bak"] + 1.0


# ---- VAD ----

def energy_bounds(audio: np.ndarray, sample_rate: int, floor_db: float = -40.0) -> tuple[float, float]:
    """First and last 10 ms frame within floor_db of full scale: where the synthesizer's speech is."""
    frame = sample_rate // 100
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    loud = np.flatnonzero(10 * np.log10(np.mean(frames**2, axis=1) + 1e-12) > floor_db)
    return loud[0] / 100, (loud[-1] + 1) / 100


def test_vad_finds_speech_after_leading_silence(vad: SileroVad, speech: dict) -> None:
    audio, sample_rate = speech["espeak_a"]
    start, end = energy_bounds(audio, sample_rate)
    lead, tail = 1.0, 0.8
    padded = np.concatenate([np.zeros(int(lead * sample_rate)), audio, np.zeros(int(tail * sample_rate))])
    padded = padded.astype(np.float32) + white_noise(len(padded) / sample_rate, sample_rate, std=1e-4)
    bounds = vad.speech_bounds(padded, sample_rate)
    assert bounds is not None
    assert bounds[0] == pytest.approx(lead + start, abs=0.15)
    assert bounds[1] == pytest.approx(lead + end, abs=0.15)
    trimmed = vad.trim(padded, sample_rate)
    assert len(trimmed) / sample_rate == pytest.approx(end - start, abs=0.3)
    assert vad.speech_bounds(np.zeros(sample_rate * 2, dtype=np.float32), sample_rate) is None


# ---- signal metrics ----

def test_metrics_peak_on_identical_audio_and_drop_with_noise(speech: dict) -> None:
    audio, sample_rate = speech["rms_a"]
    noisy = add_noise(audio, snr=10.0)
    longer = np.concatenate([audio, np.zeros(300, dtype=np.float32)])  # a codec's padded output
    assert stoi(audio, longer, sample_rate) > 0.99
    assert pesq_wb(audio, audio, sample_rate) > 4.4
    assert si_sdr(audio, longer) > 60
    assert snr_db(audio, longer) == math.inf
    assert log_mel_distance(audio, longer, sample_rate) == pytest.approx(0.0, abs=1e-6)

    assert stoi(audio, noisy, sample_rate) < 0.95
    assert pesq_wb(audio, noisy, sample_rate) < 2.5
    assert si_sdr(audio, noisy) == pytest.approx(10.0, abs=1.0)
    assert snr_db(audio, noisy) == pytest.approx(10.0, abs=0.5)
    assert log_mel_distance(audio, noisy, sample_rate) > 0.2
    assert si_sdr(audio, 0.5 * audio) > 60  # scale-invariant; plain SNR is not
    assert snr_db(audio, 0.5 * audio) == pytest.approx(6.02, abs=0.01)


def test_pesq_returns_nan_on_a_clip_it_cannot_score() -> None:
    silence = np.zeros(16000, dtype=np.float32)
    with pytest.warns(UserWarning, match="PESQ"):
        assert math.isnan(pesq_wb(silence, silence, 16000))


def test_codebook_usage() -> None:
    usage = codebook_usage(np.array([[0, 0, 1, 1]]), codebook_size=4)
    assert usage == pytest.approx({"share_used": 0.5, "perplexity": 2.0})
    uniform = codebook_usage(np.arange(64).repeat(3), codebook_size=64)
    assert uniform == pytest.approx({"share_used": 1.0, "perplexity": 64.0})
    assert codebook_usage(np.zeros(100, dtype=np.int64), 8) == pytest.approx({"share_used": 1 / 8,
                                                                               "perplexity": 1.0})
    with pytest.raises(ValueError):
        codebook_usage(np.array([0, 8]), codebook_size=8)


def test_code_repeat_counts_pairs_within_each_utterance() -> None:
    # 2 repeats in 3 pairs, then 0 in 1; the boundary between the two utterances is no pair.
    assert code_repeat([np.array([5, 5, 5, 7]), np.array([7, 1])]) == pytest.approx(2 / 4)
    assert code_repeat([np.zeros(10, dtype=np.int64)]) == 1.0
    assert code_repeat([np.arange(10), np.array([3])]) == 0.0
    with pytest.raises(ValueError, match="no pair"):
        code_repeat([np.array([1]), np.array([], dtype=np.int64)])


# ---- reports ----

def test_report_files(tmp_path: Path, speech: dict) -> None:
    audio, sample_rate = speech["rms_a"]
    rows = {"test_seen": summarize([{"stoi": 0.8, "pesq_wb": 2.0}, {"stoi": 0.9, "pesq_wb": math.nan}]),
            "librivox": summarize([{"stoi": 0.7, "pesq_wb": 1.5}])}
    assert rows["test_seen"] == pytest.approx({"stoi": 0.85, "pesq_wb": 2.0, "n": 2})
    results = {"conditions": rows, "snr": math.inf, "codes": np.arange(3), "count": np.int64(5)}
    loaded = json.loads(write_json(results, tmp_path / "r.json").read_text())
    assert loaded["conditions"]["test_seen"]["stoi"] == pytest.approx(0.85)
    assert loaded["snr"] == math.inf and loaded["codes"] == [0, 1, 2] and loaded["count"] == 5

    table = write_markdown_table(rows, tmp_path / "r.md", title="codec").read_text().splitlines()
    assert table[0] == "# codec"
    assert table[2] == "| condition | stoi | pesq_wb | n |"
    assert table[4] == "| test_seen | 0.850 | 2.000 | 2 |"
    assert markdown_table({"x": {"snr": math.inf, "pesq": math.nan}}).endswith("| x | inf | n/a |")

    figure = plot_mel_pairs([("a", audio, add_noise(audio, 5.0)), ("b", audio, audio)], sample_rate,
                            tmp_path / "mels.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 20_000


def test_bootstrap_ci() -> None:
    values = np.random.default_rng(1).normal(3.0, 1.0, size=200)
    mean, low, high = bootstrap_ci(values)
    assert low < mean < high
    assert mean == pytest.approx(values.mean())
    assert 0.1 < high - low < 0.5  # ~ 2 * 1.96 / sqrt(200) = 0.28
    assert bootstrap_ci(values) == (mean, low, high)  # seeded
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


# ---- TTS evaluation ----

def test_tts_eval_prompts_each_sentence_with_another_recording_of_its_speaker(tiny_corpus: Path) -> None:
    from voxlm.data.dataset import build_dataset

    data_cfg = train_config("stage=sft", "experiment=tiny", f"paths.data_dir={tiny_corpus.parent}").data
    for split, reference_split in (("test_seen", "train"), ("test_unseen", "test_unseen")):
        cases = build_cases(data_cfg, split, reference_split, 16000, limit=50, max_prompt_seconds=30.0)
        references = build_dataset(data_cfg, reference_split, sample_rate=16000)
        speaker_of = dict(zip(references.ids, references.speakers, strict=True))
        assert cases and len({case.speaker for case in cases}) > 1
        for case in cases:
            assert speaker_of[case.reference_id] == case.speaker and case.reference_id != case.id
            assert len(case.audio) and len(case.reference_audio) and case.reference_text
        again = build_cases(data_cfg, split, reference_split, 16000, limit=50, max_prompt_seconds=30.0)
        assert [c.reference_id for c in again] == [c.reference_id for c in cases]  # fixed for a seed
    with pytest.raises(ValueError, match="max_prompt_seconds"):
        build_cases(data_cfg, "test_unseen", "test_unseen", 16000, limit=5, max_prompt_seconds=0.01)


def test_an_empty_synthesis_gets_the_floor_scores(speaker_judge: SpeakerJudge, dnsmos: DnsmosJudge,
                                                   speech: dict) -> None:
    (audio, sr), (other, _) = speech["rms_a"], speech["rms_b"]
    similarity = speaker_similarities(speaker_judge, [audio, np.zeros(0, np.float32)], [other, other], sr)
    assert similarity[0] > 0.75 and similarity[1] == 0.0
    clean, empty = dnsmos_scores(dnsmos, [audio, np.zeros(10, np.float32)], sr)
    assert clean["ovrl"] > 2.0 and empty == {"ovrl": 1.0, "sig": 1.0, "bak": 1.0, "p808": 1.0}


def test_best_of_n_keeps_each_rules_pick() -> None:
    """voxlm.eval.best_of_n: 4 candidates x 2 sentences; the readability rule keeps the lowest character
    error, the oracle the lowest WER, in each group of N."""
    texts = ["one two", "three four"]
    heard = np.array([["one", "three four"],            # candidate 0: WER 0.5, 0
                      ["one two", "sure, " * 20],        # candidate 1: WER 0, a loop
                      ["one two", "three"],              # candidate 2: WER 0, 0.5
                      ["two", "four"]], dtype=object)     # candidate 3: WER 0.5, 0.5
    wer = np.array([utterance_wers(texts, list(row)) for row in heard])
    error = np.array([[0.9, 0.1], [0.2, 0.5], [0.3, 0.2], [0.1, 0.9]])
    sim = np.array([[0.5, 0.6], [0.7, 0.8], [0.9, 1.0], [0.1, 0.2]])
    rows = kept_rows(texts, heard, wer, error, sim, 2)
    # groups {0, 1} and {2, 3}
    first = rows["best of 2, first"]
    assert first["groups"] == 2
    assert first["wer"] == pytest.approx(1 / 4)  # candidates 0 and 2, one word missed by each
    assert first["speaker_sim"] == pytest.approx((0.55 + 0.95) / 2)
    readability = rows["best of 2, readability"]  # {1 for "one two", 0 for "three four"}, {3, 2}
    assert readability["char_error"] == pytest.approx((0.15 + 0.15) / 2)
    assert readability["wer"] == pytest.approx((0 + 2 / 4) / 2)
    oracle = rows["best of 2, oracle"]  # {1, 0}, {2, 3 or 2}: WER 0 then 1/4 at best
    assert oracle["wer"] == pytest.approx((0 + 1 / 4) / 2)
    everything = kept_rows(texts, heard, wer, error, sim, 1)["best of 1, first"]
    assert everything["groups"] == 4
    # candidate 1's loop: 22 insertions as judged, nothing heard with the guard (2 deletions)
    looped = (2 + 18) / 4
    assert everything["wer"] == pytest.approx((1 / 4 + looped + 1 / 4 + 2 / 4) / 4)
    assert everything["wer_loops_as_silence"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4 + 2 / 4) / 4)
