"""Does a SpeechLM read its text? The next-token loss on an utterance's speech given its own transcript,
another utterance's transcript, or no text at all (the text_speech format, no voice prompt).

A model that reads the text predicts the speech better from its own transcript than from another one; a model
whose three losses agree is an unconditional speech LM, which is what an unintelligible TTS model usually is
early in training (WER above 1 while the voice is right). Cheaper and more direct than a WER: no sampling,
no codec, no ASR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from voxlm.data.shards import CodeShards
from voxlm.speechlm.sequences import tts_sequence
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
    if tok.interleaved:
        raise ValueError("text_use measures the plain format; an interleaved SpeechLM is fed each character "
                         "right before its speech, so it cannot help but read the text")
    rng = np.random.default_rng(seed)
    picked = [int(i) for i in rng.permutation(len(shards))[: min(count, len(shards))]]
    if len(picked) < 2:
        raise ValueError(f"text_use needs at least 2 utterances to swap transcripts; the shards hold "
                         f"{len(shards)}")
    losses = {condition: [] for condition in CONDITIONS}
    for k, i in enumerate(picked):
        utterance, other = shards[i], shards[picked[(k + 1) % len(picked)]]
        for condition, text in (("own", utterance.text), ("other", other.text), ("none", "")):
            example = tts_sequence(tok, text, np.asarray(utterance.codes))  # loss on the speech only
            loss = model(input_ids=torch.as_tensor(example.input_ids)[None],
                         labels=torch.as_tensor(example.labels)[None]).loss
            losses[condition].append(loss.item())
    return TextUse({c: np.array(v) for c, v in losses.items()}, [shards[i].id for i in picked])
