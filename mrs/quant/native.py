"""Native CPU kernels (``csrc/*.cc``): built on first use, called from jit as XLA FFI targets.

- ``qmatmul``: ``x @ w.T`` for one QArray ``w`` or several in one call, reading the packed
  blocks directly (``qarray.linears`` uses it for up to ``MAX_ROWS`` activation rows; prefill's
  512-token chunks stay with XLA, which dequantizes once per call and runs a GEMM).
- ``decode_attention``: one query per slot over the paged KV cache, read in place
  (``mrs.models.layers.cached_attention`` uses it for decode steps).

The sources are compiled once per machine with the system's C++ compiler against
the XLA FFI headers that ship with jaxlib, cached under ``~/.cache/mrs/kernels``
(keyed by the sources, jaxlib's version, the compiler and the CPU's flags), and
registered for the CPU platform. Callers dispatch with ``cpu_or_xla`` (over
``lax.platform_dependent``), so other backends keep the XLA path or, given one, a GPU
kernel (``mrs.models.paged_attention``). Where the kernels cannot be built (not x86-64
with AVX2/FMA/F16C, no compiler) or ``MRS_NATIVE_KERNELS=0`` is set, callers keep
XLA's own ops: the same numbers to float rounding, slower at batch 1.

Steps traced for a device mesh (``tensor_parallel``) trace under ``xla_only()``: the
kernels (these and the Pallas ones) have no SPMD partitioning rule, so the partitioner
would gather every sharded weight onto every device before each call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cc"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
CACHE_DIR = Path.home() / ".cache" / "mrs" / "kernels"
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
# Rows of activations up to which qmatmul beats XLA's dequantize-then-GEMM: XLA expands every
# weight to float32 on each call; the kernel dequantizes four rows at a time into a panel
# that multiplies all the activations, level with XLA's GEMM from about 512 rows
# (tools/bench_qmatmul.py). So prefill chunks up to 256 tokens run it too.
MAX_ROWS = 256
# FFI target name -> the handler symbol the library exports.
TARGETS = {"mrs_qmatmul": "MrsQMatmul", "mrs_decode_attention": "MrsDecodeAttention"}
_tracing = threading.local()  # per thread: each model's engine traces its steps in its own thread


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(compiler: str, out_dir: Path = CACHE_DIR) -> Path:
    """Compile the kernels into one shared library (or reuse the cached one); its path."""
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    digest = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES + HEADERS), jaxlib.__version__.encode(), compiler.encode(),
                 " ".join(flags).encode(), " ".join(sorted(cpu_flags())).encode()]:
        digest.update(part + b"\0")
    library = out_dir / f"mrs-kernels-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # build aside, then rename: safe across processes
        partial = Path(tmp) / library.name
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling {', '.join(p.name for p in SOURCES)} failed:\n{result.stderr[-4000:]}")
        os.replace(partial, library)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (tried once per process)."""
    if os.environ.get("MRS_NATIVE_KERNELS", "1") == "0":
        return False
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    compiler = _compiler()
    if platform.machine() not in ("x86_64", "AMD64") or missing or compiler is None:
        log.info("native CPU kernels off (cpu %s, missing flags %s, compiler %s); using XLA's ops",
                 platform.machine(), missing or "none", compiler)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
    except (OSError, RuntimeError) as error:
        log.warning("native CPU kernels unavailable, using XLA's ops: %s", error)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def kernels_allowed() -> bool:
    """Whether code being traced now may call custom kernels (native or Pallas): not inside ``xla_only()``."""
    return not getattr(_tracing, "xla_only", False)


def enabled() -> bool:
    """Whether code being traced now should call the native kernels: built, and allowed."""
    return kernels_allowed() and available()


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
    """Trace with XLA's ops only (in this thread; no native or Pallas kernels), e.g. for steps
    partitioned over a mesh."""
    before = getattr(_tracing, "xla_only", False)
    _tracing.xla_only = True
    try:
        yield
    finally:
        _tracing.xla_only = before


def cpu_or_xla(native: Any, xla: Any, *args: Any, gpu: Any = None) -> Any:
    """``native(*args)`` when compiling for CPU, ``gpu(*args)`` (if given) for CUDA and ROCm,
    ``xla(*args)`` for other backends.

    Without an accelerator every step compiles for the CPU, so only the native branch is
    traced: ``platform_dependent`` traces every branch (SmolLM2's warm-up traced for 44.6 s
    with two, 25-28 s with one; the persistent cache saves compiling, not tracing). It
    lowers only the branch of the platform compiled for, so a GPU kernel never meets the CPU.
    """
    if jax.default_backend() == "cpu":
        return native(*args)
    gpus = {} if gpu is None else {"cuda": gpu, "rocm": gpu}
    return jax.lax.platform_dependent(*args, cpu=native, default=xla, **gpus)


def qmatmul(x: jax.Array, qs: Sequence[Any]) -> list[jax.Array]:
    """``x [m, in] @ q.T`` for each 2-D QArray of ``qs`` (blocks of 16 or 32), float32 in and
    out, in one kernel call: the weights' rows are split over the threads together."""
    buffers = []
    for q in qs:
        buffers += [q.data, q.scale, q.min if q.min is not None else jnp.zeros((0,), jnp.float32),
                    q.high if q.high is not None else jnp.zeros((0,), jnp.uint8)]
    call = jax.ffi.ffi_call("mrs_qmatmul", [jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32) for q in qs])
    return call(x, *buffers, bits=np.array([q.bits for q in qs], np.int32),
                zero=np.array([q.zero for q in qs], np.int32))


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, pages: jax.Array, positions: jax.Array, *,
                     kv_len: int, window: int | None, scale: float, softcap: float | None) -> jax.Array:
    """Attention of ``q [b, Hkv, G, D]`` (one query per slot, at ``positions [b]``) over the
    paged cache: keys ``[P, Hkv, D, page]`` and values ``[P, Hkv, page, D]`` read in place
    through the block tables ``pages [b, n]`` (``mrs.models.kv_cache``), all float32;
    returns ``[b, Hkv, G, D]``."""
    call = jax.ffi.ffi_call("mrs_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_pool, v_pool, pages.astype(jnp.int32), positions.astype(jnp.int32), kv_len=np.int64(kv_len),
                window=np.int64(window or 0), scale=np.float32(scale), softcap=np.float32(softcap or 0.0))
