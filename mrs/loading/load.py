"""``load_checkpoint``: one entry point for every checkpoint kind.

Dispatches on ``entry.model.kind`` and then applies what every kind shares: the
entry's chat-template fields (one precedence, see ``mrs.loading.chat_template``),
in-situ quantization, and the placement checks.
"""

from __future__ import annotations

from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, ModelEntry
from mrs.errors import ConfigError, LoadError
from mrs.loading.chat_template import select_chat_template
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.gguf_loader import load_gguf
from mrs.loading.safetensors_reader import load_plain
from mrs.models.config import ModelConfig
from mrs.quant import quantize_params, resolve_scheme
from mrs.sharding.device_map import device_map


def load_checkpoint(entry: ModelEntry) -> Checkpoint:
    kind = entry.model.kind
    if entry.in_situ_quant:
        resolve_scheme(entry.in_situ_quant)  # a bad scheme name fails before any weight is read
    if entry.tensor_parallel and entry.tensor_parallel > 1:
        raise ConfigError(
            f"model {entry.model_id!r}: tensor_parallel={entry.tensor_parallel} is not served yet "
            "(mrs.sharding shards parameters, but the engine does not shard its KV cache)",
            param="tensor_parallel",
        )
    if kind == GGUF:
        checkpoint = load_gguf(entry)
    elif kind == PLAIN:
        checkpoint = load_plain(entry)
    elif kind == VISION_PLAIN:
        raise LoadError(f"model {entry.model_id!r}: vision-plain models are not supported yet")
    else:
        raise ConfigError(
            f"model {entry.model_id!r}: unknown model kind {kind!r}; expected {PLAIN}, {GGUF} or {VISION_PLAIN}",
            param="model.kind",
        )
    check_placement(entry, checkpoint.config)
    if entry.in_situ_quant:
        checkpoint.params = quantize_params(checkpoint.params, entry.in_situ_quant)
        checkpoint.notes.append(f"in-situ quantized to {entry.in_situ_quant}")
    selected = select_chat_template(entry, checkpoint.chat_template)
    if selected.origin != "checkpoint":
        checkpoint.notes.append(f"chat template: {selected.origin}")
    checkpoint.chat_template = selected.template
    return checkpoint


def check_placement(entry: ModelEntry, config: ModelConfig) -> None:
    """Validate ``num_device_layers``; refuse a split the engine cannot run yet.

    A spec that keeps every layer on one device (e.g. ``["N"]`` on a CPU-only host,
    where the first accelerator is the host) runs as usual.
    """
    if not entry.num_device_layers:
        return
    devices = set(device_map(entry.num_device_layers, config.num_layers).layers)
    if len(devices) > 1:
        raise ConfigError(
            f"model {entry.model_id!r}: num_device_layers {entry.num_device_layers!r} splits the "
            f"model over {len(devices)} devices; running a split model stage by stage is not supported yet",
            param="num_device_layers",
        )
