"""The one code path after parsing: ``run(ServeConfig)`` serves HTTP (or the terminal chat).

Both front doors (``mrs-server`` and ``mrs serve``) call it. The HTTP server listens
at once (``/health`` answers 503 while models load); models load in a worker thread,
one after the other, with progress in the log. SIGINT/SIGTERM: stop accepting, give
in-flight requests ``server.shutdown_timeout_s``, stop the engines, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from mrs.config.schema import ServeConfig
from mrs.config.validate import check_serve_config
from mrs.errors import ConfigError, MrsError
from mrs.models.registry import ARCHS
from serving.app import create_app
from serving.security import Keys
from serving.table import ModelTable

log = logging.getLogger("mrs.server")


def run(config: ServeConfig) -> int:
    """Serve until a signal; returns the process exit code."""
    logging.basicConfig(
        level=config.server.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.server.log_level.lower() != "debug":
        # orbax-checkpoint narrates each restore of a conversion in ~10 INFO lines through absl;
        # the model table's own lines already say what loaded and how.
        logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        check_serve_config(config)
        _check_archs(config)
        keys = Keys.from_config(config.server, os.environ)  # the one read of $MRS_API_KEY
        if not config.interactive:
            _check_port(config.server.host, config.server.port)
    except ConfigError as e:
        log.error("%s", e.message)
        return 2
    if config.interactive:
        from serving.interactive import chat_loop

        return chat_loop(config)
    return asyncio.run(_serve(config, keys))


def _check_archs(config: ServeConfig) -> None:
    """An unknown ``arch`` is a config error, reported before any model loads."""
    for entry in config.models:
        arch = entry.model.arch
        if arch is not None and arch not in ARCHS:
            raise ConfigError(
                f"model {entry.model_id!r}: unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHS))}",
                param="arch",
            )


def _check_port(host: str, port: int) -> None:
    """Fail before loading anything when the address is taken (hypercorn binds after startup)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}", param="port") from None


async def _serve(config: ServeConfig, keys: Keys) -> int:
    table = ModelTable(config)
    app = create_app(table, config.server, keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal(stop, sig))
    exit_code = 0

    def load_models() -> None:
        """Startup loading, on a daemon thread so a signal during warm-up need not wait for it."""
        nonlocal exit_code
        try:
            table.load_all()
        except MrsError as e:
            log.error("startup failed: %s", e.message)
        except Exception:
            log.exception("startup failed")
        else:
            app.config["MRS_STARTED"] = True
            log.info("serving on %s://%s:%d (OpenAI API under /v1%s)", "https" if tls else "http",
                     config.server.host, config.server.port, "; API keys required" if keys.enabled else "")
            return
        exit_code = 1
        loop.call_soon_threadsafe(stop.set)

    hyper = HypercornConfig()
    hyper.bind = [f"{config.server.host}:{config.server.port}"]
    hyper.graceful_timeout = config.server.shutdown_timeout_s
    hyper.accesslog = logging.getLogger("hypercorn.access") if config.server.log_level == "debug" else None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    tls = bool(config.server.ssl_certfile)
    if tls:
        hyper.certfile, hyper.keyfile = config.server.ssl_certfile, config.server.ssl_keyfile
    loader = threading.Thread(target=load_models, name="mrs-loader", daemon=True)
    loader.start()
    try:
        await hypercorn_serve(app, hyper, shutdown_trigger=stop.wait)
    finally:
        log.info("stopping engines")
        table.abort_loading()
        await asyncio.to_thread(table.shutdown)
    if loader.is_alive():
        # A model is mid warm-up and XLA cannot be interrupted: leave without waiting
        # (and without interpreter teardown racing the compiling thread).
        log.info("server stopped while a model was still loading")
        logging.shutdown()
        os._exit(exit_code)
    log.info("server stopped")
    return exit_code


def _on_signal(stop: asyncio.Event, sig: signal.Signals):
    def handler() -> None:
        if not stop.is_set():
            log.info("%s received: no new requests; in-flight ones get to finish", sig.name)
        stop.set()

    return handler
