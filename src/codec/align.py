"""Word timings in code frames: a transcript forced-aligned to an utterance's codes by the codec's CTC head.

The CTC head (voxlm.codec.losses.CTCHead) learned during codec training to read characters off the quantized
latents, so it reads them off the codes alone. Viterbi alignment of the known transcript through its
log-probabilities (torchaudio's forced_align) puts every character on a frame; the cut between two words is
the middle of the gap between the last character of one and the first of the next.

The tokenize stage stores the cuts in the code shards (`word_cuts`), and SpeechLM pretraining cuts phrases of
a few words out of utterances with them (the `phrase` source of voxlm.speechlm.sequences): short text-speech
pairs in which it is plain which text goes with which speech.
"""

from __future__ import annotations

from pathlib import Path

import jiwer
import numpy as np
import torch
from torchaudio.functional import forced_align, merge_tokens

from voxlm.codec.losses import CTCHead, spoken_characters
from voxlm.codec.model import FSQ


def load_ctc_head(codec_run: str | Path) -> CTCHead | None:
    """The CTC head of a codec run (from its Lightning checkpoint, which holds the whole training module), or
    None when the run has no checkpoint or trained without the head (loss weight ctc 0)."""
    path = Path(codec_run) / "checkpoints" / "last.ckpt"
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    hparams = saved["hyper_parameters"]
    loss_cfg, model_cfg = hparams["loss_cfg"], hparams["model_cfg"]
    if loss_cfg["weights"]["ctc"] <= 0:
        return None
    ctc = loss_cfg["ctc"]
    head = CTCHead(len(model_cfg["levels"]), ctc["dim"], ctc["kernel_size"], ctc["alphabet"])
    prefix = "ctc_head."
    head.load_state_dict({k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)})
    return head.eval()


def require_ctc_head(codec_run: str | Path, needed_for: str) -> CTCHead:
    """`load_ctc_head`, for a tool that cannot work without the head: a clear error names what needs it."""
    head = load_ctc_head(codec_run)
    if head is None:
        raise ValueError(f"{codec_run} has no CTC head (its codec trained with loss weight ctc 0, or the run "
                         f"has no checkpoint): {needed_for}")
    return head


def code_log_probs(head: CTCHead, quantizer: FSQ, codes: np.ndarray) -> torch.Tensor:
    """The head's log-probabilities [frames, blank + alphabet] for an utterance's codes."""
    latents = quantizer.codes_to_latent(torch.as_tensor(np.asarray(codes), dtype=torch.long))
    return head.net(latents.T[None].float()).log_softmax(dim=1)[0].T


@torch.inference_mode()
def read_characters(head: CTCHead, quantizer: FSQ, codes: np.ndarray) -> str:
    """What the head reads off the codes: greedy CTC (best class per frame, repeats merged, blanks out)."""
    best = code_log_probs(head, quantizer, codes).argmax(dim=1).tolist()
    return "".join(head.alphabet[i - 1] for i, before in zip(best, [0, *best], strict=False)
                   if i != 0 and i != before)


def character_error(head: CTCHead, quantizer: FSQ, codes: np.ndarray, text: str) -> float:
    """The character error rate of what the head reads off `codes` against `text`'s characters that it
    reads (`spoken_characters(text, head.alphabet)`): a judge of the codes that needs no audio."""
    return float(jiwer.cer(spoken_characters(text, head.alphabet), read_characters(head, quantizer, codes)))


@torch.inference_mode()
def transcript_timings(head: CTCHead, quantizer: FSQ, codes: np.ndarray,
                       text: str) -> tuple[list[int] | None, list[int] | None]:
    """(word cuts, character starts) of `text` in `codes`, from one pass of the head over the codes.

    Word cuts: between the words of `text.split()` (see `cuts_from_log_probs`). Character starts: the first
    frame of each character the head reads (`spoken_characters(text, head.alphabet)`, spaces included), so
    character i is codes[starts[i]:starts[i + 1]] and the last one runs to the end. Either is None when the
    text has no such character or more than the frames can hold."""
    log_probs = code_log_probs(head, quantizer, codes)
    cuts = cuts_from_log_probs(log_probs, [head.encode_text(word) for word in text.split()],
                               head.char_to_id[" "])
    return cuts, starts_from_log_probs(log_probs, head.encode_text(text))


def character_spans(log_probs: torch.Tensor, targets: list[int]) -> list | None:
    """torchaudio's Viterbi alignment of character ids through CTC log-probabilities [frames, classes]
    (blank = 0): one TokenSpan (start, end frames) per target, in order; None when the targets cannot fit
    (CTC needs a blank between repeated characters)."""
    repeats = sum(a == b for a, b in zip(targets, targets[1:], strict=False))
    if not targets or len(targets) + repeats > log_probs.shape[0]:
        return None
    emissions = log_probs[None].float().contiguous()  # torchaudio's kernel reads the memory as it lies
    labels, _ = forced_align(emissions, torch.tensor([targets], dtype=torch.int32), blank=0)
    return merge_tokens(labels[0], torch.zeros(log_probs.shape[0]))


def starts_from_log_probs(log_probs: torch.Tensor, targets: list[int]) -> list[int] | None:
    """Each target character's first frame: 0 for the first, then the middle of the gap between one
    character's aligned frames and the next one's (CTC's spikes are narrower than the sounds)."""
    spans = character_spans(log_probs, targets)
    if spans is None:
        return None
    return [0] + [(before.end + after.start) // 2 for before, after in zip(spans, spans[1:], strict=False)]


def cuts_from_log_probs(log_probs: torch.Tensor, word_chars: list[list[int]], space: int) -> list[int] | None:
    """Frame cuts between words from CTC log-probabilities [frames, classes] (blank = 0) and each word's
    character ids: len(words) + 1 non-decreasing indices, the first 0 and the last the frame count, so word
    i is frames cuts[i]:cuts[i + 1]. A word with no character the head reads (a number, a dash) gets no
    frames (what it sounds like stays with the word before it). None when no word can be read, or the text
    has more characters than there are frames."""
    frames = log_probs.shape[0]
    readable = [i for i, chars in enumerate(word_chars) if chars]
    if not readable:
        return None
    targets: list[int] = []
    first_char, last_char = {}, {}  # word index -> index of its first / last character in targets
    for i in readable:
        if targets:
            targets.append(space)
        first_char[i] = len(targets)
        targets += word_chars[i]
        last_char[i] = len(targets) - 1
    spans = character_spans(log_probs, targets)
    if spans is None:
        return None
    cuts = [0] * (len(word_chars) + 1)
    cuts[-1] = frames
    for before, after in zip(readable, readable[1:], strict=False):
        cuts[after] = (spans[last_char[before]].end + spans[first_char[after]].start) // 2
    for i in range(1, len(word_chars)):  # an unreadable word starts where the next readable one does
        if i not in first_char:
            cuts[i] = next((cuts[j] for j in range(i + 1, len(word_chars)) if j in first_char), frames)
    return cuts
