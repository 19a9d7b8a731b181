"""Images in chat messages (``mrs.images``) and where they go in a prompt (``mrs.engine.image_plan``)."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrs.engine.image_plan import check_images, chunk_injection, chunk_plan, image_spans
from mrs.errors import InvalidRequest
from mrs.images import ImageLimits, load_image, take_images
from mrs.models.vision import VisionSpec

SPEC = VisionSpec(arch="gemma3", encoder=None, image_token_id=9, tokens_per_image=4, image_size=8,
                  bidirectional=True, max_images=2)


def _png(size: tuple[int, int] = (5, 3), color: tuple[int, int, int] = (200, 10, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def http_dir(tmp_path_factory: pytest.TempPathFactory):
    """A real local HTTP server over a directory with one PNG and one large file."""
    root = tmp_path_factory.mktemp("images")
    (root / "red.png").write_bytes(_png())
    (root / "big.bin").write_bytes(b"\0" * 4096)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_sources_load_as_rgb(http_dir, tmp_path: Path) -> None:
    root, url = http_dir
    limits = ImageLimits(local_root=root)
    for source in (_data_uri(_png()), f"{url}/red.png", f"file://{root / 'red.png'}"):
        image = load_image(source, limits)
        assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (5, 3), (200, 10, 30))
    gray = Image.new("L", (2, 2), 7)
    assert load_image(gray, ImageLimits()).mode == "RGB"  # the Python API passes PIL images
    (tmp_path / "a.png").write_bytes(_png())
    assert load_image(str(tmp_path / "a.png"), ImageLimits()).size == (5, 3)  # and paths


@pytest.mark.parametrize("source, limits, words", [
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), ImageLimits(), "not a decodable image"),
    ("data:image/png;base64,@@@", ImageLimits(), "not valid base64"),
    ("data:text/plain;base64,aGk=", ImageLimits(), "data:image/<type>;base64"),
    ("ftp://example.com/cat.png", ImageLimits(), "unsupported URL scheme 'ftp'"),
    ("file:///etc/hostname", ImageLimits(local_root=False), "file:// URLs are disabled"),
    ("/etc/hostname", ImageLimits(local_root=False), "expected a data:, http(s):// or file:// URL"),
    (_data_uri(_png((40, 40))), ImageLimits(max_pixels=1000), "40x40 pixels; at most 1000"),
    (_data_uri(_png()), ImageLimits(max_bytes=10), "over 10 bytes"),
])
def test_bad_images_are_refused_by_name(source: str, limits: ImageLimits, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        load_image(source, limits, "messages[0].content[1]")
    assert err.value.param == "messages" and "messages[0].content[1]" in err.value.message


def test_fetch_failures_and_caps(http_dir, tmp_path: Path) -> None:
    root, url = http_dir
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        load_image(f"{url}/missing.png", ImageLimits())
    with pytest.raises(InvalidRequest, match="over 1000 bytes"):
        load_image(f"{url}/big.bin", ImageLimits(max_bytes=1000))
    with pytest.raises(InvalidRequest, match="fetching http://127.0.0.1:9/x.png failed"):
        load_image("http://127.0.0.1:9/x.png", ImageLimits(fetch_timeout_s=2))
    (tmp_path / "outside.png").write_bytes(_png())
    with pytest.raises(InvalidRequest, match="outside the allowed local media path"):
        load_image(f"file://{tmp_path / 'outside.png'}", ImageLimits(local_root=root))


def test_take_images_leaves_template_parts() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is "},
                                             {"type": "image_url", "image_url": {"url": _data_uri(_png())}},
                                             {"type": "text", "text": "?"}]}]
    out, images = take_images(messages, ImageLimits())
    assert out[0] == messages[0] and len(images) == 1
    assert out[1]["content"] == [{"type": "text", "text": "What is "}, {"type": "image"}, {"type": "text", "text": "?"}]
    with pytest.raises(InvalidRequest, match=r"messages\[0\].content\[0\]: unsupported content part type 'audio'"):
        take_images([{"role": "user", "content": [{"type": "audio"}]}], ImageLimits())
    with pytest.raises(InvalidRequest, match="detail: only 'auto'"):
        take_images([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": _data_uri(_png()), "detail": "low"}}]}], ImageLimits())


def test_spans_and_chunks_never_split_an_image() -> None:
    ids = [1, 2, 9, 9, 9, 9, 3, 9, 9, 9, 9, 9, 9, 9, 9, 4]  # one image, then two adjacent ones
    spans = image_spans(ids, SPEC)
    assert spans == [(2, 6), (7, 11), (11, 15)]
    for size in range(4, 9):
        chunks = chunk_plan(len(ids), size, spans)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])) and all(e - s <= size for s, e in chunks)
        for s, e in spans:  # each image inside one chunk
            assert any(cs <= s and e <= ce for cs, ce in chunks), (size, chunks)
    with pytest.raises(InvalidRequest, match="a run of 3 image placeholder tokens"):
        image_spans([9, 9, 9], SPEC)


def test_check_images_matches_placeholders_and_images() -> None:
    ids = [1, 9, 9, 9, 9, 2]
    pixels = np.zeros((1, 3, 8, 8), np.float32)
    assert check_images(ids, pixels, SPEC, "vlm") == [(1, 5)]
    with pytest.raises(InvalidRequest, match="1 image placeholders for 2 images"):
        check_images(ids, np.zeros((2, 3, 8, 8), np.float32), SPEC, "vlm")
    with pytest.raises(InvalidRequest, match="takes at most 2"):
        check_images(ids * 3, np.zeros((3, 3, 8, 8), np.float32), SPEC, "vlm")
    with pytest.raises(InvalidRequest, match=r"must be \(3, 8, 8\)"):
        check_images(ids, np.zeros((1, 3, 4, 4), np.float32), SPEC, "vlm")
    with pytest.raises(InvalidRequest, match="model 'txt' does not take images"):
        check_images(ids, pixels, None, "txt")


def test_chunk_injection_places_features_and_spans() -> None:
    features = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    spans = [(2, 6), (7, 11)]
    assert chunk_injection(features, spans, 11, 14, 8, True) is None
    injected = chunk_injection(features, spans, 0, 7, 8, True)
    assert injected.embeds.shape == (1, 8, 3)
    np.testing.assert_array_equal(injected.embeds[0, 2:6], features[0])
    assert injected.mask[0].tolist() == [False, False, True, True, True, True, False, False]
    assert injected.span_start[0, 2:6].tolist() == [2] * 4 and injected.span_end[0, 2:6].tolist() == [6] * 4
    assert injected.span_end[0, 6] == injected.span_start[0, 6] == 0  # a text token: no extra keys
    causal = chunk_injection(features, spans, 7, 11, 4, False)
    np.testing.assert_array_equal(causal.embeds[0], features[1])
    assert not causal.span_end.any()
