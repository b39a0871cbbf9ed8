"""Words to phonemes with espeak-ng, and a word's letter timings to its phonemes' timings.

A SpeechLM that speaks phonemes (`speechlm.tokenizer.spoken=phonemes`, voxlm.speechlm.tokenizer) needs, for
every text, the phonemes it says, and for every training utterance, the frame where each phoneme starts.
English spelling is a poor guide to sound ("though", "tough", "cough"): a small model trained for minutes
learns phonemes far sooner than it learns spelling, which is why FastSpeech, VITS, Piper and ELLA-V all read
phonemes.

- Phonemes come from espeak-ng (installed by scripts/setup.sh with the corpus' synthesizers), called through
  its shared library: ~0.05 ms a word, where a process per text would cost ~25 ms of a server's first-audio
  time. Each word is phonemized on its own, so that every phoneme belongs to one word of the text; espeak's
  stress marks are dropped, and each phoneme name (espeak's ASCII mnemonics: "t", "aI", "dZ") is then spoken
  as one character of the text tokenizer (`phoneme_symbols`), like a letter of the letter-speaking format.
- Timings: the tokenize stage aligns letters to codes (voxlm.codec.align). A word's phonemes are spread over
  its letters' span (`phoneme_starts`): phoneme j of m starts at letter position j * n / m of the word's n
  letters, read off the letters' start frames by linear interpolation. A word's boundaries come from the
  alignment; within it, the spread is an approximation that the model's own timing decisions smooth over.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

ESPEAK_LIBRARY = "libespeak-ng.so.1"
ESPEAK_AUDIO_OUTPUT_SYNCHRONOUS = 2   # espeak_Initialize: no audio device, no callback thread
ESPEAK_CHARS_UTF8 = 1
ESPEAK_PHONEMES_SEPARATOR = "_"       # what espeak_TextToPhonemes puts between phonemes (bits 8-23 of its mode)
STRESS_MARKS = "',%="                 # espeak's primary / secondary / unstressed marks: not sounds of their own
SOUND_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ@0123")  # ";", "?" etc. are not
# One character for each phoneme name longer than one character (diphthongs, affricates, variants): the text
# tokenizer's single-character tokens that espeak's one-character names and the word boundary do not use.
SYMBOL_POOL = "ABCFGHJKLMOPQRWXY456789!#$%&*+-./<=>[]^`{|}~\"(),:;?\\"
WORD_BOUNDARY = " "


class Espeak:
    """espeak-ng's phonemizer, one voice, through its shared library (which keeps global state: one lock)."""

    _lock = threading.Lock()
    _voice: str | None = None
    _library: ctypes.CDLL | None = None

    @classmethod
    def _load(cls, voice: str) -> ctypes.CDLL:
        if cls._library is None:
            try:
                library = ctypes.cdll.LoadLibrary(ESPEAK_LIBRARY)
            except OSError as error:
                raise RuntimeError(f"phonemes need espeak-ng's library {ESPEAK_LIBRARY} ({error}): install the "
                                   "espeak-ng package (scripts/setup.sh does)") from error
            if library.espeak_Initialize(ESPEAK_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0) <= 0:
                raise RuntimeError("espeak-ng did not initialize: is its data folder (espeak-ng-data) installed?")
            library.espeak_TextToPhonemes.restype = ctypes.c_char_p
            library.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                                      ctypes.c_int]
            cls._library = library
        if cls._voice != voice:
            if cls._library.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r} (`espeak-ng --voices` lists them)")
            cls._voice = voice
        return cls._library

    @classmethod
    def phonemize(cls, text: str, voice: str) -> str:
        """espeak's phoneme mnemonics of `text`, phonemes joined by "_", words by spaces, clauses by spaces."""
        mode = ord(ESPEAK_PHONEMES_SEPARATOR) << 8
        with cls._lock:
            library = cls._load(voice)
            buffer = ctypes.create_string_buffer(text.encode())
            pointer = ctypes.c_void_p(ctypes.addressof(buffer))
            clauses = []
            while pointer.value:  # espeak advances the pointer one clause at a time, to NULL at the end
                clauses.append(library.espeak_TextToPhonemes(ctypes.byref(pointer), ESPEAK_CHARS_UTF8, mode))
        return " ".join(clause.decode() for clause in clauses if clause)


@lru_cache(maxsize=65536)
def word_phonemes(word: str, voice: str) -> tuple[str, ...]:
    """The phoneme names of one word, stress marks dropped: "thought" -> ("T", "O:", "t")."""
    names = Espeak.phonemize(word, voice).replace(" ", ESPEAK_PHONEMES_SEPARATOR)
    phonemes = (name.strip(STRESS_MARKS) for name in names.split(ESPEAK_PHONEMES_SEPARATOR))
    return tuple(name for name in phonemes if SOUND_CHARACTERS.intersection(name))


def phoneme_inventory(texts: Iterable[str], voice: str) -> Counter:
    """How often each phoneme name occurs in the words of `texts` (split on whitespace)."""
    return Counter(name for text in texts for word in text.split() for name in word_phonemes(word, voice))


def phoneme_symbols(names: Iterable[str]) -> dict[str, str]:
    """One distinct character per phoneme name: one-character names stand for themselves, longer ones take
    the pool's characters in sorted order, so the same inventory always gets the same symbols."""
    names = sorted(set(names))
    single = {name: name for name in names if len(name) == 1 and name != WORD_BOUNDARY}
    pool = [char for char in SYMBOL_POOL if char not in single]
    longer = [name for name in names if name not in single]
    if len(longer) > len(pool):
        raise ValueError(f"{len(longer)} multi-character phoneme names but only {len(pool)} free symbols")
    return single | dict(zip(longer, pool, strict=False))


class SpokenPhoneme(NamedTuple):
    name: str        # espeak's name, or WORD_BOUNDARY
    word: int        # which word says it (for a boundary: the word after it)
    position: float  # where in that word's letters it starts, in letters (a boundary: -1, the space before)


def spoken_phonemes(words: Sequence[str], voice: str) -> list[SpokenPhoneme]:
    """What a text of `words` (its spoken letters, split) says: each word's phonemes in order, a boundary
    between consecutive words that have any. Words without phonemes (an apostrophe alone) are not said."""
    units: list[SpokenPhoneme] = []
    for index, word in enumerate(words):
        names = word_phonemes(word, voice)
        if not names:
            continue
        if units:
            units.append(SpokenPhoneme(WORD_BOUNDARY, index, -1.0))
        units += [SpokenPhoneme(name, index, j * len(word) / len(names)) for j, name in enumerate(names)]
    return units


def phoneme_starts(words: Sequence[str], units: Sequence[SpokenPhoneme], letter_starts: Sequence[int],
                   frames: int) -> list[int] | None:
    """Each unit's first frame, from the start frames of the letters of " ".join(words) (spaces included, as
    voxlm.codec.align counts them) in `frames` codes: strictly increasing from 0, or None when the units do
    not fit (more of them than frames) or there are none."""
    text = " ".join(words)
    if len(letter_starts) != len(text):
        raise ValueError(f"{len(letter_starts)} letter timings for the {len(text)} characters of {text!r}")
    first_letter = [0] * len(words)
    for i in range(1, len(words)):
        first_letter[i] = first_letter[i - 1] + len(words[i - 1]) + 1
    times = [*letter_starts, frames]  # position len(text) is the end of the speech

    def frame_at(position: float) -> float:
        low = int(position)
        return times[low] + (position - low) * (times[min(low + 1, len(text))] - times[low])

    starts = [int(frame_at(first_letter[unit.word] + unit.position)) for unit in units]
    if not starts:
        return None
    starts[0] = 0  # whatever comes before the first unit (an unsaid word) is said with it
    for i in range(1, len(starts)):
        starts[i] = max(starts[i], starts[i - 1] + 1)
    return starts if starts[-1] < frames else None
