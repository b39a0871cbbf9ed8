"""English text normalization and sentence cleaning.

`normalize_text` makes text a TTS engine reads the way a listener hears it (numbers, years, currency, times,
ordinals and abbreviations spelled out); `normalize_for_wer` additionally lowercases and strips punctuation,
and is applied to BOTH the reference and the ASR hypothesis before scoring, so "Mr. Smith paid $5" and
"mister smith paid five dollars" count as the same words. `split_sentences` and `clean_sentence` turn prose
into the short, readable sentences the corpus is synthesized from.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                 "nine": "ninth", "twelve": "twelfth"}

# Titles come before a name ("Dr. Jones"): their period never ends a sentence.
TITLES = {"mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "prof": "professor", "gen": "general",
          "gov": "governor", "sgt": "sergeant", "capt": "captain", "col": "colonel", "lt": "lieutenant",
          "rev": "reverend", "hon": "honorable", "mt": "mount", "st": "saint"}
# Other abbreviations may stand last in a sentence ("apples, pears, etc."), so their period can be kept.
ABBREVIATIONS = {"jr": "junior", "sr": "senior", "vs": "versus", "etc": "et cetera",
                 "approx": "approximately", "ft": "feet", "lb": "pounds", "lbs": "pounds", "oz": "ounces",
                 "e.g": "for example", "i.e": "that is", "jan": "January", "feb": "February",
                 "apr": "April", "aug": "August", "sep": "September", "sept": "September", "oct": "October",
                 "nov": "November", "dec": "December", "dept": "department", "inc": "incorporated",
                 "corp": "corporation"}


def _alternation(words: dict[str, str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


TITLE_RE = re.compile(rf"\b({_alternation(TITLES)})\.", re.IGNORECASE)
# "Mr Smith" (British style, and how ASR sometimes writes it) reads the same as "Mr. Smith".
BARE_TITLE_RE = re.compile(r"\b(Mr|Mrs|Ms|Dr)\b(?=\s+[A-Z])")
ABBREVIATION_RE = re.compile(rf"\b({_alternation(ABBREVIATIONS)})\.", re.IGNORECASE)
INITIALISM_RE = re.compile(r"\b(?:[A-Za-z]\.){2,}")  # U.S.A., a.m., p.m.: read letter by letter
# Dictionary-style entries ("Kludge, n.: an ill-assorted collection...") name the part of speech.
PART_OF_SPEECH_RE = re.compile(r"\b(n|v|adj|adv)\.(?=\s*:)")
PARTS_OF_SPEECH = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}
NUMBER_SIGN_RE = re.compile(r"\bno\.(?=\s*\d)|#(?=\d)", re.IGNORECASE)  # "No. 5", "#5"; not a plain "no."
SENTENCE_ENDS_RE = re.compile(r"\s*(?:$|[\"')\]]*\s+[A-Z])")

SCALE_WORDS = "thousand|million|billion|trillion"
CURRENCY_RE = re.compile(rf"([$£€])\s?(\d[\d,]*)(?:\.(\d+))?(?:\s+({SCALE_WORDS})\b)?")
CURRENCY_NAMES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
                  "€": ("euro", "euros", "cent", "cents")}
PERCENT_RE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?(?:%|percent\b)")
TIME_RE = re.compile(r"\b(\d{1,2}):(\d{2})\b")
ORDINAL_RE = re.compile(r"\b(\d[\d,]*)(st|nd|rd|th)\b", re.IGNORECASE)
DECADE_RE = re.compile(r"(?<![\d'])'?(\d{2})?(\d0)'?s\b")  # 1990s, '80s, 60s
FRACTION_RE = re.compile(r"\b(\d+)/(\d+)\b")
RANGE_RE = re.compile(r"(?<=\d)\s?-\s?(?=\d)")  # 1914-1918, pages 10 - 20
NEGATIVE_RE = re.compile(r"(?<![\w-])-(?=\d)")
DECIMAL_RE = re.compile(r"(?<![\d.])(\d[\d,]*)?\.(\d+)\b")
NUMBER_RE = re.compile(r"\b\d[\d,]*\b")
VULGAR_FRACTIONS = {"\u00bd": " 1/2", "\u00bc": " 1/4", "\u00be": " 3/4", "\u2153": " 1/3", "\u2154": " 2/3"}
SYMBOLS = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": ", ",
           "&": " and ", "\u00b0": " degrees", "+": " plus ", "=": " equals "}


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
            head, rest = divmod(n, scale)
            return f"{number_to_words(head)} {name}" + ("" if rest == 0 else " " + number_to_words(rest))
    # Past a thousand trillion, nobody says the number: read its digits.
    return " ".join(ONES[int(d)] for d in str(n))


def ordinal_to_words(n: int) -> str:
    """'twenty first', 'one hundredth'."""
    words = number_to_words(n).split()
    words[-1] = _ordinal_word(words[-1])
    return " ".join(words)


def _ordinal_word(word: str) -> str:
    if word in ORDINAL_WORDS:
        return ORDINAL_WORDS[word]
    return word[:-1] + "ieth" if word.endswith("y") else word + "th"


def year_to_words(n: int) -> str:
    """Years the way they are said: 1984 -> 'nineteen eighty four', 1900 -> 'nineteen hundred',
    2005 -> 'two thousand five', 1805 -> 'eighteen oh five'."""
    if 2000 <= n <= 2009 or n % 1000 == 0 or not 1000 <= n <= 9999:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return number_to_words(high) + " hundred"
    return number_to_words(high) + (" oh " + ONES[low] if low < 10 else " " + number_to_words(low))


def _integer(text: str) -> int:
    return int(text.replace(",", ""))


def _decimal_words(whole: str | None, fraction: str) -> str:
    """'3', '14' -> 'three point one four'; a missing whole part ('.5') is read 'point five'."""
    digits = " ".join(ONES[int(d)] for d in fraction)
    return (number_to_words(_integer(whole)) + " " if whole else "") + "point " + digits


def _number_words(text: str) -> str:
    """'2,500' or '12.5' in words."""
    whole, _, fraction = text.partition(".")
    return _decimal_words(whole, fraction) if fraction else number_to_words(_integer(whole))


def _currency(match: re.Match) -> str:
    one, many, cent, cents = CURRENCY_NAMES[match.group(1)]
    whole, fraction, scale = _integer(match.group(2)), match.group(3), match.group(4)
    if scale:  # "$1.5 million": the unit goes after the scale word
        return f"{_number_words(match.group(2) + ('.' + fraction if fraction else ''))} {scale} {many}"
    if fraction and len(fraction) != 2:  # "$2.5": a decimal amount, not dollars and cents
        return f"{_decimal_words(match.group(2), fraction)} {many}"
    parts = [f"{number_to_words(whole)} {one if whole == 1 else many}"] if whole or not fraction else []
    if fraction and int(fraction):
        parts.append(f"{number_to_words(int(fraction))} {cent if int(fraction) == 1 else cents}")
    return " and ".join(parts) or f"zero {many}"


def _time(match: re.Match) -> str:
    hours, minutes = int(match.group(1)), int(match.group(2))
    if hours > 24 or minutes > 59:  # a ratio or a Bible reference, not a clock time
        return f"{number_to_words(hours)} {number_to_words(minutes)}"
    if minutes == 0:
        return f"{number_to_words(hours)} o'clock"
    past = f"oh {ONES[minutes]}" if minutes < 10 else number_to_words(minutes)
    return f"{number_to_words(hours)} {past}"


def _decade(match: re.Match) -> str:
    century, decade = match.group(1), match.group(2)
    words = (year_to_words(int(century + decade)) if century else number_to_words(int(decade))).split()
    last = words[-1]
    words[-1] = last[:-1] + "ies" if last.endswith("y") else last + ("es" if last.endswith("x") else "s")
    return " ".join(words)


def _fraction(match: re.Match) -> str:
    numerator, denominator = int(match.group(1)), int(match.group(2))
    if numerator >= denominator or denominator > 100:  # "24/7", "9/11" are read as two numbers
        return f"{number_to_words(numerator)} {number_to_words(denominator)}"
    name = {2: "half", 4: "quarter"}.get(denominator) or ordinal_to_words(denominator)
    if numerator != 1:
        name = name[:-1] + "ves" if name.endswith("f") else name + "s"
    return f"{number_to_words(numerator)} {name}"


def _cardinal_or_year(match: re.Match) -> str:
    text = match.group(0)
    value = _integer(text)
    # A bare four-digit number without a thousands comma is most often a year in prose.
    if "," not in text and len(text) == 4 and 1000 <= value <= 2099:
        return year_to_words(value)
    return number_to_words(value)


def _expander(word_of: Callable[[re.Match], str], may_end_sentence: bool) -> Callable[[re.Match], str]:
    def expand(match: re.Match) -> str:
        # The abbreviation's period doubles as a sentence end when nothing follows or a new sentence starts.
        end = may_end_sentence and SENTENCE_ENDS_RE.match(match.string, match.end()) is not None
        return word_of(match) + ("." if end else "")
    return expand


def _saint_or_street(match: re.Match) -> str:
    # "St. Paul" is a saint; "Baker St." (after a capitalized word, before no name) is a street.
    before = match.string[: match.start()].split()
    after = match.string[match.end():].lstrip()
    if before and before[-1][:1].isupper() and not after[:1].isupper():
        return _expander(lambda _: "street", may_end_sentence=True)(match)
    return "saint"


def expand_abbreviations(text: str) -> str:
    """'Mr.' -> 'mister', 'No. 5' -> 'number 5', 'U.S.' -> 'U S': their periods would otherwise end
    sentences. A period that also ends the sentence ('... etc.') is kept."""
    text = NUMBER_SIGN_RE.sub("number ", text)
    text = PART_OF_SPEECH_RE.sub(lambda m: PARTS_OF_SPEECH[m.group(1)], text)
    text = re.sub(r"\bSt\.", _saint_or_street, text)
    text = TITLE_RE.sub(_expander(lambda m: TITLES[m.group(1).lower()], may_end_sentence=False), text)
    text = BARE_TITLE_RE.sub(lambda m: TITLES[m.group(1).lower()], text)
    text = ABBREVIATION_RE.sub(
        _expander(lambda m: ABBREVIATIONS[m.group(1).lower()], may_end_sentence=True), text)
    return INITIALISM_RE.sub(
        _expander(lambda m: " ".join(m.group(0).replace(".", "")), may_end_sentence=True), text)


def expand_numbers(text: str) -> str:
    """Currency, percentages, times, ordinals, decades, fractions, ranges, decimals, years and cardinals
    in words, most specific pattern first."""
    text = CURRENCY_RE.sub(_currency, text)
    text = PERCENT_RE.sub(lambda m: _number_words(m.group(1).replace(",", "")) + " percent", text)
    text = TIME_RE.sub(_time, text)
    text = ORDINAL_RE.sub(lambda m: ordinal_to_words(_integer(m.group(1))), text)
    text = DECADE_RE.sub(_decade, text)
    text = FRACTION_RE.sub(_fraction, text)
    text = RANGE_RE.sub(" to ", text)
    text = NEGATIVE_RE.sub("minus ", text)
    text = DECIMAL_RE.sub(lambda m: _decimal_words(m.group(1), m.group(2)), text)
    return NUMBER_RE.sub(_cardinal_or_year, text)


def to_ascii(text: str) -> str:
    """Typographic quotes, dashes and symbols as the ASCII a TTS front end knows; accents dropped."""
    for symbol, plain in VULGAR_FRACTIONS.items():
        text = text.replace(symbol, plain)
    text = re.sub(r"(?<=\d)\s?\u2013\s?(?=\d)", "-", text)  # an en dash between numbers is a range
    text = text.replace("\u2013", ", ").replace("--", ", ")
    for symbol, plain in SYMBOLS.items():
        text = text.replace(symbol, plain)
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if ch.isascii())


def normalize_text(text: str) -> str:
    """Text ready for TTS: ASCII, abbreviations and numbers in words, spaces collapsed; punctuation kept."""
    text = expand_numbers(expand_abbreviations(to_ascii(text)))
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # "word , word" left by a replaced dash
    text = re.sub(r",(?:\s*,)+", ",", text)
    return re.sub(r"^[\s,]+|[\s,]+$", "", text)


def normalize_for_wer(text: str) -> str:
    """normalize_text, lowercased, punctuation removed (apostrophes inside words kept), spaces collapsed."""
    text = normalize_text(text).lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    return re.sub(r"\s+", " ", text).strip()


# A sentence ends at . ! ? (perhaps inside a closing quote or bracket) before a capital or an opening quote.
SENTENCE_END_RE = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z\"'(])")
# What every engine reads: letters, spaces and plain punctuation. A digit left over is a number the
# normalizer could not read (a phone number, "A4"), so such a sentence is dropped.
READABLE_RE = re.compile(r"^[A-Za-z ,.;:!?'\"()-]+$")


def split_sentences(paragraph: str) -> list[str]:
    """Split prose into sentences at . ! ? followed by a capital (abbreviations are expanded first)."""
    paragraph = expand_abbreviations(re.sub(r"\s+", " ", to_ascii(paragraph)).strip())
    return [s.strip() for s in SENTENCE_END_RE.split(paragraph) if s.strip()]


def clean_sentence(sentence: str, min_words: int = 4, max_words: int = 24) -> str | None:
    """A normalized sentence a TTS engine reads, or None when it is too short/long or holds odd symbols."""
    sentence = normalize_text(sentence).strip(" -:;,\"'()")
    if not sentence or not READABLE_RE.match(sentence) or not re.search(r"[a-z]", sentence):
        return None
    if sentence.count('"') % 2 or sentence.count("(") != sentence.count(")") or "..." in sentence:
        return None  # broken quotes and trailing-off fragments read badly
    if sentence.isupper():  # shouting headlines and acronyms read badly
        return None
    if not min_words <= len(sentence.split()) <= max_words:
        return None
    if sentence[-1] not in ".!?":
        sentence += "."
    return sentence[0].upper() + sentence[1:]


def dedup_key(sentence: str) -> str:
    """Sentences that differ only in case and punctuation are the same sentence to a listener."""
    return normalize_for_wer(sentence)
