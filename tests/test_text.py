"""Text normalization for TTS input and WER scoring, and sentence cleaning."""

from __future__ import annotations

import pytest

from voxlm.data.text import (
    clean_sentence,
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
    assert year_to_words(1805) == "eighteen oh five"


@pytest.mark.parametrize(("text", "expected"), [
    ("Mr. Smith paid $5.", "mister Smith paid five dollars."),
    ("It costs $3.50 now.", "It costs three dollars and fifty cents now."),
    ("Prices rose 12.5% in 1984.", "Prices rose twelve point five percent in nineteen eighty four."),
    ("On the 3rd of May, Dr. Jones won 2,500 votes.",
     "On the third of May, doctor Jones won two thousand five hundred votes."),
    ("Room No. 5, but no.", "Room number five, but no."),
    ("Rock \u2019n\u2019 roll \u2014 caf\u00e9 & bar", "Rock 'n' roll , cafe and bar"),
])
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_wer_normalizer_makes_conventions_equal() -> None:
    assert normalize_for_wer("Mr. Smith paid $5!") == normalize_for_wer("mister smith paid five dollars")
    assert normalize_for_wer("Don't STOP -- well-known, \"quoted\".") == "don't stop well known quoted"


def test_split_sentences_keeps_abbreviations_inside() -> None:
    assert split_sentences("I met Mr. Smith. He was late! Was he? Yes.") == [
        "I met mister Smith.", "He was late!", "Was he?", "Yes."]


def test_clean_sentence_filters() -> None:
    assert clean_sentence("And God said, Let there be light: and there was light") == \
        "And God said, Let there be light: and there was light."
    assert clean_sentence("Too short.") is None
    assert clean_sentence(" ".join(["word"] * 30) + ".") is None
    assert clean_sentence("Email me at a@b.com for the URL today.") is None  # symbols a TTS reads badly
    assert clean_sentence("ALL CAPS HEADLINES READ BADLY ALWAYS.") is None
    assert clean_sentence('An "unbalanced quote is dropped here.') is None
