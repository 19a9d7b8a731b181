"""Tokenizers built from GGUF metadata give the HF transformers tokenizer's ids, for the
gpt2-style BPE (SmolLM2) and the SentencePiece vocabulary (Gemma 3), and decode back."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mrs.loading import gguf_tokenizer
from mrs.loading.gguf_reader import open_gguf
from mrs.loading.gguf_tokenizer import tokenizer_from_gguf

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and trailing  ",
    "whitespace   runs\t\ttabs\n\n\nnewlines \r\n crlf",
    "héllo wörld ñ Ünïcödé çàñ — “quotes” ‘single’ …",
    "中文 日本語のテキスト 한국어 Ελληνικά русский العربية हिन्दी",
    "emoji 🤗🚀👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|>user\nhi<|im_end|>",
    "<bos>text<eos> <start_of_turn>user\nhey<end_of_turn>",
    "",
    " ",
    "\n",
    "a" * 100,
]


@pytest.fixture(scope="module", params=["smollm2_gguf", "gemma3_gguf"])
def built_and_cached(request, tmp_path_factory) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast, Path]:
    """The tokenizer built from the file, the same one read back from the cache, the file."""
    path: Path = request.getfixturevalue(request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_tokenizer, "CACHE_DIR", tmp_path_factory.mktemp("tokenizers"))
        built = tokenizer_from_gguf(open_gguf(path))
        assert len(list(gguf_tokenizer.CACHE_DIR.glob("*/kwargs.json"))) == 1
        patch.setattr(gguf_tokenizer, "_build", lambda g: pytest.fail("the cached tokenizer was built again"))
        return built, tokenizer_from_gguf(open_gguf(path)), path


@pytest.fixture(scope="module")
def pair(built_and_cached) -> tuple[PreTrainedTokenizerFast, object]:
    """The cached tokenizer (what a server restart uses) and HF transformers' own."""
    _, cached, path = built_and_cached
    return cached, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_the_cached_tokenizer_is_the_built_one(built_and_cached) -> None:
    built, cached, _ = built_and_cached
    assert built.added_tokens_decoder == cached.added_tokens_decoder and len(built) == len(cached)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token"):
        assert getattr(built, name) == getattr(cached, name), name
    for text in CORPUS:
        assert built(text).input_ids == cached(text).input_ids, text


def test_ids_equal_transformers(pair) -> None:
    ours, reference = pair
    assert isinstance(ours, PreTrainedTokenizerFast)
    for text in CORPUS:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours(text, add_special_tokens=False).input_ids == reference(text, add_special_tokens=False).input_ids


def test_special_tokens_equal_transformers(pair) -> None:
    ours, reference = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.bos_token_id == reference.bos_token_id and ours.eos_token_id == reference.eos_token_id
    assert len(ours) == len(reference)


def test_decode_round_trips(pair) -> None:
    ours, reference = pair
    for text in CORPUS:
        ids = ours(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids) == text, text
