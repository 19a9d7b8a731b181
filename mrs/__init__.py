"""mrs: serve many LLMs from one OpenAI-compatible API; each model a JAX/Flax pipeline.

``mrs.load(...)`` (see ``mrs.pipeline``) is the Python API; it is imported lazily so
that ``import mrs.errors`` and friends stay light.
"""

from typing import Any

__all__ = ["load", "Pipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mrs import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mrs' has no attribute {name!r}")
