"""Is it the durations or the sounds? An interleaved SpeechLM speaking with the ground truth's timings.

An interleaved SpeechLM (voxlm.speechlm.sequences) decides two things: when to move on to the next character
(<|advance|>) and which codes to say meanwhile. `codes_at_timings` takes the first decision from a recording:
each character is fed at the frame where the recording's forced alignment puts it (the tokenize stage's
`char_starts`, voxlm.codec.align), and the model only samples codes, exactly as many as the recording has.
If that speech is intelligible and the free-running one is not, the durations are what fail; if both are
unintelligible, the codes the model says for a character are.

`codes_teacher_forced` asks the same of each code alone: the model's pick for every frame given the
recording's history. `mix_codes` puts a share of those picks into the recording's codes, so a judge can say
how many of the model's picks the speech tolerates before it stops being intelligible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from voxlm.speechlm.generate import SamplingConfig, allowed_tokens, next_tokens
from voxlm.speechlm.tokenizer import SpeechTokenizer


@torch.no_grad()
def codes_at_timings(model: PreTrainedModel, tok: SpeechTokenizer, prompt: np.ndarray,
                     char_ids: Sequence[int], char_starts: Sequence[int], frames: int,
                     sampling: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """`frames` codes (LongTensor) sampled after `prompt` (a tts_prompt), with character i's feed
    (`tok.spoken_feeds`) given before frame char_starts[i]: <|advance|> and [speech_end] are never sampled.
    The repetition penalty's window counts codes, as `stream_codes`' does when no character is fed."""
    feeds_before = _feeds_before(tok, char_ids, char_starts, frames, sampling)
    ids = torch.as_tensor(np.append(np.asarray(prompt), feeds_before[0]), device=model.device)[None]
    out = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    allowed = _code_block(tok, out.logits.shape[-1]).to(model.device)
    codes: list[int] = []
    for frame in range(frames):
        token = _draw(out.logits[0, -1], allowed, codes, tok, sampling, generator)
        codes.append(token - tok.code_offset)
        if frame + 1 == frames:
            break
        fed = [token, *feeds_before.get(frame + 1, [])]
        out = model(input_ids=torch.tensor([fed], device=model.device), cache=out.cache, use_cache=True,
                    logits_to_keep=1)
    return torch.tensor(codes, dtype=torch.long)


@torch.no_grad()
def codes_teacher_forced(model: PreTrainedModel, tok: SpeechTokenizer, prompt: np.ndarray,
                         char_ids: Sequence[int], char_starts: Sequence[int], truth: np.ndarray,
                         sampling: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """The model's one-step predictions of a recording's codes: code t drawn (as `codes_at_timings` draws)
    from the model given the prompt, the characters at the recording's timings and the recording's own codes
    before t. Intelligible one-step predictions with unintelligible free-running speech mean the model
    drifts once its history is its own; unintelligible ones mean it does not know the sounds."""
    truth = np.asarray(truth)
    feeds_before = _feeds_before(tok, char_ids, char_starts, len(truth), sampling)
    ids, positions = list(np.asarray(prompt)), []
    for frame, code in enumerate(truth.tolist()):
        ids += feeds_before.get(frame, [])
        positions.append(len(ids) - 1)  # the logits there predict this frame's code
        ids.append(code + tok.code_offset)
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    allowed = _code_block(tok, logits.shape[-1]).to(model.device)
    codes: list[int] = []
    for frame, position in enumerate(positions):
        token = _draw(logits[position], allowed, truth[:frame].tolist(), tok, sampling, generator)
        codes.append(token - tok.code_offset)
    return torch.tensor(codes, dtype=torch.long)


def mix_codes(recording: np.ndarray, picks: np.ndarray, share: float, draws: np.ndarray) -> np.ndarray:
    """The recording's codes with the frames whose `draws` (uniform in [0, 1), one per frame, shared by every
    share so that a larger share replaces a superset of frames) fall under `share` taken from `picks`."""
    recording, picks, draws = np.asarray(recording), np.asarray(picks), np.asarray(draws)
    if not (recording.shape == picks.shape == draws.shape and recording.ndim == 1):
        raise ValueError(f"need one pick and one draw per recorded frame; got {recording.shape} codes, "
                         f"{picks.shape} picks and {draws.shape} draws")
    return np.where(draws < check_share(share), picks, recording)


def check_share(share: float) -> float:
    """`share` as a float, or a ValueError when it is no share of frames (outside [0, 1])."""
    share = float(share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share {share} is not in [0, 1]: the share of the recording's frames replaced")
    return share


def _feeds_before(tok: SpeechTokenizer, char_ids: Sequence[int], char_starts: Sequence[int], frames: int,
                  sampling: SamplingConfig) -> dict[int, list[int]]:
    """frame -> the tokens fed right before it, after checking the timings fit `frames` codes."""
    if not tok.interleaved:
        raise ValueError("given timings are for interleaved SpeechLMs: a plain one has no character to feed")
    if sampling.cfg_scale != 1.0:
        raise ValueError("given timings sample without classifier-free guidance: set cfg_scale 1.0")
    if not char_ids or len(char_ids) != len(char_starts) or list(char_starts) != sorted(char_starts) \
            or char_starts[0] != 0:
        raise ValueError(f"need one start per character, ascending from 0; got {len(char_ids)} characters "
                         f"and starts {list(char_starts)[:8]}...")
    if frames <= char_starts[-1]:
        raise ValueError(f"{frames} frames leave no code for the last character (it starts at "
                         f"{char_starts[-1]})")
    first, later = tok.spoken_feeds(char_ids)
    feeds_before: dict[int, list[int]] = {0: list(first)}
    for start, token in zip(char_starts[1:], later, strict=True):
        feeds_before.setdefault(start, []).append(token)
    return feeds_before


def _code_block(tok: SpeechTokenizer, vocab_size: int) -> Tensor:
    allowed = allowed_tokens(tok, vocab_size)
    allowed[[tok.speech_end_id, tok.advance_id]] = False
    return allowed


def _draw(logits: Tensor, allowed: Tensor, codes: list[int], tok: SpeechTokenizer, sampling: SamplingConfig,
          generator: torch.Generator | None) -> int:
    """One code token from one position's logits, the repetition penalty over the last window of `codes`."""
    window = sampling.repetition_window
    recent = codes[0 if window is None else max(0, len(codes) - window):]
    recent_ids = torch.tensor([recent], dtype=torch.long, device=logits.device).reshape(1, -1)
    return int(next_tokens(logits[None].float(), allowed[None], recent_ids + tok.code_offset, sampling,
                           generator)[0])
