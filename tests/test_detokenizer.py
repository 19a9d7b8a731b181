"""Incremental detokenizer: UTF-8 safety and stop strings across token boundaries."""

from __future__ import annotations

import pytest
from tiny_llama import byte_tokenizer

from mrs.engine.detokenizer import IncrementalDetokenizer

TOK = byte_tokenizer()


def stream(text: str, stop: list[str], prompt: str = "Q: ") -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ``text`` byte-token by byte-token; return the released deltas."""
    detok = IncrementalDetokenizer(TOK, TOK.encode(prompt), stop)
    deltas = []
    for token in TOK.encode(text):
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas, detok


def test_multibyte_characters_are_never_split() -> None:
    text = "naïve 😀 日本語 ok"
    deltas, detok = stream(text, [])
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    # the emoji is 4 byte tokens: three empty deltas, then the whole character
    emoji_at = deltas.index("😀")
    assert deltas[emoji_at - 3 : emoji_at] == ["", "", ""]


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello world. END more", ["END"], "Hello world. "),
        ("abc\n\nUser: hi", ["\n\nUser:"], "abc"),
        ("emoji 😀 then", ["😀"], "emoji "),
        ("first x second y", ["y", "x"], "first "),  # the earliest stop wins
    ],
)
def test_stop_strings_across_tokens_never_appear(text: str, stop: list[str], expected: str) -> None:
    deltas, detok = stream(text, stop)
    assert detok.stopped
    assert "".join(deltas) == expected == detok.text
    assert not any(s in "".join(deltas) for s in stop)


def test_possible_stop_prefix_is_held_then_released() -> None:
    detok = IncrementalDetokenizer(TOK, [], ["STOP"])
    released = [detok.add(t) for t in TOK.encode("a STOx")]
    # "S", "ST", "STO" could start STOP: held back until "x" decides it
    assert released == ["a", " ", "", "", "", "STOx"]
    detok = IncrementalDetokenizer(TOK, [], ["STOP"])
    released = [detok.add(t) for t in TOK.encode("a ST")]
    assert "".join(released) == "a " and detok.flush() == "ST"  # generation ended: released
