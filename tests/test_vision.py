"""Gemma 3 vision (VisionPlain) against HF transformers on a tiny random-weight checkpoint:
image features, prefill logits, greedy tokens through the engine (an image split across
chunk boundaries included), text-only chats, and the Python API's image parts."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Gemma3ForConditionalGeneration
from vision_checkpoints import IMAGE_TOKEN_ID, MM_TOKENS_PER_IMAGE, tiny_gemma3_vision, tiny_image

import mrs
from mrs.config.schema import VISION_PLAIN, EngineConfig, ModelEntry, ModelSource
from mrs.engine.image_plan import chunk_injection, chunk_plan, image_spans
from mrs.loading.load import load_checkpoint
from mrs.models.kv_cache import init_cache
from mrs.models.registry import build_encoder, build_model
from mrs.quant.memory import param_bytes

# A sliding window shorter than an image's run of tokens would be: HF ANDs the window into
# the bidirectional image mask on sliding layers, and so must we.
WINDOW = 3
STEPS = 8
CHUNK = 11


def _entry(path: Path) -> ModelEntry:
    return ModelEntry(model_id="tiny-vlm", model=ModelSource(kind=VISION_PLAIN, model_id=str(path)))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gemma3_vision(tmp_path_factory.mktemp("gemma3-vision"), sliding_window=WINDOW)


@pytest.fixture(scope="module")
def reference(checkpoint_dir: Path):
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def pipe(checkpoint_dir: Path):
    # Chunks of 11 tokens: the images (positions 9-12 and 19-22 in these prompts) straddle
    # the boundaries at 11 and 20, so each moves a chunk boundary (test_chunks_move_for_images).
    with mrs.load(_entry(checkpoint_dir), EngineConfig(max_batch=2, max_seq_len=128, prefill_buckets=[CHUNK])) as p:
        yield p


def _messages(*images, text: str = "Describe the picture") -> list[dict]:
    parts = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _hf_inputs(processor, messages: list[dict], images: list) -> dict:
    template = [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
                for m in messages]
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=images or None, add_special_tokens=False, return_tensors="pt")


def _hf_greedy(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_both_tensor_layouts_load(tmp_path: Path, checkpoint_dir: Path) -> None:
    hub = load_checkpoint(_entry(checkpoint_dir))
    saved = load_checkpoint(_entry(tiny_gemma3_vision(tmp_path / "saved", layout="save_pretrained",
                                                      sliding_window=WINDOW)))
    jax.tree.map(np.testing.assert_array_equal, hub.vision.params, saved.vision.params)
    assert hub.vision.spec.tokens_per_image == MM_TOKENS_PER_IMAGE
    assert hub.vision.spec.image_token_id == IMAGE_TOKEN_ID


def test_features_and_prefill_logits_match_hf(checkpoint_dir: Path, reference) -> None:
    model, processor = reference
    checkpoint = load_checkpoint(_entry(checkpoint_dir))
    spec, config = checkpoint.vision.spec, checkpoint.config
    images = [tiny_image(1), tiny_image(2, size=(64, 20))]
    inputs = _hf_inputs(processor, _messages(*images), images)
    with torch.no_grad():
        want_features = model.get_image_features(inputs["pixel_values"]).pooler_output.numpy()
        want_logits = model(**inputs).logits[0].numpy()
    features = np.asarray(build_encoder(spec).apply({"params": checkpoint.vision.params},
                                                    inputs["pixel_values"].numpy()))
    np.testing.assert_allclose(features, want_features, atol=2e-5, rtol=1e-4)

    ids = inputs["input_ids"][0].tolist()
    spans = image_spans(ids, spec)
    assert len(spans) == 2
    injected = chunk_injection(features, spans, 0, len(ids), len(ids), spec.bidirectional)
    logits, _ = build_model(config).apply(
        {"params": checkpoint.params}, np.asarray([ids], np.int32), np.arange(len(ids), dtype=np.int32)[None],
        init_cache(config, 1, 64), injected=injected)
    np.testing.assert_allclose(np.asarray(logits[0]), want_logits, atol=1e-4, rtol=1e-4)
    # The image mask matters: without its spans the image tokens' logits move.
    causal, _ = build_model(config).apply(
        {"params": checkpoint.params}, np.asarray([ids], np.int32), np.arange(len(ids), dtype=np.int32)[None],
        init_cache(config, 1, 64), injected=injected._replace(span_end=injected.span_start))
    assert np.abs(np.asarray(causal[0]) - want_logits).max() > 1e-3


@pytest.mark.parametrize("text", ["Describe the picture", "What is in this image? Answer in detail, please."])
def test_greedy_chat_with_an_image_matches_hf(pipe, reference, text: str) -> None:
    model, processor = reference
    image = tiny_image(3)
    messages = _messages(image, text=text)
    inputs = _hf_inputs(processor, messages, [image])
    result = pipe.chat(messages, max_tokens=STEPS, ignore_eos=True)
    assert result.prompt_ids == inputs["input_ids"][0].tolist()
    assert result.token_ids == _hf_greedy(model, inputs)
    assert result.timing.prompt_tokens == len(result.prompt_ids)  # image tokens count as prompt tokens


def test_two_images_and_text_only_chats_match_hf(pipe, reference) -> None:
    model, processor = reference
    images = [tiny_image(4), tiny_image(5)]
    messages = _messages(*images, text="Compare them")
    ids = pipe.prepare_chat(messages).ids
    naive = [(start, min(start + CHUNK, len(ids))) for start in range(0, len(ids), CHUNK)]
    assert chunk_plan(len(ids), CHUNK, image_spans(ids, pipe.checkpoint.vision.spec)) != naive  # both images moved one
    assert pipe.chat(messages, max_tokens=STEPS, ignore_eos=True).token_ids == _hf_greedy(
        model, _hf_inputs(processor, messages, images))
    text_only = [{"role": "user", "content": "Hello there"}]
    inputs = processor(text=processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False, return_tensors="pt")
    assert pipe.chat(text_only, max_tokens=STEPS, ignore_eos=True).token_ids == _hf_greedy(model, inputs)


def test_images_change_the_answer_and_errors_name_the_part(pipe, tmp_path: Path) -> None:
    def first_logprobs(image) -> list[float]:
        result = pipe.chat(_messages(image), max_tokens=1, logprobs=True, top_logprobs=5)
        return [lp for _, _, lp in result.logprobs[0].top]

    path = tmp_path / "other.png"
    tiny_image(7).save(path)
    assert first_logprobs(str(path)) == pytest.approx(first_logprobs(tiny_image(7)), abs=1e-5)  # a path, as PIL
    assert first_logprobs(str(path)) != pytest.approx(first_logprobs(tiny_image(6)), abs=1e-3)
    with pytest.raises(mrs.errors.InvalidRequest, match=r"messages\[0\].content\[0\]: cannot read"):
        pipe.chat(_messages(str(tmp_path / "missing.png")))
    with pytest.raises(mrs.errors.InvalidRequest, match="takes at most 8"):
        pipe.chat(_messages(*[tiny_image(i) for i in range(9)]))
    stats = pipe.stats()
    assert stats["slots_busy"] == 0
    assert stats["param_bytes"] == param_bytes(pipe.checkpoint.params) + param_bytes(pipe.checkpoint.vision.params)
