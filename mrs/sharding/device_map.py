"""``num_device_layers`` (mistral.rs syntax): which device holds each decoder layer.

- ``["N"]``: the first N layers on the first accelerator, the rest on the host CPU.
- ``["0:16;1:14"]``: 16 layers on device ordinal 0, then 14 on ordinal 1, the rest
  (if any) on the host CPU.
- absent: everything on the default device.

"Accelerators" are ``jax.devices()`` (the default backend); on a CPU-only host they
are the CPU devices themselves (``--xla_force_host_platform_device_count`` makes
several), and "host CPU" is ``jax.devices("cpu")[0]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax

from mrs.errors import ConfigError

_COUNT = re.compile(r"^\s*(\d+)\s*$")
_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_LAYER = re.compile(r"^(?:layers|h)_(\d+)$")  # a decoder layer's subtree: llama/gemma3, gpt2


@dataclass(frozen=True)
class DeviceMap:
    """One device per decoder layer; the embedding goes with the first, the head with the last."""

    layers: tuple[Any, ...]

    def stages(self) -> list[tuple[Any, range]]:
        """Consecutive layers on one device, in order: ``[(device, range(start, stop)), ...]``."""
        out: list[tuple[Any, range]] = []
        start = 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] != self.layers[start]:
                out.append((self.layers[start], range(start, i)))
                start = i
        return out


def parse_device_layers(spec: Sequence[str] | None) -> list[tuple[int | None, int]]:
    """``["N"]`` -> ``[(None, N)]`` (None: the first accelerator); ``["0:16;1:14"]`` -> ``[(0, 16), (1, 14)]``."""
    if spec is None:
        return []
    if isinstance(spec, str) or not all(isinstance(s, str) for s in spec):
        raise ConfigError(f"num_device_layers must be a list of strings, got {spec!r}", param="num_device_layers")
    parts = [p for item in spec for p in item.split(";") if p.strip()]
    if not parts:
        raise ConfigError(f"num_device_layers {list(spec)!r} is empty", param="num_device_layers")
    if len(parts) == 1 and (m := _COUNT.match(parts[0])):
        return [(None, int(m.group(1)))]
    pairs: list[tuple[int | None, int]] = []
    for part in parts:
        m = _PAIR.match(part)
        if not m:
            raise ConfigError(
                f"num_device_layers: malformed entry {part!r} in {list(spec)!r}; "
                'expected ["N"] or ["ORDINAL:LAYERS;ORDINAL:LAYERS..."], e.g. ["0:16;1:14"]',
                param="num_device_layers",
            )
        ordinal = int(m.group(1))
        if any(o == ordinal for o, _ in pairs):
            raise ConfigError(f"num_device_layers: device ordinal {ordinal} appears twice in {list(spec)!r}",
                              param="num_device_layers")
        pairs.append((ordinal, int(m.group(2))))
    return pairs


def device_map(
    spec: Sequence[str] | None,
    num_layers: int,
    devices: Sequence[Any] | None = None,
    host: Any = None,
) -> DeviceMap:
    """The per-layer devices for ``spec``; errors name the bad ordinal or the layer count."""
    devices = list(devices if devices is not None else jax.devices())
    host = host if host is not None else jax.devices("cpu")[0]
    pairs = parse_device_layers(spec)
    if not pairs:
        return DeviceMap((devices[0],) * num_layers)
    total = sum(count for _, count in pairs)
    if total > num_layers:
        raise ConfigError(
            f"num_device_layers {list(spec)!r} places {total} layers but the model has {num_layers}",
            param="num_device_layers",
        )
    layers: list[Any] = []
    for ordinal, count in pairs:
        index = 0 if ordinal is None else ordinal
        if index >= len(devices):
            raise ConfigError(
                f"num_device_layers: unknown device ordinal {index}; available: "
                f"{', '.join(f'{i} ({d})' for i, d in enumerate(devices))}",
                param="num_device_layers",
            )
        layers += [devices[index]] * count
    layers += [host] * (num_layers - total)
    return DeviceMap(tuple(layers))


def stage_params(params: dict, layers: range, num_layers: int, embeddings: tuple[str, ...], tied: bool) -> dict:
    """The parameters of the stage that runs ``layers``: its decoder layers, the
    ``embeddings`` on the first stage, the rest (final norm, head) on the last, which
    also needs the token embedding (``embeddings[0]``) when the head is tied to it.

    Each stage then holds only what it reads, so no device holds more than its share.
    """
    first, last = layers.start == 0, layers.stop == num_layers

    def wanted(name: str) -> bool:
        if m := _LAYER.match(name):
            return int(m.group(1)) in layers
        if name in embeddings:
            return first or (last and tied and name == embeddings[0])
        return last

    out: dict = {}
    for root, sub in params.items():
        if isinstance(sub, dict) and any(_LAYER.match(name) for name in sub):  # the decoder's subtree
            out[root] = {name: value for name, value in sub.items() if wanted(name)}
        elif wanted(root):
            out[root] = sub
    return out
