"""Does a SpeechLM read its text? The next-token loss on an utterance's speech given its own transcript,
another utterance's transcript, or no text at all (the text_speech format, no voice prompt).

A model that reads the text predicts the speech better from its own transcript than from another one; a model
whose three losses agree is an unconditional speech LM, which is what an unintelligible TTS model usually is
early in training (WER above 1 while the voice is right). Cheaper and more direct than a WER: no sampling,
no codec, no ASR.

An interleaved SpeechLM (voxlm.speechlm.sequences) hears the text twice: in the text span and as the
characters (or phonemes) in its speech. Each condition's text goes into both, the characters at the
utterance's own timings (another transcript's characters cycled or cut to the utterance's count; no text: the
space character at every timing), and the loss covers the codes and [speech_end], not <|advance|>.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from voxlm.data.shards import CodedUtterance, CodeShards
from voxlm.speechlm.sequences import (
    IGNORE,
    Example,
    interleaved_speech,
    speakable_rows,
    tts_prompt,
    tts_sequence,
)
from voxlm.speechlm.tokenizer import SpeechTokenizer

CONDITIONS = ("own", "other", "none")


@dataclass
class TextUse:
    losses: dict[str, np.ndarray]  # condition -> mean target-speech loss per utterance [n]
    ids: list[str]                 # the utterances, in order

    def mean(self, condition: str) -> float:
        return float(self.losses[condition].mean())

    def gap(self, condition: str) -> tuple[float, float]:
        """How much more loss `condition` has than the own transcript: (mean over utterances, its standard
        error). The utterances are paired, so the gap is far less noisy than the losses themselves."""
        diff = self.losses[condition] - self.losses["own"]
        return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


@torch.no_grad()
def text_use(model: PreTrainedModel, tok: SpeechTokenizer, shards: CodeShards, count: int = 40,
             seed: int = 0) -> TextUse:
    """The three losses on `count` utterances drawn (seeded) from the shards; "other" pairs each utterance
    with the transcript of the next one drawn."""
    rng = np.random.default_rng(seed)
    usable = np.flatnonzero(speakable_rows(tok, shards)).tolist()
    picked = [usable[int(i)] for i in rng.permutation(len(usable))[: min(count, len(usable))]]
    if len(picked) < 2:
        raise ValueError(f"text_use needs at least 2 utterances to swap transcripts; the shards hold "
                         f"{len(shards)}")
    losses = {condition: [] for condition in CONDITIONS}
    for k, i in enumerate(picked):
        utterance, other = shards[i], shards[picked[(k + 1) % len(picked)]]
        for condition, text in (("own", utterance.text), ("other", other.text), ("none", "")):
            example = speech_given_text(tok, text, utterance)
            loss = model(input_ids=torch.as_tensor(example.input_ids)[None],
                         labels=torch.as_tensor(example.labels)[None]).loss
            losses[condition].append(loss.item())
    return TextUse({c: np.array(v) for c, v in losses.items()}, [shards[i].id for i in picked])


def speech_given_text(tok: SpeechTokenizer, text: str, utterance: CodedUtterance) -> Example:
    """The utterance's speech after `text`, with the loss on the speech only (see the module docstring)."""
    codes = np.asarray(utterance.codes)
    if not tok.interleaved:
        return tts_sequence(tok, text, codes)
    starts = tok.spoken_timings(utterance.text, utterance.char_starts, len(codes))
    chars = tok.spoken_char_ids(text) or [tok.char_ids[" "]]
    chars = [chars[i % len(chars)] for i in range(len(starts))]
    prompt = tts_prompt(tok, text)
    speech, labels = interleaved_speech(tok, codes, chars, starts)
    labels = np.where(labels == tok.advance_id, IGNORE, labels)
    return Example(np.concatenate([prompt, speech, [tok.eos_id]]),
                   np.concatenate([np.full(len(prompt), IGNORE), labels, [IGNORE]]))
