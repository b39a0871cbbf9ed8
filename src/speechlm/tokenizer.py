"""The SpeechLM's vocabulary: a Hugging Face text tokenizer, then control tokens, then the codec's codes.

Layout (design.md, "Vocabulary"):
    [0, text_vocab_size)              the text tokenizer's tokens (a Llama 3 folder's specials included)
    bos, eos, pad, <|text_start|>...  control tokens (bos/eos are the text tokenizer's when it has them)
    [code_offset, vocab_size)         <|c_0|> .. <|c_{K-1}|>: one contiguous block, last; code = id - offset
The layout is saved as `speech_layout.json` beside the tokenizer files and checked on load, so a tokenizer
built for one codec is never silently paired with another.

<|voice_start|> / <|voice_end|> are reserved in every vocabulary (a prompt made of codes without a
transcript) so that adding that format later does not shift the code block of saved checkpoints.

A layout with a `spoken_alphabet` is for the interleaved format (voxlm.speechlm.sequences): each character of
the text that is spoken (`spoken_char_ids`) goes into the speech before its codes, as the text tokenizer's own
token for that character, and <|advance|> is what the model predicts to move on to the next character. Its
`lookahead` is how many characters the model is given beyond the one it is saying (English spelling needs
the next few: "th", a silent "e"). Layouts saved before <|advance|> or the lookahead existed load unchanged.

A layout with `phonemes` (speechlm.tokenizer.spoken=phonemes) speaks the text's phonemes instead of its
letters: espeak-ng's phonemes of each word (voxlm.data.phonemes), each as one character of the text tokenizer
(`phonemes` maps espeak's names to those characters, for the inventory of the corpus it was built on), and a
space between words. Its `spoken_alphabet` is still the letters the code shards' timings count in; a
phoneme's timing is read off its word's letters (`spoken_timings`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from voxlm.codec.losses import spoken_characters
from voxlm.data.phonemes import WORD_BOUNDARY, SpokenPhoneme, phoneme_starts, spoken_phonemes

log = logging.getLogger(__name__)

LAYOUT_FILE = "speech_layout.json"
LAYOUT_VERSION = 1

# Used when the text tokenizer brings no bos/eos/pad of its own (a trained BPE; Llama 3 has no pad).
DEFAULT_BOS = "<|begin_of_text|>"
DEFAULT_EOS = "<|end_of_text|>"
DEFAULT_PAD = "<|pad|>"
CONTROL_TOKENS = {
    "text_start": "<|text_start|>",
    "text_end": "<|text_end|>",
    "speech_start": "<|speech_start|>",
    "speech_end": "<|speech_end|>",
    "voice_start": "<|voice_start|>",
    "voice_end": "<|voice_end|>",
    "advance": "<|advance|>",
}
OPTIONAL_CONTROL_TOKENS = {"advance"}  # layouts saved before it was added are still valid (plain format)

Ids = TypeVar("Ids", int, np.ndarray, torch.Tensor)


def code_token(code: int) -> str:
    return f"<|c_{code}|>"


def train_text_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (no special tokens: SpeechTokenizer.build adds them after the text).

    Byte-level means any string encodes (no unknown token) and decodes back exactly.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False)


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Any local Hugging Face tokenizer folder (e.g. a Llama 3 tokenizer); never downloads."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: needs a fast tokenizer (tokenizer.json), got {type(tokenizer).__name__}")
    return tokenizer


@dataclass(frozen=True)
class VocabLayout:
    """Where everything sits in the vocabulary; stored in checkpoints, artifacts and speech_layout.json."""

    text_vocab_size: int
    code_offset: int
    codebook_size: int
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad and CONTROL_TOKENS' names
    version: int = LAYOUT_VERSION
    spoken_alphabet: str | None = None  # the interleaved format's characters (None: the plain format)
    lookahead: int = 0                  # interleaved: characters fed beyond the one being said
    phonemes: dict[str, str] | None = None  # interleaved, spoken=phonemes: espeak name -> the character said
    phoneme_voice: str | None = None        # the espeak-ng voice that phonemizes the text
    codec_id: str | None = None             # Codec.code_fingerprint of the codec whose codes it holds

    @property
    def vocab_size(self) -> int:
        return self.code_offset + self.codebook_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VocabLayout:
        return cls(**json.loads(text))


class CodecMismatchError(ValueError):
    """A codec whose codes are not the ones a SpeechLM's vocabulary was built for."""


class SpeechTokenizer:
    """Text tokenizer + control tokens + a contiguous block of code tokens (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, layout: VocabLayout) -> None:
        check_layout(tokenizer, layout)
        self.tokenizer = tokenizer
        self.layout = layout
        ids = layout.special_ids
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.text_start_id: int = ids["text_start"]
        self.text_end_id: int = ids["text_end"]
        self.speech_start_id: int = ids["speech_start"]
        self.speech_end_id: int = ids["speech_end"]
        self.voice_start_id: int = ids["voice_start"]
        self.voice_end_id: int = ids["voice_end"]
        self.advance_id: int | None = ids.get("advance")
        self.char_ids = self._char_ids(self.spoken_symbols) if layout.spoken_alphabet else {}
        if layout.lookahead < 0 or (layout.lookahead and not layout.spoken_alphabet):
            raise ValueError(f"lookahead {layout.lookahead}: it counts characters of the interleaved format, "
                             "so it must be >= 0, and 0 without a spoken alphabet (set "
                             "speechlm.tokenizer.interleave=true, or lookahead=0)")

    def _char_ids(self, alphabet: str) -> dict[str, int]:
        """Each spoken character's own text token: the interleaved format puts it into the speech."""
        char_ids = {}
        for char in alphabet:
            ids = self.tokenizer.encode(char, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"the text tokenizer spells {char!r} with {len(ids)} tokens; the "
                                 "interleaved format needs one token per spoken character (a byte-level BPE "
                                 "has them)")
            char_ids[char] = ids[0]
        return char_ids

    @property
    def spoken_symbols(self) -> str:
        """The characters the interleaved format says: the letters, or the phonemes' symbols and a space."""
        if self.layout.phonemes:
            return "".join(sorted({WORD_BOUNDARY, *self.layout.phonemes.values()}))
        return self.layout.spoken_alphabet or ""

    @property
    def interleaved(self) -> bool:
        """True when the model speaks each character of the text before its codes (see the module doc)."""
        return bool(self.char_ids)

    def spoken_char_ids(self, text: str) -> list[int]:
        """The token ids of what the interleaved format says of `text`, in order: its letters (those in the
        spoken alphabet), or its phonemes and word boundaries."""
        if not self.interleaved:
            raise ValueError("this tokenizer is for the plain format: it has no spoken alphabet")
        if self.layout.phonemes:
            symbols = self.layout.phonemes | {WORD_BOUNDARY: WORD_BOUNDARY}
            return [self.char_ids[symbols[unit.name]] for unit in self._phonemes(text)[1]]
        return [self.char_ids[char] for char in spoken_characters(text, self.layout.spoken_alphabet)]

    def spoken_timings(self, text: str, letter_starts: Sequence[int] | None,
                       frames: int) -> list[int] | None:
        """Where each of `spoken_char_ids(text)` starts in `frames` codes, given where the text's letters
        start (the code shards' `char_starts`); None when the aligner could not read the text (no letter
        starts) or its phonemes do not fit."""
        if letter_starts is None:
            return None
        if not self.layout.phonemes:
            return list(letter_starts)
        words, units = self._phonemes(text)
        return phoneme_starts(words, units, letter_starts, frames)

    def _phonemes(self, text: str) -> tuple[list[str], list[SpokenPhoneme]]:
        """The text's spoken words and what is said of them; a phoneme the layout has no symbol for (rare
        in the corpus it was built on) is left out, so ids and timings always agree."""
        words = spoken_characters(text, self.layout.spoken_alphabet).split()
        units = spoken_phonemes(words, self.layout.phoneme_voice)
        known = [unit for unit in units if unit.name == WORD_BOUNDARY or unit.name in self.layout.phonemes]
        if len(known) < len(units):
            log.debug("no symbol for the phonemes %s of %r: left out",
                      sorted({u.name for u in units} - {u.name for u in known}), text)
        return words, known

    def spoken_feeds(self, char_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """What the interleaved format feeds of a text's spoken characters `char_ids` (n of them): (the
        tokens before the first character's codes, the token fed at each of the n - 1 later <|advance|>).

        With lookahead k, the first k + 1 characters come first; the i-th advance brings character i + k,
        and <|advance|> itself once the characters are all given, so the model is still told where each
        character's codes begin."""
        if not char_ids:
            raise ValueError("a text with no spoken character cannot be interleaved with speech")
        k = self.layout.lookahead
        later = [*char_ids[k + 1:], *[self.advance_id] * min(k, len(char_ids) - 1)]
        return list(char_ids[: k + 1]), later

    @classmethod
    def build(cls, text_tokenizer: PreTrainedTokenizerFast, codebook_size: int,
              spoken_alphabet: str | None = None, lookahead: int = 0,
              phonemes: dict[str, str] | None = None, phoneme_voice: str | None = None,
              codec_id: str | None = None) -> SpeechTokenizer:
        """Extend a text tokenizer (modified in place) with the control tokens and `codebook_size` codes; a
        `spoken_alphabet` (the codec's CTC alphabet, which the code shards' character timings count in)
        makes it a tokenizer for the interleaved format, given `lookahead` characters ahead, speaking the
        letters, or the `phonemes` (espeak name -> symbol, voxlm.data.phonemes.phoneme_symbols) that
        espeak-ng's `phoneme_voice` says. `codec_id`: the code fingerprint of the codec whose codes these are
        (Codec.code_fingerprint), which from_pretrained checks."""
        if phonemes is not None and not (spoken_alphabet and phoneme_voice):
            raise ValueError("phonemes are said in the interleaved format: they need the spoken alphabet "
                             "their timings are read from, and an espeak-ng voice")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        tok = text_tokenizer
        text_vocab_size = len(tok)
        tok.add_special_tokens({
            "bos_token": tok.bos_token or DEFAULT_BOS,
            "eos_token": tok.eos_token or DEFAULT_EOS,
            "pad_token": tok.pad_token or DEFAULT_PAD,
        })
        # special=True: decode(skip_special_tokens=True) drops them (and encode_text never produces them).
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS.values()],
                       special_tokens=True)
        code_offset = len(tok)
        codes = [AddedToken(code_token(c), special=True, normalized=False) for c in range(codebook_size)]
        tok.add_tokens(codes, special_tokens=True)
        special_ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
        special_ids |= {name: tok.convert_tokens_to_ids(t) for name, t in CONTROL_TOKENS.items()}
        return cls(tok, VocabLayout(text_vocab_size, code_offset, codebook_size, special_ids,
                                    spoken_alphabet=spoken_alphabet, lookahead=lookahead,
                                    phonemes=phonemes, phoneme_voice=phoneme_voice, codec_id=codec_id))

    @classmethod
    def from_pretrained(cls, path: str | Path, codebook_size: int | None = None,
                        codec_id: str | None = None) -> SpeechTokenizer:
        """Load what save_pretrained wrote; the codec's `codebook_size` and `codec_id`
        (Codec.code_fingerprint) are checked against the layout (an id where both sides know one)."""
        path = Path(path)
        layout_path = path / LAYOUT_FILE
        if not layout_path.exists():
            raise FileNotFoundError(
                f"{path} has no {LAYOUT_FILE}: it is not a SpeechLM tokenizer. Build one with "
                "SpeechTokenizer.build(text_tokenizer, codebook_size) and save_pretrained it")
        layout = VocabLayout.from_json(layout_path.read_text())
        if codebook_size is not None and codebook_size != layout.codebook_size:
            raise CodecMismatchError(
                f"the tokenizer at {path} was built for a {layout.codebook_size}-code codec, but this codec "
                f"has {codebook_size} codes: use the tokenizer saved with a SpeechLM trained on this codec's "
                "shards, or build a new one")
        if codec_id is not None and layout.codec_id is not None and codec_id != layout.codec_id:
            raise CodecMismatchError(
                f"the SpeechLM at {path} learned the codes of codec {layout.codec_id}, and this codec gives "
                f"other codes (fingerprint {codec_id}): pass the codec its code shards were made with (the "
                "tokenize run's shards/*/meta.json names its codec_run)")
        return cls(load_text_tokenizer(path), layout)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(str(path))
        (path / LAYOUT_FILE).write_text(self.layout.to_json())

    def __len__(self) -> int:
        return self.layout.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def code_offset(self) -> int:
        return self.layout.code_offset

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    def code_to_token(self, codes: Ids) -> Ids:
        """Codec codes (int, numpy or torch, any shape) -> token ids of the same type and shape."""
        _check_range(codes, 0, self.codebook_size, "code")
        if isinstance(codes, torch.Tensor):
            return codes.long() + self.code_offset
        if isinstance(codes, np.ndarray):
            return codes.astype(np.int64) + self.code_offset
        return int(codes) + self.code_offset

    def token_to_code(self, token_ids: Ids) -> Ids:
        """Code token ids -> codec codes; raises on any id outside the code block."""
        _check_range(token_ids, self.code_offset, self.vocab_size, "code token id")
        return token_ids - self.code_offset

    def is_code(self, token_ids: Ids) -> Ids:
        """Boolean mask (or bool for an int): which ids are code tokens."""
        return in_code_block(token_ids, self.code_offset, self.vocab_size - self.code_offset)

    def encode_text(self, text: str) -> list[int]:
        """Text token ids, without bos/eos. Markup typed into the text ("<|speech_end|>") stays plain text,
        so user input can never inject a control or code token."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode_text(self, token_ids: Iterable[int]) -> str:
        """Text of the text tokens among `token_ids`; control and code tokens are dropped."""
        ids = [int(i) for i in token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def in_code_block(token_ids: Ids, code_offset: int, codebook_size: int) -> Ids:
    """Boolean mask (or bool for an int): which ids fall in the code block, for code that holds the
    vocabulary layout's numbers rather than a SpeechTokenizer (the training module)."""
    return (token_ids >= code_offset) & (token_ids < code_offset + codebook_size)


def _check_range(values: int | np.ndarray | torch.Tensor, low: int, high: int, what: str) -> None:
    if isinstance(values, torch.Tensor):
        bad = values.numel() and bool(((values < low) | (values >= high)).any())
    else:
        array = np.asarray(values)
        bad = array.size and bool(((array < low) | (array >= high)).any())
    if bad:
        raise ValueError(f"{what}s must lie in [{low}, {high}), got values outside it")


def check_layout(tokenizer: PreTrainedTokenizerFast, layout: VocabLayout) -> None:
    """Raise when `tokenizer` does not place its tokens where `layout` says (e.g. files from another run)."""
    problems = []
    if layout.version != LAYOUT_VERSION:
        problems.append(f"layout version {layout.version}, this code reads version {LAYOUT_VERSION}")
    if len(tokenizer) != layout.vocab_size:
        problems.append(f"{len(tokenizer)} tokens, the layout says {layout.vocab_size}")
    required = {"bos", "eos", "pad", *CONTROL_TOKENS} - (set() if layout.spoken_alphabet
                                                          else OPTIONAL_CONTROL_TOKENS)
    missing = required - set(layout.special_ids)
    if missing:
        problems.append(f"no ids for {sorted(missing)}")
    for name, token in CONTROL_TOKENS.items():
        if name in layout.special_ids and tokenizer.convert_tokens_to_ids(token) != layout.special_ids[name]:
            problems.append(f"{token} is id {tokenizer.convert_tokens_to_ids(token)}, "
                            f"the layout says {layout.special_ids[name]}")
    for name in ("bos", "eos", "pad"):
        actual = getattr(tokenizer, f"{name}_token_id")
        if name in layout.special_ids and actual != layout.special_ids[name]:
            problems.append(f"{name} is id {actual}, the layout says {layout.special_ids[name]}")
    if max(layout.special_ids.values(), default=-1) >= layout.code_offset:
        problems.append("a special token lies inside the code block")
    code_ids = tokenizer.convert_tokens_to_ids([code_token(c) for c in range(layout.codebook_size)])
    if code_ids != list(range(layout.code_offset, layout.vocab_size)):
        problems.append(f"<|c_0|>..<|c_{layout.codebook_size - 1}|> are not ids "
                        f"{layout.code_offset}..{layout.vocab_size - 1} in order")
    if problems:
        raise ValueError("tokenizer does not match its vocabulary layout: " + "; ".join(problems))
