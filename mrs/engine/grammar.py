"""Constrained decoding with llguidance: a request's grammar compiled at submit, one
matcher per sequence, each sampled token consumed on the host and the next token
bitmask filled for the device step.

The tokenizer adapter (``LLTokenizer``) is built once per model, on its first
constrained request (``GrammarEngine``); compiling and checking a request's grammar
takes about 1 ms for a typical JSON schema, so ``submit`` does it and a bad grammar is
an ``InvalidRequest`` naming its field before anything is queued.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from mrs.engine.sampling import mask_words
from mrs.engine.types import Grammar
from mrs.errors import InvalidRequest

log = logging.getLogger(__name__)

# Compact JSON with one space after ',' and ':' (how models write JSON), and no other
# whitespace: with llguidance's default flexible whitespace a small model can emit
# newlines until max_tokens instead of closing the object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(grammar: Grammar) -> str:
    """The llguidance grammar for ``grammar`` (not yet checked against a tokenizer)."""
    try:
        if grammar.kind == "json_schema":
            value = grammar.value if isinstance(grammar.value, str) else json.dumps(grammar.value)
            return llguidance.LLMatcher.grammar_from_json_schema(value, overrides={**JSON_OPTIONS, "lenient": grammar.lenient})
        if grammar.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(_text(grammar))
        if grammar.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(_text(grammar))
    except (ValueError, TypeError) as err:
        raise InvalidRequest(f"{grammar.param}: {err}", param=grammar.param) from None
    raise InvalidRequest(f"{grammar.param}: unknown grammar type {grammar.kind!r}", param=grammar.param)


def _text(grammar: Grammar) -> str:
    if not isinstance(grammar.value, str):
        raise InvalidRequest(f"{grammar.param}: a {grammar.kind} grammar must be a string", param=grammar.param)
    return grammar.value


class Constraint:
    """One sequence's grammar state and its next token bitmask (``mask``, one row of int32
    words in llguidance's layout), kept current as tokens are consumed.

    A grammar that leaves no token allowed (one that matches nothing, or a dead end) is
    the request's error, an ``InvalidRequest`` naming its field: at submit for the first
    token, else when the token that led there is consumed.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, param: str) -> None:
        self._matcher, self._param = matcher, param
        self.mask = np.empty((1, mask_words(vocab_size)), np.int32)
        self._fill()

    def _fill(self) -> None:
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self.mask, 0)
        if self._matcher.is_error() or not self.mask.any():  # (llguidance then allows only EOS)
            raise InvalidRequest(f"{self._param}: the grammar allows no token here ({self._matcher.get_error() or 'a dead end'})",
                                 param=self._param)

    def advance(self, token: int) -> bool:
        """Consume ``token`` and compute the next mask; whether the grammar is complete
        (it admits no further token: the sequence ends)."""
        if not self._matcher.consume_token(token):  # the mask allowed it: never expected
            raise InvalidRequest(f"{self._param}: the grammar refused token {token}: {self._matcher.get_error()}",
                                 param=self._param)
        if self._matcher.is_stopped():
            return True
        self._fill()
        return False


class GrammarEngine:
    """Per model: the llguidance tokenizer adapter, and constraints compiled against it.

    The adapter is built on the first constrained request, not at load: building it holds
    the GIL (0.8 s for SmolLM2's 49k vocabulary, 5.7 s for Gemma 3's 262k) and would stall
    the HTTP event loop, ``/health`` included, during every model load.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf_tokenizer, self._vocab_size, self._eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self._build_lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._unavailable: str | None = None

    def _adapter(self, param: str) -> llguidance.LLTokenizer:
        with self._build_lock:
            if self._tokenizer is None and self._unavailable is None:
                try:
                    # n_vocab is the model's (its head may be wider than the tokenizer): extra ids stay masked.
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size,
                                                                   eos_token=self._eos_token_ids)
                except Exception as err:  # e.g. a slow (python) tokenizer: serve, but refuse grammars
                    log.warning("constrained decoding is unavailable for this model: %s", err)
                    self._unavailable = f"{type(err).__name__}: {err}"
        if self._tokenizer is None:
            raise InvalidRequest(f"{param}: this model's tokenizer does not support constrained decoding "
                                 f"({self._unavailable})", param=param)
        return self._tokenizer

    def constraints(self, grammar: Grammar, n: int) -> list[Constraint]:
        """``n`` fresh constraints for ``grammar`` (one per choice); ``InvalidRequest`` if it does not compile."""
        tokenizer = self._adapter(grammar.param)
        text = grammar_text(grammar)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if failed:
            raise InvalidRequest(f"{grammar.param}: the grammar does not compile: {messages[0].strip()}",
                                 param=grammar.param)
        matchers = [llguidance.LLMatcher(tokenizer, text, log_level=0) for _ in range(n)]
        for matcher in matchers:
            if matcher.is_error():
                raise InvalidRequest(f"{grammar.param}: {matcher.get_error()}", param=grammar.param)
        return [Constraint(m, self._vocab_size, grammar.param) for m in matchers]
