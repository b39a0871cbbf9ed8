"""RLHF rewards: each component on real speech (flite voices, numpy noise), and completions that are not
valid speech, which must score the minimum and be counted without reaching the judges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCE_A, SENTENCE_B, white_noise
from omegaconf import OmegaConf
from trl.trainer.dpo_trainer import DataCollatorForPreference

from voxlm.codec.losses import CTCHead, spoken_characters
from voxlm.codec.model import Codec
from voxlm.eval.tts_eval import Judges
from voxlm.rlhf.rewards import COMPONENTS, SpeechRewards, parse_completion
from voxlm.rlhf.stage import ScoreChosenTokens, fed_character_mask
from voxlm.speechlm.tokenizer import SpeechTokenizer, train_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REWARDS = OmegaConf.create({"weights": {"intelligibility": 1.0, "speaker_similarity": 1.0, "dnsmos": 0.5,
                                        "readability": 0.0}, "wer_scale": 2.0})
LENGTH = OmegaConf.create({"base_seconds": 2.0, "seconds_per_text_token": 0.5})


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    return Codec(**OmegaConf.to_container(OmegaConf.load(ROOT / "configs/codec/tiny.yaml").model)).eval()


@pytest.fixture(scope="module")
def tok(codec: Codec) -> SpeechTokenizer:
    return SpeechTokenizer.build(train_text_tokenizer([SENTENCE_A, SENTENCE_B] * 8, vocab_size=300),
                                 codec.codebook_size)


@pytest.fixture(scope="module")
def rewards(codec: Codec, tok: SpeechTokenizer, whisper, speaker_judge, dnsmos,
            speech: dict) -> SpeechRewards:
    references = {"rms": speech["rms_b"][0], "slt": speech["slt_b"][0]}  # the voices, saying another text
    assert speech["rms_b"][1] == codec.sample_rate == 16000
    return SpeechRewards(codec, tok, Judges(whisper, speaker_judge, dnsmos), references, REWARDS, LENGTH)


def test_each_reward_prefers_the_right_speech(rewards: SpeechRewards, speech: dict) -> None:
    rms_a, slt_a = speech["rms_a"][0], speech["slt_a"][0]
    noise = white_noise(3.0, 16000)
    clips = [rms_a, rms_a, noise, slt_a]
    texts = [SENTENCE_A, SENTENCE_B, SENTENCE_A, SENTENCE_A]
    scores = rewards.score_audio(clips, texts, ["rms", "rms", "rms", "rms"])
    good, wrong_text, noisy, wrong_speaker = range(4)
    intelligibility, similarity, quality, readability = (scores[name] for name in COMPONENTS)
    assert np.all(readability == 0.0)  # no CTC head: not computed
    assert intelligibility[good] > 0.6 and intelligibility[noisy] < 0.2
    assert intelligibility[good] > intelligibility[wrong_text] + 0.4
    assert similarity[good] > similarity[wrong_speaker] + 0.1 and similarity[good] > similarity[noisy]
    assert quality[good] > quality[noisy] + 0.2
    assert scores["total"][good] > max(scores["total"][noisy], scores["total"][wrong_speaker])
    for name in COMPONENTS:
        assert np.all((scores[name] >= 0) & (scores[name] <= 1))
    assert scores["total"][good] == pytest.approx(
        sum(rewards.weights[name] * scores[name][good] for name in COMPONENTS))


def test_parse_completion(tok: SpeechTokenizer) -> None:
    codes = tok.code_to_token(np.array([3, 1, 4]))
    end, eos = tok.speech_end_id, tok.eos_id
    np.testing.assert_array_equal(parse_completion([*codes, end, eos], tok, 10).codes, [3, 1, 4])
    assert parse_completion([], tok, 10).invalid == "empty"
    assert parse_completion([end], tok, 10).invalid == "empty"
    assert parse_completion([*codes, tok.encode_text("hi")[0], end], tok, 10).invalid == "text tokens inside"
    assert parse_completion([*codes, tok.speech_start_id, end], tok, 10).invalid == "text tokens inside"
    assert parse_completion(list(codes), tok, 10).invalid == "over length"  # never said speech end
    assert parse_completion([*codes, end], tok, 2).invalid == "over length"  # beyond the length guard


def test_malformed_completions_get_the_minimum_and_are_counted(rewards: SpeechRewards,
                                                                tok: SpeechTokenizer) -> None:
    codes = list(tok.code_to_token(np.arange(60) % tok.codebook_size))
    end = tok.speech_end_id
    completions = [[], [end], [*codes[:5], tok.encode_text("the")[0], end], codes,
                   codes * 100 + [end], [*codes, end]]
    assert rewards.max_frames(SENTENCE_A) < 60 * 100  # so the 6,000-frame completion is over length
    before = dict(rewards.invalid)
    scores = rewards.score(completions, [SENTENCE_A] * len(completions), ["rms"] * len(completions))
    assert scores["valid"].tolist() == [False] * 5 + [True]
    for name in (*COMPONENTS, "total"):
        assert np.all(scores[name][:5] == 0.0)
    counted = {reason: rewards.invalid[reason] - before.get(reason, 0) for reason in rewards.invalid}
    assert counted == {"empty": 2, "text tokens inside": 1, "over length": 2}
    # TRL calls one function per component with the same batch: judged once, read from the cache.
    functions = rewards.reward_functions()
    assert [f.__name__ for f in functions] == list(COMPONENTS)
    logged = {}
    values = [f(prompts=[""] * 6, completions=[""] * 6, completion_ids=completions, text=[SENTENCE_A] * 6,
                reference_id=["rms"] * 6, log_metric=logged.__setitem__) for f in functions]
    assert values == [scores[name].tolist() for name in COMPONENTS]
    assert logged == {"invalid_share": pytest.approx(5 / 6)}
    assert rewards.invalid_counts()["scored"] == 6  # the cached calls judged nothing again


def test_dpo_scores_only_the_tokens_the_model_chose(tok: SpeechTokenizer) -> None:
    """In an interleaved completion each character stands where the model said <|advance|>: the collator
    leaves it out of the completion mask, and keeps the codes, [speech_end] and eos."""
    spoken = SpeechTokenizer.build(train_text_tokenizer([SENTENCE_A, SENTENCE_B] * 8, vocab_size=300),
                                   tok.codebook_size, spoken_alphabet=" abcdefghijklmnopqrstuvwxyz'")
    h, i = spoken.char_ids["h"], spoken.char_ids["i"]
    c1, c2 = (int(spoken.code_to_token(np.array([c]))[0]) for c in (1, 2))
    end, eos = spoken.speech_end_id, spoken.eos_id
    prompt = [spoken.bos_id, spoken.speech_start_id, h]
    collate = ScoreChosenTokens(DataCollatorForPreference(pad_token_id=spoken.pad_id),
                                fed_character_mask(spoken, spoken.vocab_size))
    batch = collate([{"prompt_ids": prompt, "chosen_ids": [c1, i, c2, end, eos],
                      "rejected_ids": [c1, c1, i, end, eos]}])
    assert batch["input_ids"][0].tolist() == [*prompt, c1, i, c2, end, eos]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 1, 1]]
    plain = fed_character_mask(tok, tok.vocab_size)
    assert not plain.any()  # a plain model is fed nothing: every completion token counts


def spelling_head(codec: Codec, alphabet: str) -> CTCHead:
    """A CTC head that reads code k as class k (0: blank, k: alphabet[k - 1]): trained per frame in a few
    hundred steps, as a stand-in for a codec's trained head."""
    torch.manual_seed(0)
    head = CTCHead(len(codec.quantizer.levels), 64, 1, alphabet)
    classes = torch.arange(len(alphabet) + 1)
    latents = codec.quantizer.codes_to_latent(classes).T[None].float()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head.net(latents)[0].T, classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def test_readability_is_what_the_ctc_head_reads_off_the_codes(codec: Codec, tok: SpeechTokenizer,
                                                             rewards: SpeechRewards, speech: dict) -> None:
    alphabet = " abcdefghijklmnopqrstuvwxyz'"
    head = spelling_head(codec, alphabet)

    def spelled(text: str) -> list[int]:  # each character: a blank frame, then two frames of its code
        codes = [c for char in spoken_characters(text, alphabet) for c in (0, alphabet.index(char) + 1,
                                                                          alphabet.index(char) + 1)]
        return [*tok.code_to_token(np.array(codes)), tok.speech_end_id]

    weights = OmegaConf.merge(REWARDS, {"weights": {"readability": 1.0}})
    reading = SpeechRewards(codec, tok, rewards.judges, {"rms": speech["rms_b"][0]}, weights,
                            LENGTH, head)
    half = SENTENCE_A[: len(SENTENCE_A) // 2]
    scores = reading.score([spelled(SENTENCE_A), spelled(SENTENCE_B), spelled(half), [tok.speech_end_id]],
                           [SENTENCE_A] * 4, ["rms"] * 4)
    readability = scores["readability"]
    assert readability[0] == 1.0 and readability[1] < 0.5 and readability[3] == 0.0  # the last: empty
    assert readability[2] == pytest.approx(1 - (len(spoken_characters(SENTENCE_A, alphabet))
                                                - len(spoken_characters(half, alphabet))) /
                                           len(spoken_characters(SENTENCE_A, alphabet)), abs=0.03)
    assert rewards.ctc_head is None and np.all(rewards.score([spelled(SENTENCE_A)], [SENTENCE_A],
                                                             ["rms"])["readability"] == 0.0)
    with pytest.raises(ValueError, match="has none"):
        SpeechRewards(codec, tok, rewards.judges, {}, weights, LENGTH)
