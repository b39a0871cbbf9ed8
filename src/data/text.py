"""English text normalization and sentence cleaning.

`normalize_text` makes text a TTS engine reads the way a listener hears it (numbers, currency, ordinals and
abbreviations spelled out); `normalize_for_wer` additionally lowercases and strips punctuation, and is applied
to BOTH the reference and the ASR hypothesis before scoring, so "Mr. Smith paid $5" and "mister smith paid
five dollars" count as the same words.
"""

from __future__ import annotations

import re
import unicodedata

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                 "nine": "ninth", "twelve": "twelfth"}

# Abbreviations whose period is not a sentence end; expanded before sentences are split.
ABBREVIATIONS = {
    "mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "st": "saint", "jr": "junior",
    "sr": "senior", "prof": "professor", "gen": "general", "gov": "governor", "sgt": "sergeant",
    "capt": "captain", "col": "colonel", "lt": "lieutenant", "rev": "reverend", "hon": "honorable",
    "vs": "versus", "etc": "et cetera", "approx": "approximately", "mt": "mount",
    "ft": "feet", "lb": "pounds", "lbs": "pounds", "oz": "ounces", "e.g": "for example", "i.e": "that is",
}
ABBREVIATION_RE = re.compile(
    r"\b(" + "|".join(re.escape(a) for a in sorted(ABBREVIATIONS, key=len, reverse=True)) + r")\.",
    re.IGNORECASE)
NUMBER_ABBREVIATION_RE = re.compile(r"\bno\.(?=\s*\d)", re.IGNORECASE)  # "No. 5", not "no."
CURRENCY_RE = re.compile(r"([$£€])\s?(\d[\d,]*)(?:\.(\d{1,2}))?\b")
PERCENT_RE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?%")
ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
DECIMAL_RE = re.compile(r"\b(\d+)\.(\d+)\b")
NUMBER_RE = re.compile(r"\b\d[\d,]*\b")
CURRENCY_NAMES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
                  "€": ("euro", "euros", "cent", "cents")}


def number_to_words(n: int) -> str:
    """Cardinal number in words: 1234 -> 'one thousand two hundred thirty four'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in SCALES:
        if n >= scale:
            rest = n % scale
            return number_to_words(n // scale) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """'twenty first', 'one hundredth'."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in ORDINAL_WORDS:
        words[-1] = ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_to_words(n: int) -> str:
    """Years the way they are said: 1984 -> 'nineteen eighty four', 1900 -> 'nineteen hundred'."""
    if 2000 <= n <= 2009:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return number_to_words(high) + " hundred"
    return number_to_words(high) + (" oh " + ONES[low] if low < 10 else " " + number_to_words(low))


def _integer(text: str) -> int:
    return int(text.replace(",", ""))


def _currency(match: re.Match) -> str:
    one, many, cent, cents = CURRENCY_NAMES[match.group(1)]
    whole = _integer(match.group(2))
    words = f"{number_to_words(whole)} {one if whole == 1 else many}"
    if match.group(3):
        fraction = int(match.group(3).ljust(2, "0"))
        if fraction:
            words += f" and {number_to_words(fraction)} {cent if fraction == 1 else cents}"
    return words


def _decimal(match: re.Match) -> str:
    return number_to_words(int(match.group(1))) + " point " + " ".join(ONES[int(d)] for d in match.group(2))


def _cardinal_or_year(match: re.Match) -> str:
    text = match.group(0)
    value = _integer(text)
    # A bare four-digit number without a thousands comma is most often a year in prose.
    if "," not in text and len(text) == 4 and 1000 <= value <= 2099:
        return year_to_words(value)
    return number_to_words(value)


def expand_abbreviations(text: str) -> str:
    """'Mr.' -> 'mister', 'No. 5' -> 'number 5': their periods would otherwise end sentences."""
    text = NUMBER_ABBREVIATION_RE.sub("number", text)
    return ABBREVIATION_RE.sub(lambda m: ABBREVIATIONS[m.group(1).lower()], text)


def normalize_text(text: str) -> str:
    """Text ready for TTS: unicode folded to ASCII, abbreviations, currency, percentages, ordinals,
    decimals, years and cardinals spelled out, whitespace collapsed; punctuation kept."""
    text = unicodedata.normalize("NFKD", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("\u2014", ", ").replace("\u2013", " to ").replace("&", " and ")
    text = "".join(ch for ch in text if ch.isascii())
    text = expand_abbreviations(text)
    text = CURRENCY_RE.sub(_currency, text)
    text = PERCENT_RE.sub(lambda m: _number_phrase(m.group(1)) + " percent", text)
    text = ORDINAL_RE.sub(lambda m: ordinal_to_words(int(m.group(1))), text)
    text = DECIMAL_RE.sub(_decimal, text)
    text = NUMBER_RE.sub(_cardinal_or_year, text)
    return re.sub(r"\s+", " ", text).strip()


def _number_phrase(text: str) -> str:
    if "." in text:
        return DECIMAL_RE.sub(_decimal, text.replace(",", ""))
    return number_to_words(_integer(text))


def normalize_for_wer(text: str) -> str:
    """normalize_text, lowercased, punctuation removed (apostrophes inside words kept), spaces collapsed."""
    text = normalize_text(text).lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    return re.sub(r"\s+", " ", text).strip()


SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z\"'(])")
ALLOWED_RE = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"()-]+$")


def split_sentences(paragraph: str) -> list[str]:
    """Split prose into sentences at . ! ? followed by a capital (abbreviations are expanded first)."""
    paragraph = expand_abbreviations(re.sub(r"\s+", " ", paragraph).strip())
    return [s.strip() for s in SENTENCE_END_RE.split(paragraph) if s.strip()]


def clean_sentence(sentence: str, min_words: int = 4, max_words: int = 24) -> str | None:
    """A normalized sentence a TTS engine reads, or None when it is too short/long or holds odd symbols."""
    sentence = normalize_text(sentence)
    sentence = sentence.strip(" -:;,\"'()")
    if not sentence or not ALLOWED_RE.match(sentence) or not re.search(r"[a-z]", sentence):
        return None
    if sentence.count('"') % 2 or sentence.count("(") != sentence.count(")"):
        return None
    if sentence.isupper():  # shouting headlines and acronyms read badly
        return None
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return None
    if sentence[-1] not in ".!?":
        sentence += "."
    return sentence[0].upper() + sentence[1:]
