"""The parity gate: the MAX graphs must compute what the PyTorch modules compute before an artifact exists.

Checks, each a number against a threshold from config (per dtype):

- speechlm/logits: a left-padded batch of real prompts (voice prompt + sentence from the corpus) at prefill
  and over decode steps through the KV cache; the largest absolute logit difference, and that difference
  over the largest |logit| (relative);
- speechlm/greedy: greedy decoding over the code block for `greedy_tokens` steps from each prompt; the share
  of rows whose tokens are PyTorch's, up to a near tie: a row may part from PyTorch's only at a step where
  PyTorch itself scored the two tokens within twice the accepted logit error (`logits_max_abs`) of each
  other, since an error that the logits check admits can swap them. Before that step both sides read the
  same tokens, so the comparison is fair. In float32 (1e-3) that means identical rows; in bfloat16 a flip
  between two codes a fraction of a logit apart no longer fails an export whose logits agree (the approach
  of vLLM's check_logprobs_close);
- codec/decode: the MAX offline decode of the prompts' real codes against PyTorch's, SNR in dB;
- codec/stream: the MAX streaming decode (the server's chunk schedule) against PyTorch's offline decode;
- codec/encode: the share of frames whose MAX code equals PyTorch's for the real recordings;
- codec/voice (a codec with a voice encoder): each recording's MAX voice vector against PyTorch's, SNR in dB.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from voxlm.codec.model import Codec
from voxlm.eval.audio_metrics import snr_db
from voxlm.speechlm.generate import left_pad
from voxlm.speechlm.tokenizer import SpeechTokenizer

log = logging.getLogger(__name__)


@dataclass
class Check:
    module: str
    metric: str
    value: float
    threshold: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class ParityError(Exception):
    """The MAX graphs do not compute what PyTorch computes; the message names each failing check."""


@torch.no_grad()
def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: Any) -> tuple[torch.Tensor, Any]:
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1].float(), out.cache


def speechlm_checks(torch_model: PreTrainedModel, max_model: Any, tok: SpeechTokenizer,
                    prompts: Sequence[np.ndarray], thresholds: dict[str, float], decode_steps: int,
                    greedy_tokens: int) -> list[Check]:
    """Logits at prefill and over decode steps (both fed the same tokens), then each side's own greedy
    decoding over the code block, on a left-padded batch of prompts."""
    ids, mask = left_pad(prompts, tok.pad_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    codes = slice(tok.code_offset, tok.code_offset + tok.codebook_size)

    def run(model: Any, steps: int, follow: list[torch.Tensor] | None) -> tuple[list, list]:
        """(last-position logits per step, greedy code tokens per step); with `follow`, feed those tokens."""
        cache = DynamicCache(config=torch_model.config) if model is torch_model else None
        logits, cache = _forward(model, ids, mask, positions, cache)
        step_mask, next_position, all_logits, tokens = mask, mask.sum(1), [logits], []
        for step in range(steps):
            tokens.append(logits[:, codes].argmax(-1) + tok.code_offset)
            if step + 1 == steps:
                break
            fed = follow[step] if follow is not None else tokens[-1]
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            logits, cache = _forward(model, fed[:, None], step_mask, next_position[:, None], cache)
            next_position = next_position + 1
            all_logits.append(logits)
        return all_logits, tokens

    reference, reference_tokens = run(torch_model, max(decode_steps, 1), None)
    exported, _ = run(max_model, max(decode_steps, 1), reference_tokens)
    worst_abs = max(float((r - e).abs().max()) for r, e in zip(reference, exported, strict=True))
    largest = max(float(r.abs().max()) for r in reference)
    reference_logits, greedy_reference = run(torch_model, greedy_tokens, None)
    _, greedy_exported = run(max_model, greedy_tokens, None)
    margins = divergence_margins(torch.stack(reference_logits, 1), torch.stack(greedy_reference, 1),
                                 torch.stack(greedy_exported, 1))
    for row, (step, margin) in enumerate(margins):
        if step is not None:
            log.info("greedy row %d parts from PyTorch's at step %d, where PyTorch's two logits were %.3g "
                     "apart", row, step, margin)
    tie = 2 * thresholds["logits_max_abs"]
    kept = sum(step is None or margin <= tie for step, margin in margins) / len(margins)
    return [
        Check("speechlm", "logits_max_abs", worst_abs, thresholds["logits_max_abs"], False),
        Check("speechlm", "logits_rel", worst_abs / max(largest, 1e-12), thresholds["logits_rel"], False),
        Check("speechlm", f"greedy_{greedy_tokens}_tokens_same_rows_up_to_near_ties", kept,
              thresholds["greedy_match"], True),
    ]


def divergence_margins(reference_logits: torch.Tensor, reference: torch.Tensor,
                       exported: torch.Tensor) -> list[tuple[int | None, float]]:
    """Per row: (the first step whose token differs, or None; PyTorch's logit of its own token there minus
    its logit of the exported token, >= 0). reference_logits [B, steps, vocab] are PyTorch's at each step of
    its own greedy run, which both runs share up to that first difference."""
    margins = []
    for row in range(len(reference)):
        differs = torch.nonzero(reference[row] != exported[row]).flatten()
        if len(differs) == 0:
            margins.append((None, 0.0))
            continue
        step = int(differs[0])
        logits = reference_logits[row, step]
        margins.append((step, float(logits[reference[row, step]] - logits[exported[row, step]])))
    return margins


def stream_in_chunks(decoder: Any, codes: torch.Tensor, chunk_frames: Sequence[int],
                     voice: torch.Tensor | None = None) -> np.ndarray:
    """Decode [1, F] codes (in voice [1, voice_dim], for a codec with a voice encoder) chunk by chunk with the
    schedule (its last size repeats), then flush."""
    state, pieces, start, step = decoder.init_stream(1, voice), [], 0, 0
    while start < codes.shape[1]:
        size = chunk_frames[min(step, len(chunk_frames) - 1)]
        audio, state = decoder.stream(codes[:, start: start + size], state)
        pieces.append(np.asarray(audio, dtype=np.float32).reshape(-1))
        start, step = start + size, step + 1
    tail = decoder.flush(state)
    if tail is not None:
        pieces.append(np.asarray(tail, dtype=np.float32).reshape(-1))
    return np.concatenate(pieces)


@torch.no_grad()
def codec_checks(codec: Codec, max_decoder: Any, max_encoder: Any, clips: Sequence[np.ndarray],
                 thresholds: dict[str, float], chunk_frames: Sequence[int]) -> list[Check]:
    """Decode, streaming decode and encode of real recordings against the PyTorch codec; a codec with a voice
    encoder also has each clip's voice computed on both sides, and decodes each clip in its own voice
    (PyTorch's, so that the decode checks measure the decoder alone)."""
    decode_snr, stream_snr, voice_snr, agree, frames = [], [], [], 0, 0
    for clip in clips:
        audio = torch.from_numpy(np.asarray(clip, dtype=np.float32))[None]
        codes = codec.encode(audio)
        voice = codec.voice(audio) if codec.has_voice else None
        if voice is not None:
            voice_snr.append(snr_db(voice[0].numpy(), np.asarray(max_encoder.voice(audio))[0]))
        reference = codec.decode(codes, voice)[0].numpy()
        exported = np.asarray(max_decoder.decode(codes, voice), dtype=np.float32).reshape(-1)
        decode_snr.append(snr_db(reference, exported[: len(reference)]))
        streamed = stream_in_chunks(max_decoder, codes, chunk_frames, voice)
        stream_snr.append(snr_db(reference, streamed[: len(reference)]))
        max_codes = np.asarray(max_encoder.encode(audio)).reshape(-1)
        agree += int((max_codes[: codes.shape[1]] == codes[0].numpy()).sum())
        frames += codes.shape[1]
    checks = [
        Check("codec", "decode_snr_db_min", float(min(decode_snr)), thresholds["codec_snr_db"], True),
        Check("codec", "stream_snr_db_min", float(min(stream_snr)), thresholds["stream_snr_db"], True),
        Check("codec", "encode_code_agreement", agree / max(frames, 1), thresholds["encoder_agreement"],
              True),
    ]
    if voice_snr:  # the voice graph is a float32 port like the decoder's: held to the decoder's threshold
        checks.append(Check("codec", "voice_snr_db_min", float(min(voice_snr)), thresholds["codec_snr_db"],
                            True))
    return checks


def report_markdown(checks: Sequence[Check], title: str) -> str:
    lines = [f"# {title}", "", "| module | metric | value | threshold | passed |", "|---|---|---:|---:|---|"]
    for check in checks:
        bound = (">= " if check.higher_is_better else "<= ") + f"{check.threshold:g}"
        lines.append(f"| {check.module} | {check.metric} | {check.value:.3g} | {bound} | "
                     f"{'yes' if check.passed else '**NO**'} |")
    return "\n".join(lines) + "\n"


def raise_on_failure(checks: Sequence[Check]) -> None:
    failed = [check for check in checks if not check.passed]
    if failed:
        raise ParityError("parity failed: " + "; ".join(
            f"{c.module} {c.metric} = {c.value:.3g} (needs {'>=' if c.higher_is_better else '<='} "
            f"{c.threshold:g})" for c in failed))
