"""Images in chat messages: OpenAI's content parts to PIL images, with the checks a server
needs (size caps, a fetch timeout, local files only where allowed).

A message's ``content`` may be a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image_url", "image_url": {"url": ...}}`` (OpenAI; the URL a ``data:image/...;
base64,`` URI, ``http(s)://`` or ``file://``) and, from the Python API, ``{"type":
"image", "image": <PIL image or path>}``. ``take_images`` loads every image in order and
leaves ``{"type": "image"}`` in its place, the part Hugging Face chat templates expect.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from mrs.errors import InvalidRequest


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # OpenAI's cap per image
    max_pixels: int = 8192 * 8192
    fetch_timeout_s: float = 10.0
    # file:// URLs: None allows every path (the Python API); a server passes its
    # allowed_local_media_path, or False to refuse them all.
    local_root: Path | None | bool = None


def take_images(messages: list[dict[str, Any]], limits: ImageLimits) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The messages with each image part replaced by ``{"type": "image"}``, and the images in order."""
    images: list[Image.Image] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                images.append(load_image(_source(part, kind, where), limits, where))
                parts.append({"type": "image"})
            else:
                raise InvalidRequest(f"{where}: unsupported content part type {kind!r}; expected text or image_url",
                                     param="messages")
        out.append({**message, "content": parts})
    return out, images


def count_images(messages: list[dict[str, Any]]) -> int:
    """How many image parts the messages hold (checked before any is fetched)."""
    return sum(isinstance(p, dict) and p.get("type") in ("image_url", "image")
               for m in messages if isinstance(m.get("content"), list) for p in m["content"])


def text_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose text-part lists are joined into strings (templates of text models expect strings)."""
    def joined(content: Any) -> Any:
        return "".join(p["text"] for p in content) if isinstance(content, list) else content
    return [{**m, "content": joined(m.get("content"))} for m in messages]


def _source(part: dict[str, Any], kind: str, where: str) -> Any:
    value = part.get(kind)
    if kind == "image_url":
        if isinstance(value, dict):
            detail = value.get("detail", "auto")
            if detail != "auto":
                raise InvalidRequest(f"{where}.image_url.detail: only 'auto' is supported (images are processed at "
                                     f"the model's own resolution); got {detail!r}", param="messages")
            value = value.get("url")
        if not isinstance(value, str):
            raise InvalidRequest(f"{where}.image_url: expected {{'url': '...'}}", param="messages")
    if value is None:
        raise InvalidRequest(f"{where}: the part has no {kind!r}", param="messages")
    return value


def load_image(source: str | Path | Image.Image, limits: ImageLimits, where: str = "image") -> Image.Image:
    """An RGB image from a PIL image, a path, or a data:, http(s):// or file:// URL."""
    if isinstance(source, Image.Image):
        return _checked(source, limits, where).convert("RGB")
    if isinstance(source, Path) or "://" not in source and not source.startswith("data:"):
        if isinstance(source, str) and limits.local_root is not None:
            raise InvalidRequest(f"{where}: expected a data:, http(s):// or file:// URL", param="messages")
        return _decoded(_read_file(Path(source), limits, where), limits, where)
    url = urlparse(source)
    if url.scheme == "data":
        return _decoded(_data_uri(source, limits, where), limits, where)
    if url.scheme in ("http", "https"):
        return _decoded(_fetch(source, limits, where), limits, where)
    if url.scheme == "file":
        path = Path(unquote(url.path))
        if limits.local_root is False:
            raise InvalidRequest(f"{where}: file:// URLs are disabled on this server (set "
                                 "server.allowed_local_media_path to allow a directory)", param="messages")
        if isinstance(limits.local_root, Path) and not path.resolve().is_relative_to(limits.local_root.resolve()):
            raise InvalidRequest(f"{where}: {path} is outside the allowed local media path", param="messages")
        return _decoded(_read_file(path, limits, where), limits, where)
    raise InvalidRequest(f"{where}: unsupported URL scheme {url.scheme!r}; expected data:, http(s):// or file://",
                         param="messages")


def _data_uri(uri: str, limits: ImageLimits, where: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise InvalidRequest(f"{where}: a data URI must be data:image/<type>;base64,<data>", param="messages")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise InvalidRequest(f"{where}: the image is over {limits.max_bytes} bytes", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the data URI is not valid base64", param="messages") from None


def _fetch(url: str, limits: ImageLimits, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as reply:  # noqa: S310 (scheme checked)
            data = reply.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise InvalidRequest(f"{where}: fetching {url} failed: HTTP {e.code}", param="messages") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InvalidRequest(f"{where}: fetching {url} failed: {getattr(e, 'reason', e)}", param="messages") from None
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"{where}: the image at {url} is over {limits.max_bytes} bytes", param="messages")
    return data


def _read_file(path: Path, limits: ImageLimits, where: str) -> bytes:
    try:
        if path.stat().st_size > limits.max_bytes:
            raise InvalidRequest(f"{where}: {path} is over {limits.max_bytes} bytes", param="messages")
        return path.read_bytes()
    except OSError as e:
        raise InvalidRequest(f"{where}: cannot read {path}: {e.strerror}", param="messages") from None


def _decoded(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        _checked(image, limits, where)  # from the header, before decoding the pixels
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"{where}: not a decodable image ({e})", param="messages") from None
    return image.convert("RGB")


def _checked(image: Image.Image, limits: ImageLimits, where: str) -> Image.Image:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise InvalidRequest(f"{where}: the image is {width}x{height} pixels; at most {limits.max_pixels} pixels "
                             "are accepted", param="messages")
    return image
