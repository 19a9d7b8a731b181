"""``mrs-server``: the seed's (mistral.rs's) command line, ending in a ``ServeConfig``.

    mrs-server --port 1234 plain -m <id or path> -a <arch>
    mrs-server --port 1234 gguf -m <repo or dir> -f <file> [-t <tok_model_id>]
    mrs-server --port 1234 --multi-model --multi-model-config models.json --default-model-id <id>
    mrs-server -i gguf -m <dir> -f <file>          # terminal chat instead of HTTP

Per-model options (``--chat-template``, ``--jinja-explicit``, ``--isq``,
``--isq-embeddings``, ``--num-device-layers``, ``--dtype``) are accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrs.config.mistralrs import load_multi_model_config
from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, EngineConfig, ModelEntry, ModelSource, ServeConfig, ServerConfig
from mrs.config.validate import check_serve_config
from mrs.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


def _model_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options of one model; on subcommands they default to SUPPRESS so the global value stays."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("-c", "--chat-template", default=default,
                        help="chat template: a jinja file or a literal template")
    parser.add_argument("-j", "--jinja-explicit", default=default,
                        help="jinja template file that overrides every other template")
    parser.add_argument("--isq", default=default, help="in-situ quantization, e.g. Q8_0, Q4_0, Q4K")
    parser.add_argument("--isq-embeddings", default=default,
                        help="in-situ quantization of the token embedding and LM head, e.g. Q8_0 "
                             "(default: keep them as loaded)")
    parser.add_argument("-n", "--num-device-layers", nargs="+", default=default,
                        help='layers per device, mistral.rs syntax: "8" or "0:16;1:14"')
    parser.add_argument("-d", "--dtype", choices=_DTYPES, default=argparse.SUPPRESS if suppress else "float32",
                        help="parameter and activation dtype (default float32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrs-server",
        description="Serve one or several LLMs (JAX/Flax) behind an OpenAI-compatible HTTP API.",
    )
    parser.add_argument("--host", "--serve-ip", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=1234, help="port to bind (default 1234)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--max-seqs", type=int, default=EngineConfig.max_batch,
                        help=f"concurrent sequences per model, i.e. decode slots (default {EngineConfig.max_batch})")
    parser.add_argument("--max-seq-len", type=int, default=EngineConfig.max_seq_len,
                        help=f"longest sequence, capped by the model's context and the KV pool "
                             f"(default {EngineConfig.max_seq_len})")
    parser.add_argument("--kv-tokens", type=int, default=EngineConfig.kv_tokens,
                        help="KV cache pool per model in tokens, shared by its sequences (default %(default)s)")
    parser.add_argument("--kv-memory", default=None,
                        help="KV cache pool per model in bytes, e.g. 512MiB (overrides --kv-tokens)")
    parser.add_argument("--kv-page-size", type=int, default=EngineConfig.kv_page_size,
                        help="tokens per KV cache page (default %(default)s)")
    parser.add_argument("--kv-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="KV cache element type (default: the model's dtype)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="do not reuse the KV cache of prompts that start like an earlier one")
    parser.add_argument("--max-queue", type=int, default=EngineConfig.max_queue,
                        help="waiting requests per model before 429 (default %(default)s)")
    parser.add_argument("--prefill-buckets", type=_int_list, default=None,
                        help="comma-separated padded prompt lengths to compile, e.g. 64,256")
    parser.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps, metavar="N",
                        help="tokens per sequence one decode call may make; 1 streams each token as soon as it "
                             "is sampled (default %(default)s)")
    parser.add_argument("--no-warmup", action="store_true", help="compile lazily instead of before serving")
    parser.add_argument("--compile-before-serving", action="store_true",
                        help="compile every step variant before a model reports ready (default: the largest "
                             "ones, then the rest in the background while it serves)")
    parser.add_argument("--variant-idle", type=float, default=EngineConfig.variant_idle_s, metavar="S",
                        help="seconds a compiled step variant stays in memory unused before it is dropped (it "
                             "loads again from the executable cache when wanted; -1: keep every one; "
                             "default %(default)s)")
    parser.add_argument("--shutdown-timeout", type=float, default=ServerConfig.shutdown_timeout_s,
                        help="seconds in-flight requests get on SIGINT/SIGTERM (default %(default)s)")
    _access_options(parser)
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="chat in the terminal with the default (else first) model instead of serving HTTP")
    parser.add_argument("--multi-model", action="store_true", help="serve the models of --multi-model-config")
    parser.add_argument("--multi-model-config", type=Path, help="multi-model JSON file")
    parser.add_argument("--default-model-id", help="model for requests without `model` (default: the first)")
    _model_options(parser, suppress=False)

    sub = parser.add_subparsers(dest="command", metavar="{plain,gguf,vision-plain}")
    plain = sub.add_parser("plain", help="a Hugging Face layout (safetensors) checkpoint")
    plain.add_argument("-m", "--model-id", required=True, help="hub repo id or local directory")
    plain.add_argument("-a", "--arch", help="architecture, e.g. llama, mistral, qwen2, gemma3, gpt2 "
                                            "(default: from config.json)")
    plain.add_argument("-t", "--tok-model-id", help="where the tokenizer comes from (default: the model)")
    _model_options(plain, suppress=True)

    gguf = sub.add_parser("gguf", help="a GGUF checkpoint")
    gguf.add_argument("-m", "--quantized-model-id", required=True, help="hub repo id, local directory or file")
    gguf.add_argument("-f", "--quantized-filename", help="the .gguf file inside -m (default: the only one)")
    gguf.add_argument("-t", "--tok-model-id", help="where the tokenizer comes from (default: GGUF metadata)")
    _model_options(gguf, suppress=True)

    vision = sub.add_parser("vision-plain", help="a Hugging Face layout vision model (text and image chats)")
    vision.add_argument("-m", "--model-id", required=True, help="hub repo id or local directory")
    vision.add_argument("-a", "--arch", help="architecture: gemma3 (default: from config.json)")
    vision.add_argument("-t", "--tok-model-id", help="where the tokenizer comes from (default: the model)")
    _model_options(vision, suppress=True)
    return parser


def _access_options(parser: argparse.ArgumentParser) -> None:
    """Keys, CORS, limits and TLS (ServerConfig's fields of the same names)."""
    group = parser.add_argument_group("access, limits and TLS")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (repeatable; also $MRS_API_KEY)")
    group.add_argument("--api-key-file", metavar="FILE", help="more API keys, one per line")
    group.add_argument("--admin-api-key", action="append", default=[], metavar="KEY",
                       help="a key that may also load, unload, add and remove models; with one set, "
                            "only admin keys may (repeatable)")
    group.add_argument("--metrics-need-key", action="store_true", help="/metrics needs a key too")
    group.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser calls from ORIGIN (repeatable; '*' for any); default: CORS off")
    group.add_argument("--max-body", default=ServerConfig.max_body,
                       help="request body cap, e.g. 8MiB (default %(default)s); over it: 413")
    group.add_argument("--max-tokens-limit", type=int, metavar="N",
                       help="cap on max_tokens per request, and its default when a request sets none")
    group.add_argument("--max-n", type=int, metavar="N", help="cap on n (choices) per request")
    group.add_argument("--max-prompt-tokens", type=int, metavar="N", help="cap on a request's prompt tokens")
    group.add_argument("--request-timeout", type=float, metavar="S",
                       help="end a generation still running after S seconds with an error (default: none)")
    group.add_argument("--max-image-size", default=ServerConfig.max_image_size,
                       help="cap on one image's bytes in a chat message (default %(default)s)")
    group.add_argument("--image-fetch-timeout", type=float, default=ServerConfig.image_fetch_timeout_s, metavar="S",
                       help="timeout for fetching an http(s) image URL (default %(default)s s)")
    group.add_argument("--allowed-local-media-path", metavar="DIR",
                       help="let file:// image URLs read files below DIR (default: file:// URLs are refused)")
    group.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    group.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's private key (PEM)")
    life = parser.add_argument_group("model lifecycle")
    life.add_argument("--no-autoload", action="store_true",
                      help="a request to a model that is not loaded gets 503 instead of loading it")
    life.add_argument("--keep-alive", metavar="DURATION",
                      help="unload a model idle this long (5m, 30s, 0; -1: pinned, never unloaded); default: never")
    life.add_argument("--max-loaded-models", type=int, metavar="N",
                      help="evict the least recently used idle model to load another past N")
    life.add_argument("--max-memory", metavar="SIZE",
                      help="evict idle models to keep parameters + KV caches under SIZE (12GiB) or a fraction "
                           "of the device's memory (0.8)")
    life.add_argument("--load-timeout", type=float, default=ServerConfig.load_timeout_s, metavar="S",
                      help="how long a request waits for its model to load (default %(default)s s)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Turn parsed arguments into the typed config; ConfigError names what is wrong."""
    if args.multi_model or args.multi_model_config:
        if args.command:
            raise ConfigError(f"--multi-model takes its models from the JSON file; drop the {args.command!r} subcommand")
        if not args.multi_model_config:
            raise ConfigError("--multi-model needs --multi-model-config <file.json>", param="multi_model_config")
        models = load_multi_model_config(args.multi_model_config)
    elif args.command:
        models = [_single_entry(args)]
    else:
        raise ConfigError("choose a model: a subcommand (plain, gguf, vision-plain) or --multi-model "
                          "--multi-model-config FILE")
    engine = EngineConfig(
        max_batch=args.max_seqs, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
        kv_tokens=args.kv_tokens, kv_memory=args.kv_memory, kv_page_size=args.kv_page_size, kv_dtype=args.kv_dtype,
        prefix_cache=not args.no_prefix_cache, decode_steps=args.decode_steps,
        warmup=not args.no_warmup, compile_in_background=not args.compile_before_serving,
        variant_idle_s=None if args.variant_idle < 0 else args.variant_idle,
    )
    if args.prefill_buckets:
        engine.prefill_buckets = args.prefill_buckets
    config = ServeConfig(
        server=ServerConfig(
            host=args.host, port=args.port, log_level=args.log_level, shutdown_timeout_s=args.shutdown_timeout,
            api_keys=args.api_key, api_key_file=args.api_key_file, admin_api_keys=args.admin_api_key,
            metrics_need_key=args.metrics_need_key, cors_origins=args.cors_origin, max_body=args.max_body,
            max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, max_prompt_tokens=args.max_prompt_tokens,
            request_timeout_s=args.request_timeout, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
            autoload=not args.no_autoload, keep_alive=args.keep_alive, max_loaded_models=args.max_loaded_models,
            max_memory=args.max_memory, load_timeout_s=args.load_timeout, max_image_size=args.max_image_size,
            image_fetch_timeout_s=args.image_fetch_timeout, allowed_local_media_path=args.allowed_local_media_path,
        ),
        engine=engine,
        models=models,
        default_model_id=args.default_model_id,
        interactive=args.interactive,
    )
    check_serve_config(config)
    return config


def _single_entry(args: argparse.Namespace) -> ModelEntry:
    if args.command == "gguf":
        source = ModelSource(kind=GGUF, quantized_model_id=args.quantized_model_id,
                             quantized_filename=args.quantized_filename, tok_model_id=args.tok_model_id)
        # The file name is the informative part of a GGUF source (the dir is often a shared cache).
        model_id = args.quantized_filename or Path(args.quantized_model_id).name
    else:
        kind = PLAIN if args.command == "plain" else VISION_PLAIN
        source = ModelSource(kind=kind, model_id=args.model_id, arch=args.arch,
                             tok_model_id=getattr(args, "tok_model_id", None))
        model_id = args.model_id
    return ModelEntry(
        model_id=model_id, model=source, chat_template=args.chat_template,
        jinja_explicit=args.jinja_explicit, num_device_layers=args.num_device_layers,
        in_situ_quant=args.isq, isq_embeddings=args.isq_embeddings, dtype=args.dtype,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = serve_config_from_args(args)
    except ConfigError as e:
        parser.exit(2, f"mrs-server: error: {e.message}\n")
    from serving.runner import run  # after parsing: a bad command line fails fast without JAX

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
