"""Incremental detokenization of multi-byte text and stop strings across token boundaries."""

from __future__ import annotations

import pytest

from ragtop.runtime import IncrementalDetokenizer, StopStringMatcher

SAMPLES = ["Unicode test: café, naïve, 日本語のテキスト 🚀🎉👍🏽!", "中文字符 and emoji 👍🏽🚀", "The quick brown fox."]


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_text_equals_full_decode_and_never_splits_a_character(tokenizer, text):
    prompt = tokenizer.encode("Hello world!").ids
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_byte_tokens_of_an_emoji_are_held_until_complete(tokenizer):
    ids = [tokenizer.token_to_id(ch) for ch in "ðŁļĢ"]  # byte-level tokens of 🚀 (4 bytes)
    assert None not in ids
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add([t]) for t in ids] == ["", "", "", "🚀"]


def test_flush_releases_an_incomplete_tail(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add([tokenizer.token_to_id("ðŁ")]) == ""
    assert detok.flush() == "\ufffd"


def test_stop_string_split_over_many_deltas():
    m = StopStringMatcher(["STOP", "</end>"])
    assert [m.feed(t) for t in ["Hello S", "T", "O", "P more"]] == ["Hello ", "", "", ""]
    assert m.stopped == "STOP" and m.feed("x") == "" and m.flush() == ""


def test_partial_match_that_fails_is_released():
    m = StopStringMatcher(["abc"])
    assert m.feed("xa") == "x"
    assert m.feed("b") == ""
    assert m.feed("d") == "abd"
    assert m.feed("ab") == "" and m.flush() == "ab"


def test_earliest_stop_wins_and_overlapping_prefixes():
    m = StopStringMatcher(["aab", "b"])
    assert m.feed("xaab") == "x" and m.stopped == "aab"
    m = StopStringMatcher(["aab"])
    assert m.feed("aa") == "" and m.feed("ab") == "a" and m.stopped == "aab"


def test_no_stops_passes_text_through():
    assert StopStringMatcher([]).feed("anything") == "anything"
