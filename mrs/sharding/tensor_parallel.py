"""``tensor_parallel: N``: shard every layer over a 1-D device mesh (Megatron-style rules).

Column-parallel projections (q/k/v, gate/up, GPT-2's c_attn/c_fc: each family's
``column_parallel``) split their output rows; row-parallel ones (o_proj, down_proj,
c_proj: ``row_parallel``) split their input columns, so each device holds 1/N of every layer and XLA's SPMD partitioner
inserts the one all-reduce per block. Embeddings, norms and the head are
replicated. The KV cache splits its kv-heads axis. N must divide the attention
and kv heads (``check_heads``), so no head spans two devices; another dimension
that does not divide by N stays replicated (correct, just not split). The model
code is unchanged: the jitted step sees sharded inputs and GSPMD partitions it.

Pick this over ``num_device_layers`` when the devices are alike and linked
(several GPUs in one host): every device works on every token. ``num_device_layers``
suits a model that must spill onto the host or unlike devices: it runs stage by
stage and each device idles while the others work.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrs.errors import ConfigError
from mrs.models.family import Family
from mrs.quant.qarray import QArray

AXIS = "tp"


def make_mesh(n: int, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"tensor_parallel must be a positive integer, got {n!r}", param="tensor_parallel")
    if n > len(devices):
        raise ConfigError(
            f"tensor_parallel {n} needs {n} devices but only {len(devices)} are available ({devices})",
            param="tensor_parallel",
        )
    return Mesh(np.array(devices[:n]), (AXIS,))


def check_heads(n: int, num_heads: int, num_kv_heads: int) -> None:
    """Heads split whole: each device attends over its own q and kv heads, none spans two."""
    if num_heads % n or num_kv_heads % n:
        raise ConfigError(
            f"tensor_parallel {n} must divide the attention heads ({num_heads}) and the kv heads ({num_kv_heads})",
            param="tensor_parallel",
        )


def _split(shape: tuple[int, ...], axis: int, mesh: Mesh) -> P:
    """Split ``axis`` over the mesh when it divides evenly, else replicate."""
    if shape[axis] % mesh.shape[AXIS]:
        return P()
    # No trailing Nones: XLA hands the spec back in that canonical form, and an equal
    # but differently spelt sharding would compile the step again.
    return P(*[None] * axis, AXIS)


def _leaf_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, family: Family,
               quantized_axis: int | None = None) -> P:
    if len(path) < 2 or not shape:
        return P()
    module, name = path[-2], path[-1]
    if module in family.column_parallel:
        return _split(shape, 0, mesh)  # weight rows and the bias both follow the output dim
    if module in family.row_parallel and name == "weight":
        return _split(shape, 1 if quantized_axis is None else quantized_axis, mesh)
    return P()


def _shard_leaf(path: tuple[str, ...], value: Any, mesh: Mesh, family: Family) -> Any:
    if isinstance(value, QArray):
        # data/high [rows, nblocks, ...], scale/min [rows, nblocks]: split rows or whole blocks.
        spec = _leaf_spec(path, value.data.shape, mesh, family, quantized_axis=1)
        return value.map_arrays(lambda a: jax.device_put(a, NamedSharding(mesh, P(*spec[: a.ndim]))))
    return jax.device_put(value, NamedSharding(mesh, _leaf_spec(path, tuple(value.shape), mesh, family)))


def shard_params(params: dict, mesh: Mesh, family: Family) -> dict:
    """The params tree placed on ``mesh`` by the rules above and the family's module names
    (QArrays split by whole blocks)."""

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        return _shard_leaf(path, node, mesh, family)

    return walk(params, ())


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """For KV cache arrays (or their shapes) ``[B, Hkv, D, S]`` and ``[B, Hkv, S, D]``: split over kv heads
    (replicated if they do not divide)."""
    return jax.tree.map(lambda a: NamedSharding(mesh, _split(a.shape, 1, mesh)), cache)
