"""Kosmos-2 (VisionPlain) against HF transformers on a tiny random-weight checkpoint: image
features, prefill logits (tied and untied heads), greedy tokens through the engine with an
image that moves a chunk boundary, text-only prompts, and the requests it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kosmos2_checkpoints import LATENT_QUERIES, tiny_kosmos2
from transformers import AutoProcessor, Kosmos2ForConditionalGeneration
from vision_checkpoints import tiny_image

import mrs
from mrs.config.schema import VISION_PLAIN, EngineConfig, ModelEntry, ModelSource
from mrs.engine.image_plan import chunk_injection, chunk_plan, image_spans
from mrs.errors import InvalidRequest
from mrs.loading.load import load_checkpoint
from mrs.models.kv_cache import init_cache
from mrs.models.registry import build_encoder, build_model

STEPS = 8
CHUNK = 64  # one image's 64 latent tokens exactly: the image at positions 2-65 moves the first boundary
GROUNDING = "<grounding>An image of"


def _entry(path: Path) -> ModelEntry:
    return ModelEntry(model_id="tiny-kosmos2", model=ModelSource(kind=VISION_PLAIN, model_id=str(path)))


def _messages(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_kosmos2(tmp_path_factory.mktemp("kosmos2"))


@pytest.fixture(scope="module")
def reference(checkpoint_dir: Path):
    model = Kosmos2ForConditionalGeneration.from_pretrained(checkpoint_dir, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def pipe(checkpoint_dir: Path):
    with mrs.load(_entry(checkpoint_dir), EngineConfig(max_batch=2, max_seq_len=128, prefill_buckets=[CHUNK])) as p:
        yield p


def _hf_greedy(model, inputs: dict) -> list[int]:
    # Kosmos2ForConditionalGeneration's forward insists on an image; text alone runs its text model.
    generator = model if "pixel_values" in inputs else model.text_model
    with torch.no_grad():
        out = generator.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_features_and_prefill_logits_match_hf(tmp_path: Path, tied: bool) -> None:
    path = tiny_kosmos2(tmp_path / "k2", seed=1, tied=tied)
    model = Kosmos2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    inputs = AutoProcessor.from_pretrained(path)(text=GROUNDING, images=tiny_image(1), return_tensors="pt")
    with torch.no_grad():
        want_features = model.get_image_features(inputs["pixel_values"]).pooler_output.numpy()
        want_logits = model(**inputs).logits[0].numpy()
    checkpoint = load_checkpoint(_entry(path))
    spec, config = checkpoint.vision.spec, checkpoint.config
    assert config.tie_word_embeddings is tied and ("lm_head" in checkpoint.params) is not tied
    features = np.asarray(build_encoder(spec).apply({"params": checkpoint.vision.params},
                                                    inputs["pixel_values"].numpy()))
    np.testing.assert_allclose(features, want_features, atol=2e-5, rtol=1e-4)

    ids = inputs["input_ids"][0].tolist()
    spans = image_spans(ids, spec)
    mask = inputs["image_embeds_position_mask"][0].numpy().astype(bool)
    assert spans == [(2, 2 + LATENT_QUERIES)] and mask[2:2 + LATENT_QUERIES].all() and mask.sum() == LATENT_QUERIES
    injected = chunk_injection(features, spans, 0, len(ids), len(ids), spec.bidirectional)
    logits, _ = build_model(config).apply(
        {"params": checkpoint.params}, np.asarray([ids], np.int32), np.arange(len(ids), dtype=np.int32)[None],
        init_cache(config, 1, 128), injected=injected)
    np.testing.assert_allclose(np.asarray(logits[0]), want_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("text", [GROUNDING, "<grounding>A picture of a cat and"])
def test_greedy_with_an_image_matches_hf(pipe, reference, text: str) -> None:
    model, processor = reference
    image = tiny_image(3)
    inputs = processor(text=text, images=image, return_tensors="pt")
    result = pipe.chat(_messages(text, image), max_tokens=STEPS, ignore_eos=True)
    assert result.prompt_ids == inputs["input_ids"][0].tolist()
    spans = image_spans(result.prompt_ids, pipe.checkpoint.vision.spec)
    assert chunk_plan(len(result.prompt_ids), CHUNK, spans)[:2] == [(0, 2), (2, 66)]  # the image moved a boundary
    want = _hf_greedy(model, inputs)
    assert len(set(want)) > 2  # the reference says something, not one token over and over
    assert result.token_ids == want
    assert result.timing.prompt_tokens == len(result.prompt_ids)  # the image's 64 tokens count


def test_text_only_and_plain_string_content_match_hf(pipe, reference) -> None:
    model, processor = reference
    want = _hf_greedy(model, processor(text="The capital of France is", return_tensors="pt"))
    assert pipe.chat(_messages("The capital of France is"), max_tokens=STEPS, ignore_eos=True).token_ids == want
    chat = [{"role": "user", "content": "The capital of France is"}]
    assert pipe.chat(chat, max_tokens=STEPS, ignore_eos=True).token_ids == want


def test_refused_requests_name_the_problem(pipe) -> None:
    with pytest.raises(InvalidRequest, match="at most 1"):
        pipe.chat(_messages(GROUNDING, tiny_image(1), tiny_image(2)), max_tokens=1)
    with pytest.raises(InvalidRequest, match="one user message"):
        pipe.chat([{"role": "system", "content": "Be brief"}, *_messages(GROUNDING, tiny_image(1))], max_tokens=1)
    with pytest.raises(InvalidRequest, match="image start token .* followed by fewer than the 64"):
        pipe.chat(_messages("<image> typed by hand, no picture"), max_tokens=1)
    with pytest.raises(InvalidRequest, match="1 image placeholders for 0 images"):
        pipe.chat(_messages("<image>" + " and" * 30), max_tokens=1)
    # The engine is unharmed.
    assert len(pipe.chat(_messages(GROUNDING, tiny_image(1)), max_tokens=2, ignore_eos=True).token_ids) == 2
