"""Load a ``Gguf`` model entry: file, config, weights, tokenizer, template, EOS ids."""

from __future__ import annotations

from mrs.config.schema import ModelEntry
from mrs.errors import ConfigError, LoadError
from mrs.loading import param_check
from mrs.loading.chat_template import tokenizer_template
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.gguf_config import model_config_from_gguf
from mrs.loading.gguf_reader import GGUFFile, open_gguf
from mrs.loading.gguf_tokenizer import gguf_add_bos, tokenizer_from_gguf, tokenizer_from_id
from mrs.loading.gguf_weights import load_gguf_params
from mrs.loading.sources import resolve_gguf

# Control tokens llama.cpp treats as end of generation by their text (llama-vocab.cpp),
# for files whose metadata names only the end-of-text token.
EOG_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>")
_CONTROL = 3  # llama.cpp token type


def eos_token_ids(g: GGUFFile) -> tuple[int, ...]:
    """The GGUF eos id, its eot/eom ids, and control tokens llama.cpp ends generation on."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if (value := g.get(key)) is not None:
            ids.append(int(value))
    tokens, types = g.get("tokenizer.ggml.tokens") or [], g.get("tokenizer.ggml.token_type") or []
    wanted = set(EOG_TOKENS)
    ids += [i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and tok in wanted]
    return tuple(dict.fromkeys(ids))  # unique, eos first


def load_gguf(entry: ModelEntry) -> Checkpoint:
    source = entry.model
    if not source.quantized_model_id:
        raise ConfigError(f"model {entry.model_id!r}: a Gguf entry needs quantized_model_id", param="quantized_model_id")
    path = resolve_gguf(source.quantized_model_id, source.quantized_filename)
    g = open_gguf(path)
    config = model_config_from_gguf(g, entry.dtype)
    notes: list[str] = []
    gguf_template = g.get("tokenizer.chat_template")
    if source.tok_model_id:
        tokenizer = tokenizer_from_id(source.tok_model_id)
        # The tokenizer's own template outranks the GGUF's (see mrs.loading.chat_template).
        template = tokenizer_template(tokenizer) or gguf_template
        notes.append(f"tokenizer from {source.tok_model_id}")
    else:
        tokenizer = tokenizer_from_gguf(g)
        template = gguf_template
    eos = eos_token_ids(g)
    if source.tok_model_id and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos += (tokenizer.eos_token_id,)
    bos = g.get("tokenizer.ggml.bos_token_id")
    params = load_gguf_params(g, config, keep_quantized=not entry.dequantize_gguf)
    g.release_pages()  # read once: without this the whole file stays resident
    try:
        param_check.check_params(config, params)
    except (KeyError, ValueError, TypeError) as err:
        raise LoadError(f"{path}: its tensors do not fit the {config.arch} model: {err}") from None
    return Checkpoint(
        config=config,
        params=params,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        bos_token_id=None if bos is None else int(bos),
        add_bos=gguf_add_bos(g) and bos is not None,
        chat_template=template,
        source=str(path),
        notes=notes,
    )
