"""The one code path after parsing: ``run(ServeConfig)`` serves HTTP (or the terminal chat).

Both front doors (``mrs-server`` and ``mrs serve``) call it. The HTTP server listens
at once (``/health`` answers 503 while models load); models load in a worker thread,
one after the other, with progress in the log. SIGINT/SIGTERM: stop accepting, give
in-flight requests ``server.shutdown_timeout_s``, stop the engines, exit 0.

Once the engines have stopped the process leaves without interpreter teardown
(``_leave``): a daemon thread inside a jaxlib call at finalization (a loader mid-compile,
the keep-alive reaper, an engine finishing a step) is killed by ``pthread_exit`` through
a C++ destructor, and the clean stop ends in SIGABRT ("FATAL: exception not rethrown").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from typing import NoReturn

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from mrs.config.schema import ServeConfig
from mrs.config.validate import check_serve_config
from mrs.errors import ConfigError, MrsError
from serving.app import create_app
from serving.security import Keys
from serving.table import ModelTable, check_entry

log = logging.getLogger("mrs.server")


def run(config: ServeConfig) -> NoReturn:
    """Serve until a signal, then exit the process: 0 after a clean stop, 1 when startup
    failed, 2 for a bad configuration."""
    # force: an import may have put a handler on the root logger already (absl, through
    # orbax-checkpoint, does), which would make basicConfig a no-op and the log silent.
    logging.basicConfig(
        level=config.server.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
    )
    if config.server.log_level.lower() != "debug":
        # orbax-checkpoint narrates each restore of a conversion in ~10 INFO lines through absl;
        # the model table's own lines already say what loaded and how.
        logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        check_serve_config(config)
        for entry in config.models:
            check_entry(entry)
        keys = Keys.from_config(config.server, os.environ)  # the one read of $MRS_API_KEY
        if not config.interactive:
            _check_port(config.server.host, config.server.port)
    except ConfigError as e:
        log.error("%s", e.message)
        _leave(2)
    if config.interactive:
        from serving.interactive import chat_loop

        _leave(chat_loop(config))
    _leave(asyncio.run(_serve(config, keys)))


def _leave(exit_code: int) -> NoReturn:
    """Flush what was written, then exit without finalizing the interpreter (see the module doc)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)


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

        def default_ready() -> None:  # /health turns 200; the other models may still be loading
            app.config["MRS_STARTED"] = True
            log.info("serving on %s://%s:%d (OpenAI API under /v1%s)", "https" if tls else "http",
                     config.server.host, config.server.port, "; API keys required" if keys.enabled else "")

        try:
            table.load_all(on_default_ready=default_ready)
        except MrsError as e:
            log.error("startup failed: %s", e.message)
        except Exception:
            log.exception("startup failed")
        else:
            if not app.config["MRS_STARTED"]:  # the default model failed; the others serve
                default_ready()
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
    # A model mid warm-up is not waited for: XLA cannot be interrupted, and _leave does not join it.
    log.info("server stopped%s", " while a model was still loading" if loader.is_alive() or table.loading else "")
    return exit_code


def _on_signal(stop: asyncio.Event, sig: signal.Signals):
    def handler() -> None:
        if not stop.is_set():
            log.info("%s received: no new requests; in-flight ones get to finish", sig.name)
        stop.set()

    return handler
