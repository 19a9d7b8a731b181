"""Flax model families and the architecture registry."""

from mrs.models.config import ModelConfig

__all__ = ["ModelConfig"]
