"""Compiled step executables kept on disk, so that a restart neither traces nor lowers.

JAX's persistent cache (``mrs.compile_cache``) saves XLA's compile but finds an entry by
the lowered module: each start still traces and lowers every step variant before it can
look (a warm SmolLM2 decode variant: 1.2 s tracing, 0.6 s lowering, 0.6 s loading). This
cache finds an executable by what determines it instead: mrs's own source (Python and
kernel sources), JAX's version and configuration, the backend, its devices and the CPU,
the step's owner (``fingerprint``: its model config and engine geometry) and the types
of the step's inputs. A hit only loads the executable.

Entries live under JAX's cache directory, one folder per version of mrs's source; the
``KEPT_VERSIONS`` most recently used are kept. Steps whose inputs span several devices
(a mesh) are not stored. Neither is an executable that JAX itself read from its cache:
XLA:CPU does not serialize such a one whole (it fails when run), so only executables
compiled in this process are written. So that JAX's cache does not serve a step this one
misses (after an upgrade of mrs, say), a step's jitted function carries mrs's source
version in its name (``versioned``), which JAX's cache keys by.

Loading runs what the entry holds, as JAX's cache does: the folder must be the user's own.
Entries can be read ahead of the step that asks for them (``prefetch``, which
``mrs.engine.warm_start`` drives); ``recording`` notes which entries a thread used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable

import mrs
from mrs.quant import native

log = logging.getLogger(__name__)

FOLDER = "mrs-executables"
KEPT_VERSIONS = 3  # source versions whose entries stay (the newest used)
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_thread = threading.local()  # whether JAX's cache served the compile running on this thread; its recording
_prefetched: dict[str, Future[Any]] = {}  # entry -> its executable, being read ahead of use
_prefetched_lock = threading.Lock()


@functools.cache
def _source_digest() -> str:
    """mrs's source, Python and native: any change may change a traced step."""
    root = Path(mrs.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc", ".h")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def versioned(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` named after mrs's source version too (its lowered module's name, part of JAX's
    cache key): JAX's cache then holds a step only for this version of mrs."""
    @functools.wraps(fn)  # jax.jit reads the signature through __wrapped__ (static and donated arguments)
    def step(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    step.__name__ = step.__qualname__ = f"{fn.__name__}_{_source_digest()}"
    return step


@functools.cache
def _machine() -> tuple[Any, ...]:
    """What shapes a compiled step and stays fixed for the process: versions, backend, devices, CPU."""
    backend = jax.devices()[0].client
    return (jax.__version__, jaxlib.__version__, jax.default_backend(), backend.platform_version,
            [(d.id, d.device_kind) for d in jax.devices()], sorted(native.cpu_flags()))


def _environment() -> tuple[Any, ...]:
    """What besides mrs's source shapes a compiled step (the switches read on each compile:
    tests and callers change the native kernels or JAX's options at run time)."""
    options = {name: value for name, value in jax.config.values.items() if "cache" not in name}
    return (_machine(), native.available(), native.kernels_allowed(), os.environ.get("XLA_FLAGS", ""),
            sorted((name, repr(value)) for name, value in options.items()))


def _input_spec(x: Any) -> tuple[Any, ...]:
    """An input's type: shape, dtype, weak type and placement (when committed)."""
    if not hasattr(x, "shape"):  # a Python scalar: traced by its type
        return (type(x).__name__,)
    # An array says whether it is committed; a ShapeDtypeStruct's sharding is a placement.
    committed = x.committed if hasattr(x, "committed") else getattr(x, "sharding", None) is not None
    return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
            repr(x.sharding) if committed else None)


def _single_device(x: Any) -> bool:
    sharding = getattr(x, "sharding", None)
    return sharding is None or len(sharding.device_set) == 1


def version_folder() -> Path | None:
    """This source version's folder in the persistent cache (None without one)."""
    root = jax.config.jax_compilation_cache_dir
    return None if not root else Path(root) / FOLDER / _source_digest()


def key(fingerprint: str, args: tuple[Any, ...], kwargs: dict[str, Any], static: frozenset[str]) -> str | None:
    """The entry for a step (its owner's ``fingerprint``) called with ``args`` and ``kwargs``
    (arrays or ``jax.ShapeDtypeStruct``s; ``static`` keywords by value); None when not
    cached (no cache directory, or inputs on several devices)."""
    dynamic = {k: v for k, v in kwargs.items() if k not in static}
    leaves, tree = jax.tree.flatten((args, dynamic))
    if version_folder() is None or not all(map(_single_device, leaves)):
        return None
    described = (fingerprint, _environment(), str(tree), [_input_spec(leaf) for leaf in leaves],
                 sorted((k, repr(v)) for k, v in kwargs.items() if k in static))
    return hashlib.sha256(repr(described).encode()).hexdigest()


def load_or_compile(entry: str | None, compile_step: Callable[[], Any]) -> tuple[Any, bool]:
    """The executable stored under ``entry``, else ``compile_step()``'s (then stored); and
    whether the entry now holds it (so that it can be dropped from memory and loaded again)."""
    if entry is None:
        return compile_step(), False
    folder = version_folder()
    assert folder is not None
    path = folder / f"{entry}.bin"
    executable = _prefetched_executable(entry) or _load(path)
    if executable is not None:
        _record(entry)
        return executable, True
    _thread.jax_cache_hit = False
    executable = compile_step()
    kept = not _thread.jax_cache_hit and _store(path, executable)
    if kept:
        _record(entry)
    return executable, kept


@contextlib.contextmanager
def recording(entries: list[str]) -> Iterator[None]:
    """Append to ``entries`` each entry this thread loads or stores meanwhile."""
    _thread.recording = entries
    try:
        yield
    finally:
        _thread.recording = None


def _record(entry: str) -> None:
    if (entries := getattr(_thread, "recording", None)) is not None:
        entries.append(entry)


def prefetch(entries: list[str]) -> None:
    """Start reading ``entries`` on background threads (one per core: loading is C++ that lets
    go of the GIL), for ``load_or_compile`` to take when a step asks for one."""
    folder = version_folder()
    with _prefetched_lock:
        entries = [e for e in entries if e not in _prefetched]
        if folder is None or not entries:
            return
        native.available()  # the kernels the steps call are registered before one loads
        pool = ThreadPoolExecutor(min(len(entries), os.cpu_count() or 1), thread_name_prefix="mrs-prefetch")
        for entry in entries:
            _prefetched[entry] = pool.submit(_load, folder / f"{entry}.bin")
        pool.shutdown(wait=False)


def drop_prefetched(entries: list[str]) -> None:
    """Forget what was read ahead for ``entries`` and not asked for (its memory goes)."""
    with _prefetched_lock:
        for entry in entries:
            _prefetched.pop(entry, None)


def _prefetched_executable(entry: str) -> Any:
    with _prefetched_lock:
        future = _prefetched.pop(entry, None)
    return None if future is None else future.result()


def _load(path: Path) -> Any:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        os.utime(path.parent)  # marks the version as used (see _prune)
        serialized, in_tree, out_tree, (platform, device_ids) = pickle.loads(zlib.decompress(blob))
        # On its own devices: by default JAX loads it for all the default backend's devices,
        # and it then wants one shard of each input per device.
        by_id = {d.id: d for d in jax.devices(platform)}
        return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree, backend=platform,
                                                         execution_devices=[by_id[i] for i in device_ids])
    except Exception as error:  # a damaged or foreign entry: compile instead, and replace it
        log.warning("ignoring the cached executable %s: %s", path, error)
        path.unlink(missing_ok=True)
        return None


def _store(path: Path, executable: Any) -> bool:
    """Write ``executable`` under ``path``; whether it was written."""
    try:
        devices = executable.runtime_executable().local_devices()
        placement = devices[0].platform, [d.id for d in devices]
        blob = zlib.compress(pickle.dumps((*serialize_executable.serialize(executable), placement)), 1)
        new_version = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as file:  # whole or absent
            file.write(blob)
        os.replace(file.name, path)
        if new_version:
            _prune(path.parent.parent)
        return True
    except Exception as error:  # not serializable (constants, unpicklable trees) or not writable: only slower
        log.debug("executable not cached (%s): %s", path.name, error)
        return False


def _prune(root: Path) -> None:
    """Keep the ``KEPT_VERSIONS`` most recently used source versions' entries."""
    versions = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in versions[KEPT_VERSIONS:]:
        shutil.rmtree(stale, ignore_errors=True)


def _note_jax_cache_hit(event: str, **_: Any) -> None:
    if event == _JAX_CACHE_HIT:
        _thread.jax_cache_hit = True


jax.monitoring.register_event_listener(_note_jax_cache_hit)
