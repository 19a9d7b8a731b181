"""A parameter tree's layout as JSON, and back as an abstract tree to restore it into.

An array leaf is ``{"shape": [...], "dtype": "float32"}``; a ``QArray`` is
``{"qarray": {shape, bits, block, zero, fmt}, "data": leaf, "scale": leaf, "min": leaf or null}``.
The QArray fields are pytree metadata, not arrays, so a checkpoint of the arrays
alone cannot rebuild them; the spec can.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mrs.quant.qarray import QArray

Spec = dict[str, Any]
QARRAY_FIELDS = ("data", "scale", "min", "high")  # its arrays; "min" and "high" may be None


def _leaf_spec(x: Any) -> Spec:
    return {"shape": list(x.shape), "dtype": str(x.dtype)}


def _abstract_leaf(spec: Spec) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]))


def param_spec(params: dict[str, Any]) -> Spec:
    """The JSON-able layout of a nested params dict (array or QArray leaves)."""

    def describe(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: describe(value) for key, value in node.items()}
        if isinstance(node, QArray):
            meta = {**node.meta(), "shape": list(node.shape)}
            arrays = {name: getattr(node, name) for name in QARRAY_FIELDS}
            return {"qarray": meta, **{k: None if a is None else _leaf_spec(a) for k, a in arrays.items()}}
        return _leaf_spec(node)

    return describe(params)


def abstract_params(spec: Spec) -> dict[str, Any]:
    """The tree ``param_spec`` describes, with ``jax.ShapeDtypeStruct`` leaves (same pytree structure)."""

    def build(node: Spec) -> Any:
        if "qarray" in node:
            meta = {**node["qarray"], "shape": tuple(node["qarray"]["shape"])}
            # .get: conversions written before 6-bit storage have no "high" entry.
            arrays = {k: None if node.get(k) is None else _abstract_leaf(node[k]) for k in QARRAY_FIELDS}
            return QArray(**arrays, **meta)
        if isinstance(node.get("shape"), list):  # a module's entries are dicts, never lists
            return _abstract_leaf(node)
        return {key: build(value) for key, value in node.items()}

    return build(spec)
