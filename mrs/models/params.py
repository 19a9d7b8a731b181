"""Turn flat Hugging Face tensor names into the nested parameter tree of a Flax module."""

from __future__ import annotations

from typing import Any, Iterable


def nest(named: Iterable[tuple[str, Any]], strip_prefixes: tuple[str, ...] = ()) -> dict:
    """``model.layers.3.mlp.up_proj.weight`` -> ``{"model": {"layers_3": {"mlp": ...}}}``.

    A numeric component joins the name before it (``layers.3`` -> ``layers_3``),
    which is how Flax names submodules created in a loop.
    """
    tree: dict = {}
    for name, value in named:
        for prefix in strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        parts: list[str] = []
        for part in name.split("."):
            if part.isdigit() and parts:
                parts[-1] = f"{parts[-1]}_{part}"
            else:
                parts.append(part)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree
