"""The seed's Example 2 layout (a text model and Kosmos-2 as VisionPlain in one multi-model
JSON, here with Gemma 3 vision beside them) through a real ``mrs-server`` and the official
``openai`` client, with local checkpoints: image chats equal HF's greedy tokens, every image
source works, bad images get a 400 envelope naming the problem, and nothing else is disturbed."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading
from pathlib import Path

import openai
import pytest
import torch
from hf_checkpoints import hf_model, save_checkpoint
from kosmos2_checkpoints import tiny_kosmos2
from server_process import BIN, TINY_ENGINE, jax_cache_env, start
from transformers import AutoProcessor, Gemma3ForConditionalGeneration, Kosmos2ForConditionalGeneration
from vision_checkpoints import tiny_gemma3_vision, tiny_image

STEPS = 6


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_message(url: str, text: str = "Describe the picture") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("example2")
    text_dir = save_checkpoint(hf_model("gpt2"), root / "gpt2")
    vision_dir = tiny_gemma3_vision(root / "gemma3-vision")
    kosmos2_dir = tiny_kosmos2(root / "kosmos2")
    media = root / "media"
    media.mkdir()
    tiny_image(1).save(media / "one.png")
    (media / "junk.png").write_bytes(b"definitely not a PNG")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media))
    handler.log_message = lambda *a: None
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    config = root / "example-2.json"  # the seed's Example 2 with local checkpoints for the hub ids
    config.write_text(json.dumps([
        {"model_id": "text", "model": {"Plain": {"model_id": str(text_dir)}}},
        {"model_id": "kosmos2", "model": {"VisionPlain": {"model_id": str(kosmos2_dir), "arch": "kosmos2"}}},
        {"model_id": "vision", "model": {"VisionPlain": {"model_id": str(vision_dir), "arch": "gemma3"}}},
    ]))
    server = start([str(BIN / "mrs-server"), *TINY_ENGINE, "--allowed-local-media-path", str(media),
                    "--multi-model", "--multi-model-config", str(config)], root / "server.log", jax_cache_env())
    try:
        server.wait_ready()
        server.wait_all_loaded()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        yield client, vision_dir, media, f"http://127.0.0.1:{web.server_address[1]}", kosmos2_dir
    finally:
        web.shutdown()
        assert server.stop() == 0, server.output()[-3000:]


def _hf_greedy(vision_dir: Path, image, text: str) -> str:
    processor = AutoProcessor.from_pretrained(vision_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[image], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_example_2_serves_both_models_and_image_sources(served) -> None:
    client, vision_dir, media, web, _ = served
    cards = {m.id: m for m in client.models.list().data}
    assert cards["vision"].model_extra["capabilities"] == ["completion", "vision"]
    assert cards["text"].model_extra["capabilities"] == ["completion"]
    want = _hf_greedy(vision_dir, tiny_image(1), "Describe the picture")
    for url in (_data_uri(tiny_image(1)), f"{web}/one.png", f"file://{media / 'one.png'}"):
        reply = client.chat.completions.create(model="vision", messages=_image_message(url), max_tokens=STEPS,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == want, url
        assert reply.usage.prompt_tokens > 4  # the image's placeholder tokens count
    chunks = client.chat.completions.create(model="vision", messages=_image_message(_data_uri(tiny_image(1))),
                                            max_tokens=STEPS, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    text = client.chat.completions.create(model="vision", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=STEPS, temperature=0)
    assert text.choices[0].finish_reason in ("stop", "length")
    other = client.completions.create(model="text", prompt="Hello", max_tokens=STEPS, temperature=0)
    assert other.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model, url, words", [
    ("vision", "data:image/png;base64," + base64.b64encode(b"nope").decode(), "not a decodable image"),
    ("vision", "ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
    ("vision", "file:///etc/hostname", "outside the allowed local media path"),
    ("vision", "http://127.0.0.1:9/a.png", "fetching http://127.0.0.1:9/a.png failed"),
    ("vision", "{web}/missing.png", "HTTP 404"),
    ("vision", "{web}/junk.png", "not a decodable image"),
    ("text", "data:image/png;base64,", "model 'text' does not take images"),
])
def test_bad_images_get_a_400_naming_the_problem(served, model: str, url: str, words: str) -> None:
    client, _, _, web, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=_image_message(url.format(web=web)), max_tokens=2)
    error = err.value.body
    assert words in error["message"] and error["type"] == "invalid_request_error" and error["param"] == "messages"
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "still fine?"}],
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_too_many_images_and_detail(served) -> None:
    client, _, _, _, _ = served
    uri = _data_uri(tiny_image(2))
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 9}]
    with pytest.raises(openai.BadRequestError, match="9 images in one request; model 'vision' takes at most 8"):
        client.chat.completions.create(model="vision", messages=many, max_tokens=2)
    low = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri, "detail": "low"}}]}]
    with pytest.raises(openai.BadRequestError, match="detail: only 'auto' is supported"):
        client.chat.completions.create(model="vision", messages=low, max_tokens=2)


def test_example_2_kosmos2_grounding_matches_hf(served) -> None:
    client, _, _, _, kosmos2_dir = served
    cards = {m.id: m for m in client.models.list().data}
    assert cards["kosmos2"].model_extra["capabilities"] == ["completion", "vision"]
    processor = AutoProcessor.from_pretrained(kosmos2_dir)
    model = Kosmos2ForConditionalGeneration.from_pretrained(kosmos2_dir, attn_implementation="eager").eval()
    inputs = processor(text="<grounding>An image of", images=tiny_image(1), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    reply = client.chat.completions.create(
        model="kosmos2", messages=_image_message(_data_uri(tiny_image(1)), "<grounding>An image of"),
        max_tokens=STEPS, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]  # the image's 64 tokens count
    uri = _data_uri(tiny_image(2))
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 2}]
    with pytest.raises(openai.BadRequestError, match="2 images in one request; model 'kosmos2' takes at most 1"):
        client.chat.completions.create(model="kosmos2", messages=two, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="no chat template; send one user message"):
        client.chat.completions.create(model="kosmos2", messages=[{"role": "system", "content": "Be brief"},
                                                                 *_image_message(uri)], max_tokens=2)
