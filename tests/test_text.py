"""Text normalization for TTS input and WER scoring, and sentence cleaning, on tricky cases."""

from __future__ import annotations

import pytest

from voxlm.data.text import (
    clean_sentence,
    dedup_key,
    normalize_for_wer,
    normalize_text,
    number_to_words,
    ordinal_to_words,
    split_sentences,
    year_to_words,
)


@pytest.mark.parametrize(("n", "words"), [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (99, "ninety nine"), (100, "one hundred"),
    (101, "one hundred one"), (2000, "two thousand"), (1_000_001, "one million one"),
    (-7, "minus seven"), (123_456, "one hundred twenty three thousand four hundred fifty six"),
])
def test_number_to_words(n: int, words: str) -> None:
    assert number_to_words(n) == words


def test_ordinals_and_years() -> None:
    assert ordinal_to_words(1) == "first"
    assert ordinal_to_words(22) == "twenty second"
    assert ordinal_to_words(40) == "fortieth"
    assert ordinal_to_words(112) == "one hundred twelfth"
    assert year_to_words(1984) == "nineteen eighty four"
    assert year_to_words(1900) == "nineteen hundred"
    assert year_to_words(2005) == "two thousand five"
    assert year_to_words(2024) == "twenty twenty four"
    assert year_to_words(1805) == "eighteen oh five"


@pytest.mark.parametrize(("text", "expected"), [
    ("Mr. Smith paid $5.", "mister Smith paid five dollars."),
    ("It costs $3.50, $1 or $0.05 now.",
     "It costs three dollars and fifty cents, one dollar or five cents now."),
    ("They raised $1.5 million.", "They raised one point five million dollars."),
    ("Prices rose 12.5% in 1984.", "Prices rose twelve point five percent in nineteen eighty four."),
    ("On the 3rd of May, Dr. Jones won 2,500 votes.",
     "On the third of May, doctor Jones won two thousand five hundred votes."),
    ("He paid 1,234.56 for 1000 apples in 1066.",
     "He paid one thousand two hundred thirty four point five six for one thousand apples in ten sixty six."),
    ("Room No. 5, but no.", "Room number five, but no."),
    ("Meet at 3:30 p.m. Then leave at 5:00.", "Meet at three thirty p m. Then leave at five o'clock."),
    ("In the 1990s and the '80s.", "In the nineteen nineties and the eighties."),
    ("The war of 1914-1918 was the 1st.", "The war of nineteen fourteen to nineteen eighteen was the first."),
    ("Add 3/4 cup, \u00bd cup; open 24/7.", "Add three quarters cup, one half cup; open twenty four seven."),
    ("Apples, pears, etc.", "Apples, pears, et cetera."),  # the period still ends the sentence
    ("Apples etc. and pears vs. plums, e.g. figs.",
     "Apples et cetera and pears versus plums, for example figs."),
    ("St. Paul lived on Baker St. in London.", "saint Paul lived on Baker street in London."),
    ("The U.S.A. is big, said Mr Brown.", "The U S A is big, said mister Brown."),
    ("Rock \u2019n\u2019 roll \u2014 caf\u00e9 & bar -- it's 98.6\u00b0.",
     "Rock 'n' roll, cafe and bar, it's ninety eight point six degrees."),
    ("  spaced \t out\n text  ", "spaced out text"),
    ("Kludge, n.: a mess.", "Kludge, noun: a mess."),
])
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_wer_normalizer_makes_conventions_equal() -> None:
    assert normalize_for_wer("Mr. Smith paid $5!") == normalize_for_wer("mister smith paid five dollars")
    assert normalize_for_wer("In 1984, 25% of Dr. Who's fans") == \
        "in nineteen eighty four twenty five percent of doctor who's fans"
    assert normalize_for_wer("Don't STOP -- well-known, \"quoted\" 'words'.") == \
        "don't stop well known quoted words"
    assert normalize_for_wer("...") == ""


def test_split_sentences_keeps_abbreviations_inside() -> None:
    prose = "I met Mr. Smith. He was late! Was he? Yes. We sold figs, etc. Then at 5 p.m. we left."
    assert split_sentences(prose) == ["I met mister Smith.", "He was late!", "Was he?", "Yes.",
                                      "We sold figs, et cetera.", "Then at 5 p m we left."]
    assert split_sentences('"Stop!" she said. (It was late.) Then it rained.') == [
        '"Stop!" she said.', "(It was late.)", "Then it rained."]


def test_clean_sentence_filters() -> None:
    assert clean_sentence("And God said, Let there be light: and there was light") == \
        "And God said, Let there be light: and there was light."
    assert clean_sentence("he counted 3 sheep and slept") == "He counted three sheep and slept."
    assert clean_sentence("Too short.") is None
    assert clean_sentence(" ".join(["word"] * 30) + ".") is None
    assert clean_sentence("Email me at a@b.com for the URL today.") is None  # symbols a TTS reads badly
    assert clean_sentence("Call extension A4 for the phone today.") is None  # a digit no rule reads
    assert clean_sentence("ALL CAPS HEADLINES READ BADLY ALWAYS.") is None
    assert clean_sentence('An "unbalanced quote is dropped here.') is None
    assert clean_sentence("And then it trailed off into...") is None


def test_dedup_key_ignores_case_and_punctuation() -> None:
    assert dedup_key("Love is blind!") == dedup_key("love is blind.")
    assert dedup_key("Love is blind.") != dedup_key("Love is kind.")
