"""Incremental, UTF-8 safe detokenization with stop strings.

Each new token is decoded together with a few tokens before it (so tokenizers that
drop a leading space at the start of a sequence, like SentencePiece, still give the
right text), and nothing is released while the text ends in an incomplete character
(U+FFFD). Released text is further held back while its tail could be the start of a
stop string; a stop string itself never appears in the output.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # tokens decoded before the new ones, for spacing context
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # _ids[_prefix:_read] is the context already turned into text
        self._read = len(self._ids)
        self._stop = [s for s in stop if s]
        self.text = ""  # decided output text so far (never contains a stop string)
        self._pending = ""  # decoded but held back (could begin a stop string)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly released text (maybe empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or half a character: wait for more bytes
        self._prefix, self._read = max(self._read - _CONTEXT_TOKENS, 0), len(self._ids)
        return self._release(after[len(before) :])

    def _release(self, new: str) -> str:
        text = self._pending + new
        hits = [at for stop in self._stop if (at := text.find(stop)) >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        if self.stopped:
            self._pending = ""
            self.text += text
            return text
        hold = self._held_suffix(text)
        out, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        self.text += out
        return out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def flush(self) -> str:
        """At the end of generation, release what was held back (and any trailing bytes)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        out = self._release(after[len(before) :])
        if not self.stopped:
            self.text += self._pending
            out, self._pending = out + self._pending, ""
        return out
