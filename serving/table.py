"""The model table: every configured model, its status and its engine; routes by request ``model``.

Loading runs off the event loop (startup thread or ``asyncio.to_thread``). A model is
``loading`` -> ``loaded``; ``unload`` stops its engine and drops its weights
(``unloaded``); ``reload`` loads it again (``reloading`` -> ``loaded``). ``failed``
keeps the load error for ``status``. Requests reach only ``loaded`` models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mrs.config.schema import EngineConfig, ModelEntry, ServeConfig
from mrs.errors import ModelNotFound, ModelUnavailable
from mrs.pipeline import Pipeline, load

log = logging.getLogger(__name__)

LOADING, LOADED, UNLOADED, RELOADING, FAILED = "loading", "loaded", "unloaded", "reloading", "failed"
DEFAULT_ALIAS = "default"

Loader = Callable[[ModelEntry, EngineConfig], Pipeline]


@dataclass(eq=False)
class _Row:
    entry: ModelEntry
    status: str = LOADING
    served: Pipeline | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)  # one load/unload at a time


class ModelTable:
    def __init__(self, config: ServeConfig, loader: Loader = load) -> None:
        self._engine_config = config.engine
        self._loader = loader
        self._rows = {entry.model_id: _Row(entry) for entry in config.models}
        self.default_id = config.default_model_id or config.models[0].model_id
        self._aborted = False

    @property
    def ids(self) -> list[str]:
        return list(self._rows)

    # ---- routing ----------------------------------------------------------------------

    def resolve(self, model: str | None) -> str:
        """The id a request's ``model`` field names: omitted or "default" is the default model."""
        if model is None or model == "" or model == DEFAULT_ALIAS:
            return self.default_id
        if model not in self._rows:
            raise ModelNotFound(
                f"the model {model!r} does not exist; available models: {', '.join(self._rows)}",
                param="model",
            )
        return model

    def get(self, model: str | None) -> Pipeline:
        """The served model for a request, or ModelNotFound (404) / ModelUnavailable (503)."""
        model_id = self.resolve(model)
        row = self._rows[model_id]
        served = row.served
        if row.status == LOADED and served is not None:
            return served
        hints = {
            LOADING: "is still loading; retry shortly",
            RELOADING: "is reloading; retry shortly",
            UNLOADED: "is unloaded; POST /v1/models/reload with its model_id to load it",
            FAILED: f"failed to load ({row.error}); POST /v1/models/reload to retry",
        }
        raise ModelUnavailable(f"model {model_id!r} {hints.get(row.status, 'is not available')}", param="model")

    def status(self, model_id: str) -> str:
        return self._row(model_id).status

    def created(self, model_id: str) -> int:
        return self._row(model_id).created

    def error(self, model_id: str) -> str | None:
        return self._row(model_id).error

    def memory(self, model_id: str) -> dict[str, int] | None:
        """A loaded model's parameter and KV cache bytes (its engine's measurement); else None."""
        served = self._row(model_id).served
        if served is None:
            return None
        stats = served.engine.stats()
        return {"param_bytes": stats["param_bytes"], "kv_cache_bytes": stats["kv_cache_bytes"]}

    @property
    def ready(self) -> bool:
        """True once startup loading is over and every model is loaded."""
        return all(row.status == LOADED for row in self._rows.values())

    # ---- lifecycle (blocking; call from threads) ---------------------------------------

    def load_all(self) -> None:
        """Load every model in order, with progress in the log. A model that fails stays
        ``failed`` with its error while the others serve; raises only when none loaded."""
        total = len(self._rows)
        for i, (model_id, row) in enumerate(self._rows.items(), 1):
            if self._aborted:
                raise ModelUnavailable("startup loading stopped: the server is shutting down")
            log.info("[%d/%d] loading model %r from %s", i, total, model_id, _describe(row.entry))
            try:
                self._load(row, LOADING)
            except Exception as exc:
                log.error("[%d/%d] model %r failed to load: %s", i, total, model_id, getattr(exc, "message", exc))
                continue
            log.info("[%d/%d] model %r ready (%s)", i, total, model_id, _summary(row.served))
        failed = {m: row.error for m, row in self._rows.items() if row.status == FAILED}
        if len(failed) == total:
            raise ModelUnavailable("no model could be loaded: " + "; ".join(f"{m}: {e}" for m, e in failed.items()))
        log.info("%d of %d models loaded; default model: %r%s", total - len(failed), total, self.default_id,
                 f"; failed: {', '.join(failed)}" if failed else "")

    def abort_loading(self) -> None:
        """Make ``load_all`` stop before its next model (shutdown during startup)."""
        self._aborted = True

    def reload(self, model_id: str) -> str:
        row = self._row(model_id)
        with row.lock:
            if row.status == LOADED:
                return LOADED
            log.info("reloading model %r", model_id)
            self._load(row, RELOADING, locked=True)
            log.info("model %r reloaded (%s)", model_id, _summary(row.served))
        return LOADED

    def unload(self, model_id: str) -> str:
        row = self._row(model_id)
        with row.lock:
            served, row.served = row.served, None
            if row.status in (LOADED, FAILED):
                row.status = UNLOADED
            if served is not None:
                served.close()
                log.info("model %r unloaded", model_id)
        return row.status

    def shutdown(self) -> None:
        """Stop every engine; a model still loading (its lock held) is left to the loader."""
        for model_id, row in self._rows.items():
            if row.lock.acquire(blocking=False):
                row.lock.release()
                self.unload(model_id)

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for model_id, row in self._rows.items():
            served = row.served
            stats = served.engine.stats() if served is not None else {}
            out[model_id] = {
                "status": row.status,
                "queue_depth": stats.get("queue_depth", 0),
                "busy_slots": stats.get("slots_busy", 0),
                "slots": stats.get("slots_total", 0),
            }
        return out

    # ---- internals --------------------------------------------------------------------

    def _row(self, model_id: str) -> _Row:
        try:
            return self._rows[model_id]
        except KeyError:
            raise ModelNotFound(
                f"the model {model_id!r} does not exist; available models: {', '.join(self._rows)}",
                param="model_id",
            ) from None

    def _load(self, row: _Row, status: str, locked: bool = False) -> None:
        if not locked:
            with row.lock:
                return self._load(row, status, locked=True)
        row.status, row.error = status, None
        try:
            row.served = self._loader(row.entry, self._engine_config)
        except BaseException as exc:
            row.status, row.error = FAILED, str(exc) or type(exc).__name__
            raise
        row.status, row.created = LOADED, int(time.time())


def _describe(entry: ModelEntry) -> str:
    source = entry.model
    if source.kind == "gguf":
        where = f"gguf {source.quantized_model_id}" + (f" / {source.quantized_filename}" if source.quantized_filename else "")
    else:
        where = f"{source.kind} {source.model_id}" + (f" (arch {source.arch})" if source.arch else "")
    extras = [f"dtype {entry.dtype}"] + ([f"isq {entry.in_situ_quant}"] if entry.in_situ_quant else [])
    return f"{where}, {', '.join(extras)}"


def _summary(pipeline: Pipeline) -> str:
    stats = pipeline.engine.stats()
    notes = "".join(f"; {note}" for note in pipeline.checkpoint.notes)  # e.g. which chat template
    return (f"arch {pipeline.config.arch}, context {pipeline.engine.context_limit}, {stats['slots_total']} slots, "
            f"params {_size(stats['param_bytes'])}, KV cache {_size(stats['kv_cache_bytes'])}, "
            f"warm-up {stats['warmup_s']:.1f}s{notes}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"
