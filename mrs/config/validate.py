"""Checks on a whole ``ServeConfig`` that both front doors run before any model loads."""

from __future__ import annotations

from pathlib import Path

from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, EngineConfig, ModelEntry, ServeConfig, ServerConfig
from mrs.config.units import parse_duration, parse_size
from mrs.errors import ConfigError


def check_unique_ids(entries: list[ModelEntry], source: str) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.model_id in seen:
            raise ConfigError(
                f"{source}: duplicate model_id {entry.model_id!r} (entries {seen[entry.model_id]} and {i})",
                param="model_id",
            )
        seen[entry.model_id] = i


def check_default_model_id(entries: list[ModelEntry], default_model_id: str | None) -> None:
    if default_model_id is None:
        return
    ids = [e.model_id for e in entries]
    if default_model_id not in ids:
        raise ConfigError(
            f"default model id {default_model_id!r} matches no model; configured ids: {', '.join(ids)}",
            param="default_model_id",
        )


def check_serve_config(config: ServeConfig) -> None:
    """Everything that can be wrong without touching a checkpoint."""
    if not config.models:
        raise ConfigError("no models configured")
    check_unique_ids(config.models, "models")
    check_default_model_id(config.models, config.default_model_id)
    for entry in config.models:
        check_entry(entry)
    engine = config.engine
    if engine.max_batch < 1 or engine.max_seq_len < 1 or engine.max_queue < 0:
        raise ConfigError("engine: max_batch and max_seq_len must be >= 1, max_queue >= 0")
    if engine.decode_steps < 1:
        raise ConfigError("engine.decode_steps must be >= 1 (tokens per slot one decode call may make)",
                          param="decode_steps")
    if engine.variant_idle_s is not None and engine.variant_idle_s < 0:
        raise ConfigError("engine.variant_idle_s must be >= 0 (null keeps every step variant in memory)",
                          param="variant_idle_s")
    check_kv_cache(engine)
    check_server_config(config.server)


def check_kv_cache(engine: EngineConfig) -> None:
    """The paged KV cache's settings (``mrs.models.kv_cache.geometry``)."""
    if engine.kv_tokens < 1 or engine.kv_page_size < 1:
        raise ConfigError("engine: kv_tokens and kv_page_size must be >= 1", param="kv_tokens")
    if engine.kv_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"engine.kv_dtype {engine.kv_dtype!r}: expected float32, bfloat16 or float16",
                          param="kv_dtype")
    if engine.kv_memory is not None:
        parse_size(engine.kv_memory, "engine.kv_memory")


def check_entry(entry: ModelEntry) -> None:
    """What can be wrong with one entry without touching its checkpoint."""
    where = f"model {entry.model_id!r}"
    kind = entry.model.kind
    if kind in (PLAIN, VISION_PLAIN) and not entry.model.model_id:
        label = "Plain" if kind == PLAIN else "VisionPlain"
        raise ConfigError(f"{where}: {label} needs a model_id (hub repo or local path)", param="model_id")
    if kind == GGUF and not entry.model.quantized_model_id:
        raise ConfigError(f"{where}: Gguf needs a quantized_model_id (hub repo, dir or file)",
                          param="quantized_model_id")
    if kind not in (PLAIN, GGUF, VISION_PLAIN):
        raise ConfigError(f"{where}: unknown model kind {kind!r}; expected plain, gguf or vision_plain")
    for name in ("max_seqs", "max_seq_len"):
        value = getattr(entry, name)
        if value is not None and value < 1:
            raise ConfigError(f"{where}: {name} must be >= 1", param=name)
    if entry.keep_alive is not None:
        parse_duration(entry.keep_alive, "keep_alive")


def check_server_config(server: ServerConfig) -> None:
    if not 0 < server.port < 65536:
        raise ConfigError(f"server.port {server.port} is not a TCP port", param="port")
    parse_size(server.max_body, "max_body")
    parse_size(server.max_image_size, "max_image_size")
    if not server.image_fetch_timeout_s > 0:
        raise ConfigError(f"server.image_fetch_timeout_s must be > 0, got {server.image_fetch_timeout_s}",
                          param="image_fetch_timeout_s")
    if server.allowed_local_media_path is not None and not Path(server.allowed_local_media_path).is_dir():
        raise ConfigError(f"server.allowed_local_media_path {server.allowed_local_media_path!r} is not a directory",
                          param="allowed_local_media_path")
    for name in ("max_tokens_limit", "max_n", "max_prompt_tokens"):
        value = getattr(server, name)
        if value is not None and value < 1:
            raise ConfigError(f"server.{name} must be >= 1 (or unset), got {value}", param=name)
    if server.request_timeout_s is not None and not server.request_timeout_s > 0:
        raise ConfigError(f"server.request_timeout_s must be > 0 (or unset), got {server.request_timeout_s}",
                          param="request_timeout_s")
    if server.keep_alive is not None:
        parse_duration(server.keep_alive, "keep_alive")
    if server.max_loaded_models is not None and server.max_loaded_models < 1:
        raise ConfigError(f"server.max_loaded_models must be >= 1 (or unset), got {server.max_loaded_models}",
                          param="max_loaded_models")
    if server.max_memory is not None:
        try:
            fraction_ok = 0 < float(server.max_memory) <= 1
        except ValueError:
            fraction_ok = False
        if not fraction_ok:
            parse_size(server.max_memory, "max_memory")
    if not server.load_timeout_s > 0:
        raise ConfigError(f"server.load_timeout_s must be > 0, got {server.load_timeout_s}", param="load_timeout_s")
    if bool(server.ssl_certfile) != bool(server.ssl_keyfile):
        raise ConfigError("TLS needs both ssl_certfile and ssl_keyfile", param="ssl_certfile")
    for name in ("ssl_certfile", "ssl_keyfile", "api_key_file"):
        path = getattr(server, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"server.{name}: no file at {path!r}", param=name)
