"""Audio rewards for aligning the SpeechLM: each completion is decoded to speech by the codec and judged.

Components, each in [0, 1], combined with weights from config (the first three as Inworld's GRPO:
intelligibility, speaker similarity, quality):

- intelligibility  exp(-k * WER) of Whisper tiny.en's transcript against the target text;
- speaker_similarity  cosine similarity (resemblyzer) to the voice prompt's reference recording, floored at 0;
- dnsmos  DNSMOS overall, rescaled from the 1..5 MOS scale to 0..1;
- readability  1 - the character error rate of what the codec's CTC head reads off the codes
  (voxlm.codec.align; floored at 0). It needs no audio, and it tells apart degrees of unintelligible speech,
  where Whisper's WER is ~1 for every candidate; 0 (and not computed) without a head, which a weight above 0
  refuses.

A completion that is not valid speech gets 0 on every component (the minimum) and is counted by reason:
empty, text tokens inside, or over length (no [speech_end] before the generation limit, or more frames than
the target text's length guard allows). Invalid completions never reach the judges, so nothing a policy
samples can crash a run.

`SpeechRewards.score` judges a whole batch once and caches it; the per-component reward functions TRL calls
one after another read from that cache, so TRL logs each component while the audio is decoded and judged once.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from voxlm.codec.align import character_error
from voxlm.codec.losses import CTCHead
from voxlm.codec.model import Codec
from voxlm.data.text import normalize_text
from voxlm.eval.asr import utterance_wers
from voxlm.eval.tts_eval import Judges, decode_codes
from voxlm.speechlm.generate import frame_limit
from voxlm.speechlm.tokenizer import SpeechTokenizer
from voxlm.speechlm.voices import decoding_voice

log = logging.getLogger(__name__)

COMPONENTS = ("intelligibility", "speaker_similarity", "dnsmos", "readability")
INVALID_REASONS = ("empty", "text tokens inside", "over length")
MIN_VALID_SECONDS = 0.1


@dataclass(frozen=True)
class Completion:
    """A completion read as speech: its codes, or why it is not valid speech."""

    codes: np.ndarray | None
    invalid: str | None = None


def parse_completion(ids: Sequence[int], tok: SpeechTokenizer, max_frames: int) -> Completion:
    """Codes from sampled token ids: codes then [speech_end] (a trailing eos or padding is allowed)."""
    ids = list(ids)
    while ids and ids[-1] in (tok.eos_id, tok.pad_id):
        ids.pop()
    if not ids or ids[-1] != tok.speech_end_id:
        return Completion(None, "over length" if ids else "empty")
    body = np.asarray(ids[:-1], dtype=np.int64)
    if not len(body):
        return Completion(None, "empty")
    if not tok.is_code(body).all():
        return Completion(None, "text tokens inside")
    if len(body) > max_frames:
        return Completion(None, "over length")
    return Completion(body - tok.code_offset)


class SpeechRewards:
    """Judges loaded once; reference speaker embeddings computed once per reference recording."""

    def __init__(self, codec: Codec, tok: SpeechTokenizer, judges: Judges, references: dict[str, np.ndarray],
                 rewards_cfg: DictConfig, length_cfg: DictConfig, ctc_head: CTCHead | None = None) -> None:
        self.codec, self.tok, self.judges, self.ctc_head = codec, tok, judges, ctc_head
        # The head reads on the CPU (a few frames' convolutions), whichever device the codec decodes on.
        self.ctc_quantizer = copy.deepcopy(codec.quantizer).cpu()
        self.sample_rate = codec.sample_rate
        self.wer_scale = float(rewards_cfg.wer_scale)
        self.weights = {name: float(rewards_cfg.weights[name]) for name in COMPONENTS}
        if self.weights["readability"] and ctc_head is None:
            raise ValueError("the readability reward reads the codes with the codec's CTC head, and this "
                             "codec has none (it trained with loss weight ctc 0): set "
                             "stage.rewards.weights.readability=0")
        self.length_cfg = length_cfg
        # A codec with a voice encoder decodes each completion in its reference's voice: computed once here.
        self.decoding_voices = {i: decoding_voice(codec, audio) for i, audio in references.items()}
        ids = list(references)
        embeddings = judges.speaker.embed([references[i] for i in ids], self.sample_rate)
        self.reference_embeddings = dict(zip(ids, embeddings, strict=True))
        self.invalid: Counter[str] = Counter()
        self.scored = 0
        self._cache: tuple[tuple, dict[str, np.ndarray]] | None = None

    def max_frames(self, text: str) -> int:
        rate = self.codec.frame_rate
        num_tokens = len(self.tok.encode_text(normalize_text(text)))
        return frame_limit(num_tokens, self.length_cfg.base_seconds * rate,
                           self.length_cfg.seconds_per_text_token * rate)

    def score(self, completion_ids: Sequence[Sequence[int]], texts: Sequence[str],
              reference_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """{component: [N] rewards in [0, 1], "total": weighted sum, "valid": [N] bool} for a batch of
        sampled token ids; judged once, then served from a cache to each component's reward function."""
        key = (tuple(map(tuple, completion_ids)), tuple(texts), tuple(reference_ids))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        audios: list[np.ndarray | None] = []
        codes: list[np.ndarray | None] = []
        for ids, text, reference_id in zip(completion_ids, texts, reference_ids, strict=True):
            completion = parse_completion(ids, self.tok, self.max_frames(text))
            audio = None if completion.codes is None else decode_codes(
                self.codec, torch.from_numpy(completion.codes), self.decoding_voices[reference_id])
            reason = completion.invalid
            if audio is not None and len(audio) < MIN_VALID_SECONDS * self.sample_rate:
                audio, reason = None, "empty"
            if reason:
                self.invalid[reason] += 1
            audios.append(audio)
            codes.append(None if audio is None else completion.codes)
        self.scored += len(audios)
        scores = self.score_audio(audios, texts, reference_ids, codes)
        self._cache = (key, scores)
        return scores

    def score_audio(self, audios: Sequence[np.ndarray | None], texts: Sequence[str],
                    reference_ids: Sequence[str],
                    codes: Sequence[np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
        """The rewards of audio clips (None: not valid speech, scored 0) speaking `texts` in the voices of
        the references `reference_ids`; readability also needs each clip's codes."""
        n = len(audios)
        scores = {name: np.zeros(n) for name in COMPONENTS}
        valid = [i for i, audio in enumerate(audios) if audio is not None]
        if valid:
            clips = [audios[i] for i in valid]
            heard = self.judges.asr.transcribe(clips, self.sample_rate)
            wers = np.nan_to_num(utterance_wers([texts[i] for i in valid], heard), nan=1.0)
            scores["intelligibility"][valid] = np.exp(-self.wer_scale * wers)
            embeddings = self.judges.speaker.embed(clips, self.sample_rate)
            references = np.stack([self.reference_embeddings[reference_ids[i]] for i in valid])
            scores["speaker_similarity"][valid] = np.clip(np.sum(embeddings * references, axis=1), 0.0, 1.0)
            mos = self.judges.dnsmos.score(clips, self.sample_rate)
            scores["dnsmos"][valid] = np.clip([(m["ovrl"] - 1.0) / 4.0 for m in mos], 0.0, 1.0)
        if codes is None and self.weights["readability"]:
            raise ValueError("the readability reward reads codes: pass each clip's codes")
        if valid and self.ctc_head is not None and codes is not None:
            errors = [character_error(self.ctc_head, self.ctc_quantizer, codes[i], normalize_text(texts[i]))
                      for i in valid]
            scores["readability"][valid] = np.clip(1.0 - np.asarray(errors), 0.0, 1.0)
        scores["total"] = sum(self.weights[name] * scores[name] for name in COMPONENTS)
        scores["valid"] = np.array([audio is not None for audio in audios], dtype=bool)
        return scores

    def reward_functions(self) -> list[Callable[..., list[float]]]:
        """One TRL reward function per component (named after it, so TRL logs rewards/<name>/mean); pass
        `reward_weights()` to the trainer's config alongside them."""
        def component(name: str) -> Callable[..., list[float]]:
            def reward(prompts, completions, completion_ids, text, reference_id, log_metric=None,
                       speech_ids=None, **kwargs) -> list[float]:
                # An interleaved model's rollouts carry their speech apart from the fed characters.
                scores = self.score(completion_ids if speech_ids is None else speech_ids, text, reference_id)
                if name == COMPONENTS[0] and log_metric is not None:
                    log_metric("invalid_share", float(1.0 - scores["valid"].mean()))
                return scores[name].tolist()

            reward.__name__ = name
            return reward

        return [component(name) for name in COMPONENTS]

    def reward_weights(self) -> list[float]:
        return [self.weights[name] for name in COMPONENTS]

    def invalid_counts(self) -> dict[str, int]:
        return {reason: self.invalid[reason] for reason in INVALID_REASONS} | {"scored": self.scored}
