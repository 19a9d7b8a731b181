"""``load_checkpoint``: one entry point for every checkpoint kind.

Dispatches on ``entry.model.kind`` (a ``Plain`` directory written by ``mrs convert`` is
restored by ``mrs.loading.conversion``) and then applies what every kind shares: the
entry's chat-template fields (one precedence, see ``mrs.loading.chat_template``),
in-situ quantization, and the device placement (resolved here, applied by the engine).
"""

from __future__ import annotations

from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, ModelEntry
from mrs.errors import ConfigError
from mrs.loading.chat_template import select_chat_template
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.gguf_loader import load_gguf
from mrs.models.config import ModelConfig
from mrs.quant import quantize_params, resolve_scheme
from mrs.sharding.placement import Placement, resolve_placement


def load_checkpoint(entry: ModelEntry) -> Checkpoint:
    kind = entry.model.kind
    # A bad scheme name fails before any weight is read.
    if entry.in_situ_quant:
        resolve_scheme(entry.in_situ_quant)
    if entry.isq_embeddings:
        resolve_scheme(entry.isq_embeddings, "isq_embeddings")
    # The other kinds' loaders are imported on use: they pull in torch (transformers'
    # AutoTokenizer and processors) or orbax, seconds that a GGUF server need not spend.
    converted = False
    if kind == GGUF:
        checkpoint = load_gguf(entry)
    elif kind == PLAIN:
        from mrs.loading.conversion import is_conversion, load_conversion
        from mrs.loading.safetensors_reader import load_plain

        converted = is_conversion(entry.model.model_id)
        checkpoint = load_conversion(entry) if converted else load_plain(entry)
    elif kind == VISION_PLAIN:
        from mrs.loading.vision_loader import load_vision_plain

        checkpoint = load_vision_plain(entry)
    else:
        raise ConfigError(
            f"model {entry.model_id!r}: unknown model kind {kind!r}; expected {PLAIN}, {GGUF} or {VISION_PLAIN}",
            param="model.kind",
        )
    checkpoint.placement = entry_placement(entry, checkpoint.config)
    if checkpoint.vision is not None and checkpoint.placement != Placement():
        raise ConfigError(f"model {entry.model_id!r}: num_device_layers and tensor_parallel are not supported "
                          "for vision models yet", param="num_device_layers")
    if checkpoint.placement != Placement():
        checkpoint.notes.append(f"placement: {checkpoint.placement.describe()}")
    # A conversion is stored quantized (load_conversion checks how).
    if (entry.in_situ_quant or entry.isq_embeddings) and not converted:
        checkpoint.params = quantize_params(checkpoint.params, entry.in_situ_quant or None,
                                            embeddings=entry.isq_embeddings or None)
        if entry.in_situ_quant:
            checkpoint.in_situ_quant = entry.in_situ_quant
            checkpoint.notes.append(f"in-situ quantized to {entry.in_situ_quant}")
        if entry.isq_embeddings:
            checkpoint.isq_embeddings = entry.isq_embeddings
            checkpoint.notes.append(f"embedding and LM head in-situ quantized to {entry.isq_embeddings}")
    selected = select_chat_template(entry, checkpoint.chat_template)
    if selected.origin != "checkpoint":
        checkpoint.notes.append(f"chat template: {selected.origin}")
    checkpoint.chat_template = selected.template
    return checkpoint


def entry_placement(entry: ModelEntry, config: ModelConfig) -> Placement:
    """``num_device_layers`` / ``tensor_parallel`` resolved on this host's devices; errors name the model."""
    try:
        return resolve_placement(entry.num_device_layers, entry.tensor_parallel, num_layers=config.num_layers,
                                 num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
    except ConfigError as err:
        raise ConfigError(f"model {entry.model_id!r}: {err.message}", param=err.param) from None
