"""Where a prompt's images go (plain Python and numpy, no JAX): each image's placeholder
span, prefill chunks that never split an image, and one chunk's ``Injected`` arrays.

An image's features must enter the cache in one prefill chunk: with bidirectional
attention (Gemma 3) its first token attends to its last, and a chunk only sees the keys
written so far. So a chunk that would end inside an image ends before it instead (the
engine keeps its chunk size at least ``tokens_per_image``).
"""

from __future__ import annotations

import numpy as np

from mrs.errors import InvalidRequest
from mrs.models.layers import Injected
from mrs.models.vision import VisionSpec

Span = tuple[int, int]  # [start, end) positions of one image's placeholder tokens


def image_spans(prompt_ids: list[int], spec: VisionSpec) -> list[Span]:
    """Each image's span, in prompt order: a run of placeholder ids (adjacent images split by
    count), or the ``tokens_per_image`` positions after each ``spec.image_start_id``."""
    if spec.image_start_id is not None:
        return _spans_after_start(prompt_ids, spec)
    spans: list[Span] = []
    i, n = 0, len(prompt_ids)
    while i < n:
        if prompt_ids[i] != spec.image_token_id:
            i += 1
            continue
        end = i
        while end < n and prompt_ids[end] == spec.image_token_id:
            end += 1
        if (end - i) % spec.tokens_per_image:
            raise InvalidRequest(
                f"prompt: a run of {end - i} image placeholder tokens (id {spec.image_token_id}) is not a "
                f"multiple of the {spec.tokens_per_image} tokens one image takes", param="prompt")
        spans += [(s, s + spec.tokens_per_image) for s in range(i, end, spec.tokens_per_image)]
        i = end
    return spans


def _spans_after_start(prompt_ids: list[int], spec: VisionSpec) -> list[Span]:
    starts = [i + 1 for i, token in enumerate(prompt_ids) if token == spec.image_start_id]
    if starts and starts[-1] + spec.tokens_per_image > len(prompt_ids):
        raise InvalidRequest(f"prompt: an image start token (id {spec.image_start_id}) is followed by fewer than the "
                             f"{spec.tokens_per_image} positions one image takes", param="prompt")
    return [(s, s + spec.tokens_per_image) for s in starts]


def check_images(prompt_ids: list[int], pixel_values: np.ndarray | None, spec: VisionSpec | None,
                 model: str) -> list[Span]:
    """The prompt's image spans after checking they match the images given; errors name the field."""
    if spec is None:
        if pixel_values is not None:
            raise InvalidRequest(f"messages: model {model!r} does not take images (it is a text-only model)",
                                 param="messages")
        return []
    spans = image_spans(prompt_ids, spec)
    given = 0 if pixel_values is None else len(pixel_values)
    check_image_count(given, spec, model)
    if len(spans) != given:
        raise InvalidRequest(f"prompt: {len(spans)} image placeholders for {given} images", param="prompt")
    if given:
        want = (spec.channels, spec.image_size, spec.image_size)
        if tuple(pixel_values.shape[1:]) != want:
            raise InvalidRequest(f"pixel_values: images must be {want} after preprocessing; got "
                                 f"{tuple(pixel_values.shape[1:])}", param="pixel_values")
    return spans


def check_image_count(given: int, spec: VisionSpec, model: str) -> None:
    if given > spec.max_images:
        raise InvalidRequest(f"messages: {given} images in one request; model {model!r} takes at most "
                             f"{spec.max_images}", param="messages")


def chunk_plan(length: int, chunk_size: int, spans: list[Span], start: int = 0) -> list[Span]:
    """Prefill chunks ``[start, stop)`` of at most ``chunk_size`` tokens from ``start`` (the
    first token not in the KV cache yet), none splitting an image."""
    chunks = []
    while start < length:
        stop = min(start + chunk_size, length)
        for s, e in spans:
            if start < s < stop < e:  # the image would straddle the boundary: it starts the next chunk
                stop = s
        chunks.append((start, stop))
        start = stop
    return chunks


def chunk_injection(features: np.ndarray, spans: list[Span], start: int, stop: int, length: int,
                    bidirectional: bool) -> Injected | None:
    """The ``Injected`` arrays (batch of one) of chunk ``[start, stop)`` padded to ``length``:
    ``features [images, tokens_per_image, hidden]`` at their spans; None if no image falls in it."""
    inside = [(i, s, e) for i, (s, e) in enumerate(spans) if s < stop and e > start]
    if not inside:
        return None
    embeds = np.zeros((1, length, features.shape[-1]), features.dtype)
    mask = np.zeros((1, length), bool)
    span_start = np.zeros((1, length), np.int32)
    span_end = np.zeros((1, length), np.int32)
    for i, s, e in inside:
        lo, hi = max(s, start), min(e, stop)
        embeds[0, lo - start:hi - start] = features[i, lo - s:hi - s]
        mask[0, lo - start:hi - start] = True
        if bidirectional:
            span_start[0, lo - start:hi - start], span_end[0, lo - start:hi - start] = s, e
    return Injected(embeds, mask, span_start, span_end)
