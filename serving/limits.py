"""The server's own caps on a request (``server.max_tokens_limit``, ``max_n``,
``max_prompt_tokens``, ``request_timeout_s``, the image limits), on top of the model's limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mrs.config.schema import ServerConfig
from mrs.config.units import parse_size
from mrs.engine.types import SamplingParams
from mrs.errors import InvalidRequest
from mrs.images import ImageLimits


@dataclass(frozen=True)
class Limits:
    max_tokens: int | None = None
    max_n: int | None = None
    max_prompt_tokens: int | None = None
    timeout_s: float | None = None
    images: ImageLimits = field(default_factory=lambda: ImageLimits(local_root=False))

    @classmethod
    def from_config(cls, server: ServerConfig) -> "Limits":
        local = Path(server.allowed_local_media_path) if server.allowed_local_media_path else False
        images = ImageLimits(max_bytes=parse_size(server.max_image_size, "max_image_size"),
                             fetch_timeout_s=server.image_fetch_timeout_s, local_root=local)
        return cls(server.max_tokens_limit, server.max_n, server.max_prompt_tokens, server.request_timeout_s, images)

    def apply(self, sampling: SamplingParams, prompt_tokens: int, prompt_param: str) -> None:
        """Refuse what is over a cap (400 naming the field); a request without max_tokens gets the cap."""
        if self.max_n is not None and sampling.n > self.max_n:
            raise InvalidRequest(f"n: this server allows at most {self.max_n} choices per request", param="n")
        if self.max_tokens is not None:
            if sampling.max_tokens is None:
                sampling.max_tokens = self.max_tokens
            elif sampling.max_tokens > self.max_tokens:
                raise InvalidRequest(
                    f"max_tokens: {sampling.max_tokens} is over this server's limit of {self.max_tokens}",
                    param="max_tokens",
                )
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise InvalidRequest(
                f"{prompt_param}: the prompt has {prompt_tokens} tokens; this server accepts at most "
                f"{self.max_prompt_tokens}", param=prompt_param,
            )
