"""One model's layout over devices, resolved from its ``ModelEntry`` fields.

- ``num_device_layers``: consecutive layers per device, run stage by stage
  (``mrs.sharding.device_map``); ``Placement.layers``.
- ``tensor_parallel: N``: every layer sharded over an N-device mesh
  (``mrs.sharding.tensor_parallel``); ``Placement.mesh``.
- neither: the default device, uncommitted (the engine's usual fast path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
from jax.sharding import Mesh

from mrs.errors import ConfigError
from mrs.sharding.device_map import DeviceMap, device_map
from mrs.sharding.tensor_parallel import check_heads, make_mesh


@dataclass(frozen=True)
class Placement:
    layers: DeviceMap | None = None  # set only when some layer leaves the default device
    mesh: Mesh | None = None

    def describe(self) -> str:
        if self.layers is not None:
            return "stages " + ", ".join(f"{r.start}-{r.stop - 1} on {d}" for d, r in self.layers.stages())
        if self.mesh is not None:
            return f"tensor parallel over {self.mesh.devices.size} devices"
        return "default device"


def resolve_placement(
    num_device_layers: Sequence[str] | None,
    tensor_parallel: int | None,
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
) -> Placement:
    """The placement an entry asks for; ``ConfigError`` (naming the field) when it cannot run."""
    if tensor_parallel not in (None, 1):
        if num_device_layers:
            raise ConfigError(
                "num_device_layers and tensor_parallel cannot be combined; pick one "
                "(stages for a model too big for one device, a mesh to use several devices on every layer)",
                param="tensor_parallel",
            )
        mesh = make_mesh(tensor_parallel)
        check_heads(tensor_parallel, num_heads, num_kv_heads)
        return Placement(mesh=mesh)
    dmap = device_map(num_device_layers, num_layers)
    if set(dmap.layers) == {jax.devices()[0]}:
        return Placement()
    return Placement(layers=dmap)
