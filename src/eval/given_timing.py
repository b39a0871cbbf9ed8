"""Is it the durations or the sounds? An interleaved SpeechLM speaking with the ground truth's timings.

An interleaved SpeechLM (voxlm.speechlm.sequences) decides two things: when to move on to the next character
(<|advance|>) and which codes to say meanwhile. `codes_at_timings` takes the first decision from a recording:
each character is fed at the frame where the recording's forced alignment puts it (the tokenize stage's
`char_starts`, voxlm.codec.align), and the model only samples codes, exactly as many as the recording has.
If that speech is intelligible and the free-running one is not, the durations are what fail; if both are
unintelligible, the codes the model says for a character are.
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
    feeds_before: dict[int, list[int]] = {0: list(first)}  # frame -> tokens fed right before it
    for start, token in zip(char_starts[1:], later, strict=True):
        feeds_before.setdefault(start, []).append(token)
    ids = torch.as_tensor(np.append(np.asarray(prompt), feeds_before[0]), device=model.device)[None]
    out = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    allowed = allowed_tokens(tok, out.logits.shape[-1]).to(model.device)
    allowed[[tok.speech_end_id, tok.advance_id]] = False
    window = sampling.repetition_window
    codes: list[int] = []
    for frame in range(frames):
        recent = codes[0 if window is None else max(0, len(codes) - window):]
        recent_ids = torch.tensor([recent], dtype=torch.long, device=model.device).reshape(1, -1)
        token = int(next_tokens(out.logits[:, -1].float(), allowed[None], recent_ids + tok.code_offset,
                                sampling, generator)[0])
        codes.append(token - tok.code_offset)
        if frame + 1 == frames:
            break
        fed = [token, *feeds_before.get(frame + 1, [])]
        out = model(input_ids=torch.tensor([fed], device=model.device), cache=out.cache, use_cache=True,
                    logits_to_keep=1)
    return torch.tensor(codes, dtype=torch.long)
