"""Where an engine's warm-up goes: tracing, lowering, compiling or fetching from the cache.

    python tools/bench_warmup.py [--cold-cache]

Loads each demo model (default engine config), starts an engine and times its warm-up
(every step variant compiled before it serves: ``compile_in_background=False``; the
default serves after the largest, see ``tools/bench_startup.py``), with JAX's own duration events summed
per phase. By default the user's persistent compilation cache is used (a restart or a
reload); ``--cold-cache`` points it at an empty directory (a first start). Prints one table.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time

import jax
import jax.monitoring
from bench_swap import MODELS  # tools/ is on the path when this script runs

from mrs.config.schema import GGUF, EngineConfig, ModelEntry, ModelSource
from mrs.engine.engine import Engine
from mrs.fetch import DEMO_MODELS, fetch, models_dir
from mrs.loading.load import load_checkpoint

PHASES = {  # jax.monitoring event -> column
    "/jax/core/compile/jaxpr_trace_duration": "trace s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache fetch s",
    "/jax/core/compile/backend_compile_duration": "compile s (incl. fetch)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-cache", action="store_true", help="an empty JAX compilation cache")
    args = parser.parse_args()
    if args.cold_cache:  # JAX read its environment at import: set the option itself
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mrs-jax-cache-"))
    totals: collections.Counter[str] = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(lambda event, seconds, **_: totals.update({event: seconds}))
    for model in DEMO_MODELS:
        fetch(model, models_dir())
    rows = []
    for model_id, filename in MODELS.items():
        entry = ModelEntry(model_id=model_id, model=ModelSource(kind=GGUF, quantized_model_id=str(models_dir()),
                                                                quantized_filename=filename))
        checkpoint = load_checkpoint(entry)
        totals.clear()
        begin = time.perf_counter()
        engine = Engine(checkpoint, EngineConfig(compile_in_background=False)).start()
        stats = engine.stats()
        rows.append((model_id, time.perf_counter() - begin, stats["compiles"], {PHASES[k]: totals[k] for k in PHASES}))
        engine.shutdown()
        print(f"{model_id}: ready in {rows[-1][1]:.1f} s", file=sys.stderr, flush=True)
    print(f"\n| model | warm-up s | step variants | {' | '.join(PHASES.values())} |")
    print("|---|---:|---:|" + "---:|" * len(PHASES))
    for model_id, seconds, variants, phases in rows:
        print(f"| {model_id} | {seconds:.1f} | {variants} | {' | '.join(f'{phases[c]:.1f}' for c in PHASES.values())} |")
    print(f"\ncompilation cache: {'empty at start' if args.cold_cache else 'as it was'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
