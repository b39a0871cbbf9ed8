"""Guided attention: an auxiliary loss that makes chosen heads of the SpeechLM read its text in order, so that
a small model learns to use the text early in training.

Tachibana et al. (2018, DCTTS) proposed it for encoder-decoder TTS: speech step n of N attending to text token
t of T is penalised away from the diagonal, with a Gaussian band of width sigma around t/T = n/N. In a
decoder-only LM the counterpart of cross-attention is the part of self-attention where a speech position of
an example looks at the text tokens of the same example. For each guided head the loss is the share of a
speech position's attention that falls outside the band (on text far from the diagonal, or not on the text
at all): 1 - sum_t A(n, t) G(n, t), G = exp(-(t/T - n/N)^2 / (2 sigma^2)). Only the guided heads are held
to the text; the others attend where they like. (A first version renormalised A over the text keys, so it
constrained only where a head looked within the text: on the quickstart the heads then put their mass
elsewhere and the model still ignored the text, see docs/benchmarks.md.)

An example counts when its whole text and speech lie in one row: [text_start] text [text_end] [speech_start]
codes [speech_end] (with a voice prompt, the prompt's transcript and codes are the first part of each, and
the band runs over both). Examples a packed row cuts off are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class TextSpeechSpan:
    row: int
    text: slice     # key positions: the example's text tokens
    speech: slice   # query positions: its code tokens


def text_speech_spans(input_ids: Tensor, text_start: int, text_end: int, speech_start: int,
                      speech_end: int) -> list[TextSpeechSpan]:
    """Every text-then-speech example that lies whole in its row of input_ids [B, T]."""
    spans = []
    for row, ids in enumerate(input_ids.cpu().numpy()):
        ends = np.flatnonzero(ids == text_end)
        speech_ends = np.flatnonzero(ids == speech_end)
        for start in np.flatnonzero(ids == text_start):
            end = ends[ends > start]
            if not len(end) or end[0] + 1 >= len(ids) or ids[end[0] + 1] != speech_start:
                continue
            first_code = end[0] + 2
            last = speech_ends[speech_ends >= first_code]
            if not len(last) or end[0] == start + 1 or last[0] == first_code:
                continue  # cut off by the row's end, or no text or no speech
            text, speech = slice(int(start) + 1, int(end[0])), slice(int(first_code), int(last[0]))
            spans.append(TextSpeechSpan(row, text, speech))
    return spans


def diagonal_band(speech_len: int, text_len: int, sigma: float) -> Tensor:
    """G [speech_len, text_len]: exp(-(t/T - n/N)^2 / (2 sigma^2)), 1 on the diagonal."""
    n = torch.arange(speech_len, dtype=torch.float32)[:, None] / speech_len
    t = torch.arange(text_len, dtype=torch.float32)[None, :] / text_len
    return torch.exp(-((t - n) ** 2) / (2 * sigma**2))


def guided_attention_loss(attentions: Sequence[Tensor], spans: Sequence[TextSpeechSpan], sigma: float,
                          heads: Sequence[int] | None = None) -> Tensor:
    """Mean over spans, the given layers' attention probabilities [B, H, T, T] and `heads` (None: all) of
    1 - sum_t A(n, t) G(n, t), averaged over the speech positions n. Zero (with a graph) when there is no
    span."""
    if not spans or not attentions:
        return sum((a.sum() * 0 for a in attentions), torch.zeros(()))
    total, count = attentions[0].new_zeros(()), 0
    for span in spans:
        band = diagonal_band(span.speech.stop - span.speech.start, span.text.stop - span.text.start,
                             sigma).to(attentions[0].device)
        for layer in attentions:
            part = layer[span.row, :, span.speech, span.text]  # [H, N, T]
            if heads is not None:
                part = part[list(heads)]
            total = total + 1 - (part * band).sum(-1).mean()
            count += 1
    return total / count
