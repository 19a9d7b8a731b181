"""The model table (the server's model registry): every configured model, its state, its
engine, and the decisions about loading and unloading. Tested without HTTP.

States: ``loading`` -> ``loaded``; ``unloaded`` (not loaded yet because ``lazy``, unloaded
on request, or expired past its ``keep_alive``); ``evicted`` (unloaded to make room);
``failed`` (the load's error kept for ``status``). A request *leases* the model it uses
for as long as it runs: a leased model is busy, so it neither expires nor is evicted.

Loading runs on its own thread, one load per model at a time: every request for a model
that is loading waits for that one load (``ensure_loaded`` hands all of them the same
future, resolved in arrival order). Before a load, idle unpinned models are evicted least
recently used first while ``max_loaded_models`` or ``max_memory`` would be exceeded; when
every loaded model is busy the load waits for one to go idle, up to ``load_timeout_s``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mrs.config.schema import VISION_PLAIN, EngineConfig, ModelEntry, ServeConfig, ServerConfig, engine_for
from mrs.config.units import parse_duration
from mrs.config.validate import check_entry as check_fields, check_unique_ids
from mrs.errors import ConfigError, InvalidRequest, ModelExists, ModelNotFound, ModelUnavailable
from mrs.heap import release_free_heap
from mrs.loading.estimate import estimate_bytes
from mrs.models.registry import ARCHS, VISION_ARCHS
from mrs.pipeline import Pipeline, load
from serving.memory import MemoryBudget

# What /v1/models/status reports of a loaded model's engine stats.
MEMORY_STATS = ("param_bytes", "kv_cache_bytes", "kv_resident_bytes", "kv_pages_total", "kv_pages_used",
                "kv_pages_cached", "kv_page_size")
log = logging.getLogger(__name__)

LOADING, LOADED, UNLOADED, EVICTED, FAILED = "loading", "loaded", "unloaded", "evicted", "failed"
DEFAULT_ALIAS = "default"
FOREVER = None  # a keep_alive of "-1": never expires, never evicted (pinned)
# A model just loaded is not expired for this long, so the requests that waited for the
# load take it first (with keep_alive 0 it was unloaded before they could, and reloaded, forever).
LOAD_GRACE_S = 2.0

Loader = Callable[[ModelEntry, EngineConfig], Pipeline]


class Lease:
    """One request's hold on a loaded model; ``release`` (idempotent) when the request ends."""

    def __init__(self, served: Pipeline, release: Callable[[], None]) -> None:
        self.served = served
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Pipeline:
        return self.served

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class _Row:
    entry: ModelEntry
    keep_alive_s: float | None  # from the entry or the server; None = forever (pinned)
    pinned: bool
    status: str = UNLOADED
    served: Pipeline | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = field(default_factory=time.time)
    leases: int = 0
    loading: concurrent.futures.Future | None = None  # the load in flight
    bytes: int | None = None  # measured once loaded (params + KV), else estimated before a load
    loaded_at: float = 0.0


def capabilities(entry: ModelEntry) -> list[str]:
    """What a model takes, Ollama's way: every model completes text; a VisionPlain one also reads images."""
    return ["completion", "vision"] if entry.model.kind == VISION_PLAIN else ["completion"]


class ModelTable:
    def __init__(self, config: ServeConfig, loader: Loader = load,
                 estimator: Callable[[ModelEntry, EngineConfig], int] = estimate_bytes) -> None:
        self._engine_config = config.engine
        self._server: ServerConfig = config.server
        self._loader = loader
        self._estimator = estimator
        self._budget = MemoryBudget.from_config(config.server)
        self._lock = threading.Condition()  # guards every row's state; notified when a model goes idle
        self._rows: dict[str, _Row] = {}
        for entry in config.models:
            self._rows[entry.model_id] = self._new_row(entry)
        self.default_id = config.default_model_id or config.models[0].model_id
        self._aborted = False
        self._stopping = threading.Event()
        self.events: dict[str, dict[str, float]] = {}  # per model: loads, unloads, evictions, load_seconds
        self._reaper = threading.Thread(target=self._expire_loop, name="mrs-keep-alive", daemon=True)
        self._reaper.start()

    def _new_row(self, entry: ModelEntry) -> _Row:
        return _Row(entry, *self._keep_alive(entry))

    def _keep_alive(self, entry: ModelEntry) -> tuple[float | None, bool]:
        """The configured idle time-to-live (the entry's, else the server's) and whether it pins."""
        text = entry.keep_alive if entry.keep_alive is not None else self._server.keep_alive
        seconds = parse_duration(text, "keep_alive") if text is not None else FOREVER
        return seconds, text is not None and seconds is FOREVER

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._rows)

    # ---- routing ----------------------------------------------------------------------

    def resolve(self, model: str | None) -> str:
        """The id a request's ``model`` field names: omitted or "default" is the default model."""
        if model is None or model == "" or model == DEFAULT_ALIAS:
            return self.default_id
        with self._lock:
            if model not in self._rows:
                raise ModelNotFound(
                    f"the model {model!r} does not exist; available models: {', '.join(self._rows)}",
                    param="model",
                )
        return model

    def get(self, model: str | None) -> Pipeline:
        """The served model, or ModelNotFound (404) / ModelUnavailable (503) saying why not."""
        model_id = self.resolve(model)
        with self._lock:
            row = self._rows[model_id]
            if row.status == LOADED and row.served is not None:
                return row.served
        raise self._unavailable(model_id, row)

    def _unavailable(self, model_id: str, row: _Row) -> ModelUnavailable:
        hints = {
            LOADING: "is still loading; retry shortly",
            UNLOADED: "is unloaded; POST /v1/models/reload with its model_id to load it",
            EVICTED: "was evicted to make room; POST /v1/models/reload with its model_id to load it",
            FAILED: f"failed to load ({row.error}); POST /v1/models/reload to retry",
        }
        return ModelUnavailable(f"model {model_id!r} {hints.get(row.status, 'is not available')}", param="model")

    def lease(self, model: str | None, keep_alive: str | float | None = None) -> "Lease":
        """Hold a loaded model for one request (it is busy until ``release``). ``keep_alive``
        (the request's, Ollama's field) replaces the model's idle time-to-live from now on."""
        model_id = self.resolve(model)
        with self._lock:
            row = self._rows[model_id]
            if row.status != LOADED or row.served is None:
                raise self._unavailable(model_id, row)
            if keep_alive is not None:
                try:
                    row.keep_alive_s = parse_duration(keep_alive, "keep_alive")
                except ConfigError as e:
                    raise InvalidRequest(e.message, param="keep_alive") from None
                row.pinned = row.keep_alive_s is FOREVER
            row.leases += 1
            return Lease(row.served, lambda: self._release(row))

    def _release(self, row: _Row) -> None:
        with self._lock:
            row.leases -= 1
            row.last_used = time.time()
            self._lock.notify_all()  # a waiting load may evict it now; the reaper may expire it

    def ensure_loaded(self, model: str | None, autoload: bool | None = None) -> concurrent.futures.Future:
        """A future for the model's pipeline: done if it is loaded, else the one load in flight
        (started here when ``autoload``, the server's setting by default). Errors: the
        future raises ModelUnavailable; ModelNotFound raises at once."""
        model_id = self.resolve(model)
        autoload = self._server.autoload if autoload is None else autoload
        with self._lock:
            row = self._rows[model_id]
            if row.status == LOADED and row.served is not None:
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(row.served)
                return done
            if row.loading is not None:
                return row.loading
            if not autoload or row.status == FAILED:
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(self._unavailable(model_id, row))
                return failed
            return self._start_load(row, "requested")

    def _start_load(self, row: _Row, reason: str) -> concurrent.futures.Future:
        """Start ``row``'s load on a thread (caller holds the lock)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        row.loading, row.status, row.error = future, LOADING, None
        threading.Thread(target=self._load, args=(row, future, reason), name=f"mrs-load-{row.entry.model_id}",
                         daemon=True).start()
        return future

    # ---- state for the API ------------------------------------------------------------

    def status(self, model_id: str) -> str:
        return self._row(model_id).status

    def created(self, model_id: str) -> int:
        return self._row(model_id).created

    def error(self, model_id: str) -> str | None:
        return self._row(model_id).error

    def memory(self, model_id: str) -> dict[str, int] | None:
        """A loaded model's parameter and KV cache bytes (its engine's measurement) and its KV
        pool's pages (total, in use, tokens per page); else None."""
        served = self._row(model_id).served
        if served is None:
            return None
        stats = served.stats()
        return {key: stats[key] for key in MEMORY_STATS}

    def card(self, model_id: str) -> dict[str, Any]:
        """The mrs fields of a model's card: status, pinned, last_used, expires_at, memory, and
        once loaded, how many of its step variants are compiled."""
        row = self._row(model_id)
        with self._lock:
            expires = None
            if row.status == LOADED and row.keep_alive_s is not FOREVER:
                expires = None if row.leases else int(row.last_used + row.keep_alive_s)
            card = {"status": row.status, "pinned": row.pinned, "last_used": int(row.last_used),
                    "expires_at": expires, "capabilities": capabilities(row.entry)}
        if row.error:
            card["error"] = row.error
        memory = self.memory(model_id)
        card["memory"] = memory or ({"estimated_bytes": row.bytes} if row.bytes else None)
        served = row.served  # read once: an unload may clear it meanwhile
        if served is not None:  # step variants compiled so far (the rest compile in the background), and held
            stats = served.stats()
            card["compiled"] = {"variants": stats["variants_compiled"], "total": stats["variants_total"],
                                "in_memory": stats["variants_in_memory"]}
        return card

    @property
    def loading(self) -> bool:
        """Some model is loading (its thread may be deep in an XLA compile)."""
        with self._lock:
            return any(row.loading is not None for row in self._rows.values())

    def is_ready(self) -> bool:
        """The default model serves (the others may still be loading)."""
        return self.status(self.default_id) == LOADED

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            rows = list(self._rows.items())
        for model_id, row in rows:
            served = row.served
            stats = served.stats() if served is not None else {}
            out[model_id] = {
                "status": row.status,
                "queue_depth": stats.get("queue_depth", 0),
                "busy_slots": stats.get("slots_busy", 0),
                "slots": stats.get("slots_total", 0),
                "loaded_bytes": stats.get("param_bytes", 0) + stats.get("kv_cache_bytes", 0),
                **self.events.get(model_id, {}),
            }
        return out

    # ---- lifecycle (blocking; call from threads) ---------------------------------------

    def load_all(self, on_default_ready: Callable[[], None] | None = None) -> None:
        """Load every model that is not ``lazy``, the default first, with progress in the log.
        A model that fails stays ``failed`` with its error while the others serve; raises
        only when none loaded."""
        order = sorted(self.ids, key=lambda m: m != self.default_id)
        eager = [m for m in order if not self._rows[m].entry.lazy]
        for i, model_id in enumerate(eager, 1):
            if self._aborted:
                raise ModelUnavailable("startup loading stopped: the server is shutting down")
            row = self._rows[model_id]
            log.info("[%d/%d] loading model %r from %s", i, len(eager), model_id, _describe(row.entry))
            with self._lock:
                future = row.loading or self._start_load(row, "start-up")
            try:
                served = future.result()
            except Exception as exc:
                log.error("[%d/%d] model %r failed to load: %s", i, len(eager), model_id, getattr(exc, "message", exc))
            else:
                log.info("[%d/%d] model %r ready (%s)", i, len(eager), model_id, _summary(served))
            if model_id == self.default_id and on_default_ready is not None and self.is_ready():
                on_default_ready()
                on_default_ready = None
        failed = [m for m in eager if self._rows[m].status == FAILED]
        if eager and len(failed) == len(eager):
            raise ModelUnavailable("no model could be loaded: " +
                                   "; ".join(f"{m}: {self._rows[m].error}" for m in failed))
        lazy = [m for m in order if self._rows[m].entry.lazy]
        log.info("%d of %d models loaded; default model: %r%s%s", len(eager) - len(failed), len(order),
                 self.default_id, f"; failed: {', '.join(failed)}" if failed else "",
                 f"; lazy (loaded on first use): {', '.join(lazy)}" if lazy else "")
        if on_default_ready is not None and self._rows[self.default_id].status != FAILED:
            on_default_ready()  # a lazy default model: it loads with the first request

    def abort_loading(self) -> None:
        """Make ``load_all`` stop before its next model (shutdown during startup)."""
        self._aborted = True

    def reload(self, model_id: str) -> str:
        """Load a model that is not loaded (retrying a failed one) and wait for it."""
        row = self._row(model_id)
        with self._lock:
            if row.status == LOADED:
                return LOADED
            future = row.loading or self._start_load(row, "reload")
        try:
            future.result()
        except ModelUnavailable:
            pass  # the row is failed with its error, which status reports
        return row.status

    def unload(self, model_id: str, reason: str = "unload request", status: str = UNLOADED) -> str:
        """Stop a model's engine and drop its weights; requests still running on it end
        ``cancelled`` (an unload is an order; expiry and eviction only pick idle models)."""
        row = self._row(model_id)
        with self._lock:
            served, row.served = row.served, None
            if row.status in (LOADED, FAILED):
                row.status = status
            # a request's keep_alive lasts until the model unloads; a new load starts from the configured one
            row.keep_alive_s, row.pinned = self._keep_alive(row.entry)
        if served is not None:
            served.close()
            self._count(model_id, "evictions" if status == EVICTED else "unloads")
            log.info("model %r unloaded (%s)", model_id, reason)
            del served  # the last reference to its weights and KV pool: they are freed here,
            release_free_heap()  # and their heap pages go back to the OS (Gemma 3: 438 MiB)
        return row.status

    def add(self, entry: ModelEntry, load_now: bool = True) -> concurrent.futures.Future | None:
        """Add a model at runtime (and start loading it); ModelExists if the id is taken."""
        with self._lock:
            if entry.model_id in self._rows or entry.model_id == DEFAULT_ALIAS:
                raise ModelExists(f"a model with model_id {entry.model_id!r} already exists", param="model_id")
            check_unique_ids([*[r.entry for r in self._rows.values()], entry], "models")
            row = self._rows[entry.model_id] = self._new_row(entry)
            log.info("model %r added (%s)", entry.model_id, _describe(entry))
            return self._start_load(row, "added") if load_now else None

    def remove(self, model_id: str) -> None:
        """Forget a model: new requests get 404 at once; running ones finish first."""
        if model_id == self.default_id:
            raise InvalidRequest(f"{model_id!r} is the default model and cannot be removed", param="model_id")
        row = self._row(model_id)
        with self._lock:
            del self._rows[model_id]
            while row.leases:
                self._lock.wait()
            future = row.loading
        if future is not None:  # a load in flight: let it end, then drop what it loaded
            concurrent.futures.wait([future])
            future = None  # its result is the pipeline: nothing here may hold it when the heap is trimmed
        with self._lock:
            served, row.served = row.served, None
        if served is not None:
            served.close()
            self._count(model_id, "unloads")
            del served  # as in unload: freed, then the heap trimmed
            release_free_heap()
        log.info("model %r removed", model_id)

    def shutdown(self) -> None:
        """Stop every engine; a model still loading is left to its loader thread."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
            rows = list(self._rows.items())
        for model_id, row in rows:
            if row.loading is None:
                self.unload(model_id, "server stopping")

    # ---- internals --------------------------------------------------------------------

    def _row(self, model_id: str) -> _Row:
        with self._lock:
            try:
                return self._rows[model_id]
            except KeyError:
                raise ModelNotFound(
                    f"the model {model_id!r} does not exist; available models: {', '.join(self._rows)}",
                    param="model_id",
                ) from None

    def _count(self, model_id: str, event: str, amount: float = 1) -> None:
        with self._lock:
            counts = self.events.setdefault(model_id, {"loads": 0, "unloads": 0, "evictions": 0, "load_seconds": 0.0})
            counts[event] += amount

    def _load(self, row: _Row, future: concurrent.futures.Future, reason: str) -> None:
        model_id = row.entry.model_id
        begin = time.perf_counter()
        try:
            engine = engine_for(row.entry, self._engine_config)
            self._make_room(row, engine)
            served = self._loader(row.entry, engine)
        except BaseException as exc:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            with self._lock:
                row.status, row.error, row.loading = FAILED, message, None
                self._lock.notify_all()
            if reason != "start-up":  # load_all reports those with its progress lines
                log.error("model %r failed to load (%s): %s", model_id, reason, message)
            future.set_exception(ModelUnavailable(f"model {model_id!r} failed to load ({message})", param="model"))
            return
        stats = served.stats()
        with self._lock:
            row.served, row.status, row.loading = served, LOADED, None
            row.created, row.last_used, row.loaded_at = int(time.time()), time.time(), time.time()
            row.bytes = stats["param_bytes"] + stats["kv_cache_bytes"]
            self._count(model_id, "loads")
            self._count(model_id, "load_seconds", time.perf_counter() - begin)
            self._lock.notify_all()
        if reason != "start-up":
            log.info("model %r loaded (%s; %s)", model_id, reason, _summary(served))
        future.set_result(served)

    def _make_room(self, row: _Row, engine: EngineConfig) -> None:
        """Evict idle unpinned models, least recently used first, until ``row`` fits the
        count and memory limits; wait for busy ones to go idle up to the load timeout."""
        count_limit = self._server.max_loaded_models
        if count_limit is None and not self._budget.limited:
            return
        need = row.bytes or (self._estimator(row.entry, engine) if self._budget.limited else 0)
        row.bytes = row.bytes or need or None
        if self._budget.limited and need > self._budget.total:
            raise ModelUnavailable(
                f"model {row.entry.model_id!r} needs about {_size(need)}, more than the whole memory budget "
                f"of {_size(self._budget.total)} (--max-memory)", param="model")
        deadline = time.monotonic() + self._server.load_timeout_s
        with self._lock:
            while True:
                loaded = [r for r in self._rows.values() if r is not row and r.status in (LOADED, LOADING)]
                over_count = count_limit is not None and len(loaded) + 1 > count_limit
                used = sum(r.bytes or 0 for r in loaded)
                over_memory = self._budget.limited and used + need > self._budget.total
                if not (over_count or over_memory):
                    return
                idle = [r for r in loaded if r.status == LOADED and not r.leases and not r.pinned]
                if idle:
                    victim = min(idle, key=lambda r: r.last_used)
                    why = (f"to make room for {row.entry.model_id!r}: "
                           + (f"over --max-loaded-models {count_limit}" if over_count else
                              f"{_size(used + need)} would exceed --max-memory {_size(self._budget.total)}"))
                    self._lock.release()
                    try:
                        self.unload(victim.entry.model_id, why, status=EVICTED)
                    finally:
                        self._lock.acquire()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelUnavailable(
                        f"no room to load {row.entry.model_id!r}: every loaded model is busy or pinned "
                        f"(waited {self._server.load_timeout_s:g} s)", param="model")
                self._lock.wait(left)

    def _expire_loop(self) -> None:
        """Unload idle models past their keep_alive; sleeps until the next expiry or a change."""
        while not self._stopping.is_set():
            now, expired, wake = time.time(), [], 60.0
            with self._lock:
                for model_id, row in self._rows.items():
                    if row.status != LOADED or row.leases or row.keep_alive_s is FOREVER:
                        continue
                    left = max(row.last_used + row.keep_alive_s, row.loaded_at + LOAD_GRACE_S) - now
                    if left <= 0:
                        expired.append((model_id, row.keep_alive_s))
                    else:
                        wake = min(wake, left)
                if not expired:
                    self._lock.wait(wake)
            for model_id, ttl in expired:
                self.unload(model_id, f"idle past its keep_alive of {ttl:g} s")


def check_entry(entry: ModelEntry) -> None:
    """An entry's fields and its ``arch``, before anything loads (ConfigError naming the field)."""
    check_fields(entry)
    arch = entry.model.arch
    if arch is not None and arch not in ARCHS:
        raise ConfigError(
            f"model {entry.model_id!r}: unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHS))}",
            param="arch",
        )
    if entry.model.kind == VISION_PLAIN and arch is not None and arch not in VISION_ARCHS:
        raise ConfigError(f"model {entry.model_id!r}: architecture {arch!r} has no vision model; vision "
                          f"architectures: {', '.join(sorted(VISION_ARCHS))}", param="arch")


def _describe(entry: ModelEntry) -> str:
    source = entry.model
    if source.kind == "gguf":
        where = f"gguf {source.quantized_model_id}" + (f" / {source.quantized_filename}" if source.quantized_filename else "")
    else:
        where = f"{source.kind} {source.model_id}" + (f" (arch {source.arch})" if source.arch else "")
    extras = [f"dtype {entry.dtype}"] + ([f"isq {entry.in_situ_quant}"] if entry.in_situ_quant else [])
    return f"{where}, {', '.join(extras)}"


def _summary(pipeline: Pipeline) -> str:
    stats = pipeline.stats()
    notes = "".join(f"; {note}" for note in pipeline.notes)  # e.g. which chat template
    compiled, total = stats["variants_compiled"], stats["variants_total"]
    rest = ", the rest compiling in the background" if compiled < total else ""
    return (f"arch {pipeline.config.arch}, context {pipeline.context_limit}, {stats['slots_total']} slots, "
            f"params {_size(stats['param_bytes'])}, KV cache {_size(stats['kv_cache_bytes'])} "
            f"({stats['kv_pages_total']} pages of {stats['kv_page_size']} tokens), "
            f"warm-up {stats['warmup_s']:.1f}s ({compiled} of {total} step variants{rest}){notes}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"
