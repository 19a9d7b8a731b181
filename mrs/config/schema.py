"""Typed configs. Both front doors (Hydra and the seed's ``mrs-server`` CLI) end here.

``ModelSource`` flattens the seed's one-of (``Plain`` / ``Gguf`` / ``VisionPlain``)
into one dataclass with a ``kind``, because OmegaConf structured configs cannot
hold unions of dataclasses. Every field but the ids has a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PLAIN, GGUF, VISION_PLAIN = "plain", "gguf", "vision_plain"


@dataclass
class ModelSource:
    kind: str = PLAIN  # plain | gguf | vision_plain
    # Plain / VisionPlain
    model_id: str | None = None  # hub repo id or local path
    arch: str | None = None  # None: detected from config.json
    # Gguf
    quantized_model_id: str | None = None  # hub repo id or local dir/file
    quantized_filename: str | None = None  # None: the only .gguf in quantized_model_id
    # Both: where the tokenizer comes from (None: the checkpoint itself / GGUF metadata)
    tok_model_id: str | None = None


@dataclass
class ModelEntry:
    model_id: str  # the id API requests use
    model: ModelSource = field(default_factory=ModelSource)
    chat_template: str | None = None  # a file path or a literal jinja template
    jinja_explicit: str | None = None  # a jinja file; overrides every other template
    num_device_layers: list[str] | None = None  # mistral.rs syntax: ["N"] or ["0:16;1:14"]
    in_situ_quant: str | None = None  # Q4_0, Q8_0, Q4K, ... (see mrs.quant)
    isq_embeddings: str | None = None  # same names, for the token embedding and LM head; None: as loaded
    dtype: str = "float32"  # float32 | bfloat16 | float16
    dequantize_gguf: bool = False  # expand GGUF tensors to dtype instead of keeping them packed
    tensor_parallel: int | None = None  # shard every layer over N devices instead
    # Lifecycle (the server's model registry)
    lazy: bool = False  # skip loading at start-up; the first request (or reload) loads it
    keep_alive: str | None = None  # idle time before unloading ("5m", "30s", "0", "-1" = never); None: server's
    # This model's own engine settings (None: the server's engine config)
    max_seqs: int | None = None
    max_seq_len: int | None = None
    prefill_buckets: list[int] | None = None


@dataclass
class EngineConfig:
    max_batch: int = 16  # decode slots
    max_seq_len: int = 2048  # longest sequence (context limit, capped by the model's and by the KV pool)
    # The paged KV cache (mrs.engine.kv_pages): one pool per model shared by its slots, in
    # tokens (capped at max_batch full contexts) or, when kv_memory is set, in bytes.
    kv_tokens: int = 8192
    kv_memory: str | None = None  # e.g. "512MiB"; overrides kv_tokens
    kv_page_size: int = 32  # tokens per page
    kv_dtype: str | None = None  # float32 | bfloat16 | float16; None: the model's dtype
    prefix_cache: bool = True  # prompts that start like an earlier one reuse its KV pages
    max_queue: int = 256  # waiting requests before submit raises Overloaded
    prefill_buckets: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    # Tokens per slot that one decode call may make (a loop on the device): the host's share
    # of each call is paid once for them. Calls make one while a request waits to be admitted
    # or a slot decodes under a grammar; 1 streams every token as soon as it is sampled.
    decode_steps: int = 4
    warmup: bool = True  # compile the step variants ahead of use (else each compiles when first run)
    # Report ready once the largest variants compile and compile the rest while serving
    # (mrs.engine.compiler); false: compile every variant before reporting ready.
    compile_in_background: bool = True
    # A step variant not run for this long leaves memory (the executable cache keeps it; it
    # loads again in the background when wanted). None: every compiled variant stays.
    variant_idle_s: float | None = 60.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 1234
    log_level: str = "info"
    shutdown_timeout_s: float = 30.0
    # Access: with any key set, every endpoint but /health (and /metrics, unless
    # metrics_need_key) needs `Authorization: Bearer <key>`. Admin keys also pass
    # everywhere; when some are set, model management needs one of them.
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None  # one key per line; adds to api_keys (as does $MRS_API_KEY)
    admin_api_keys: list[str] = field(default_factory=list)
    metrics_need_key: bool = False
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off; "*" allows any origin
    # Limits (None: no limit beyond the model's own)
    max_body: str = "8MiB"  # request body cap, bytes or a size such as "512KiB"; over it: 413
    max_tokens_limit: int | None = None  # per request; also the default when a request sets none
    max_n: int | None = None  # choices per request (the engine's slot count caps it anyway)
    max_prompt_tokens: int | None = None
    request_timeout_s: float | None = None  # a generation still running then ends with an error
    # Images in chat messages (vision models): per-image size cap, http(s) fetch timeout,
    # and the directory file:// URLs may read from (None: file:// URLs are refused).
    max_image_size: str = "20MiB"
    image_fetch_timeout_s: float = 10.0
    allowed_local_media_path: str | None = None
    # TLS: both or neither
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Model lifecycle
    autoload: bool = True  # a request to a model that is not loaded loads it (else 503)
    keep_alive: str | None = None  # every model's idle time-to-live ("5m", "30s", "0"; "-1": pinned); None: none
    max_loaded_models: int | None = None  # evict the least recently used idle, unpinned model past this count
    max_memory: str | None = None  # "12GiB", or a fraction of the device's memory such as "0.8"
    load_timeout_s: float = 600.0  # how long a request waits for its model to load (then 503)


@dataclass
class ServeConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    models: list[ModelEntry] = field(default_factory=list)
    default_model_id: str | None = None
    interactive: bool = False


def engine_for(entry: ModelEntry, engine: EngineConfig) -> EngineConfig:
    """The server's engine config with the entry's own settings applied."""
    return dataclasses.replace(
        engine,
        max_batch=entry.max_seqs or engine.max_batch,
        max_seq_len=entry.max_seq_len or engine.max_seq_len,
        prefill_buckets=list(entry.prefill_buckets or engine.prefill_buckets),
    )


def entry_from_dict(data: dict[str, Any]) -> ModelEntry:
    """A ModelEntry from a plain dict shaped like the dataclass (Hydra or Python API)."""
    data = dict(data)
    source = data.pop("model", None) or {}
    return ModelEntry(model=ModelSource(**source), **data)
