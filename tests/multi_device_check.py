"""Run in a subprocess with 4 host devices (XLA_FLAGS must be set before jax starts).

Serves tiny random models through the real Engine laid out by ``num_device_layers``
and ``tensor_parallel``, asserts that each layer's parameters and KV cache sit on
the devices asked for, and that greedy tokens and logprobs equal the single-device
run. Prints "OK <what>" per check; raises on any mismatch.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from hf_checkpoints import hf_model, save_checkpoint  # noqa: E402
from tiny_llama import BOS, tiny_llama  # noqa: E402

from mrs.config.schema import EngineConfig, ModelEntry, ModelSource  # noqa: E402
from mrs.engine.engine import Engine  # noqa: E402
from mrs.engine.executables import CompiledStep  # noqa: E402
from mrs.engine.types import GenerationRequest, SamplingParams, TokenDelta  # noqa: E402
from mrs.loading.checkpoint import Checkpoint  # noqa: E402
from mrs.loading.load import load_checkpoint  # noqa: E402
from mrs.quant import QArray  # noqa: E402
from mrs.sharding.device_map import device_map  # noqa: E402
from mrs.sharding.placement import Placement, resolve_placement  # noqa: E402

# Two slots, one prefill bucket, no warm-up: few compiles (they dominate the run time).
# The prompts run together: one prefills into slot 1, then both decode in one batch.
CONFIG = EngineConfig(max_batch=2, max_seq_len=32, prefill_buckets=[16], warmup=False)
PROMPTS = [[BOS, *range(40, 50)], [BOS, *range(100, 114)]]
STEPS = 8


def generate(checkpoint: Checkpoint) -> tuple[Engine, list[tuple[list[int], np.ndarray]]]:
    """Greedy tokens and per-step [logprob, top-5 logprobs] of both prompts, run together."""
    engine = Engine(checkpoint, CONFIG).start()
    sampling = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)
    streams = [engine.submit(GenerationRequest(ids, sampling)) for ids in PROMPTS]
    results = []
    for stream in streams:
        deltas = [e for e in stream if isinstance(e, TokenDelta)]
        tokens = [t for d in deltas for t in d.token_ids]
        logprobs = np.array([[lp.logprob, *(a[2] for a in lp.top)] for d in deltas for lp in d.logprobs])
        results.append((tokens, logprobs))
    engine.shutdown()
    return engine, results


def assert_same(got: list, want: list, what: str) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
        assert len(tokens) == STEPS and tokens == want_tokens, (what, tokens, want_tokens)
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=2e-5, err_msg=what)


def layer_trees(params: dict) -> dict[int, dict]:
    """Decoder layer index -> its parameter subtree."""
    return {int(name.split("_")[1]): sub for name, sub in params["model"].items() if name.startswith("layers_")}


def check_stages(engine: Engine, layers: tuple, tied: bool) -> None:
    """One parameter tree per stage, each layer's parameters and (k, v) on the layer's device,
    the embedding on the first stage, the final norm and head (or the tied embedding) on the last."""
    stages = engine._params
    seen = {}
    for tree in stages:
        devices = {d for leaf in jax.tree.leaves(tree) for d in leaf.devices()}
        assert len(devices) == 1, devices
        for i, sub in layer_trees(tree).items():
            assert devices == {layers[i]}, (i, devices, layers[i])
            seen[i] = sub
    assert sorted(seen) == list(range(len(layers))), sorted(seen)
    assert stages[0]["model"]["embed_tokens"]["weight"].devices() == {layers[0]}
    assert stages[-1]["model"]["norm"]["weight"].devices() == {layers[-1]}
    head = stages[-1]["model"]["embed_tokens"] if tied else stages[-1]["lm_head"]
    assert head["weight"].devices() == {layers[-1]}
    for i, (k, v) in enumerate(engine._state.cache):
        assert k.devices() == v.devices() == {layers[i]}, (i, k.devices(), layers[i])
    steps = engine._steps
    for step in ("prefill", "decode"):
        assert_compiled_once(getattr(steps._last, step), steps.traces, step)
        for stage in steps._leads:
            assert_compiled_once(getattr(stage, step), steps.traces, f"stage{stage.layers.start}/{step}")
    check_empty_slots(engine)


def check_empty_slots(engine: Engine) -> None:
    """The state the warm-up leaves (its pool kept, the slots emptied) is laid out as a new one:
    the same values, shardings and commitment, so the steps' executables fit it unchanged."""
    fresh = engine._steps.init_state()
    emptied = engine._steps.empty_slots(fresh.cache)
    assert emptied.cache is fresh.cache
    for got, want in zip(jax.tree.leaves(emptied._replace(cache=())), jax.tree.leaves(fresh._replace(cache=()))):
        assert got.sharding == want.sharding and got.committed == want.committed, (got.sharding, want.sharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def check_mesh(engine: Engine, n: int) -> None:
    """Column- and row-parallel weights split over the mesh, the cache over kv heads."""
    attention = engine._params["model"]["layers_1"]["self_attn"]
    q, o = attention["q_proj"]["weight"], attention["o_proj"]["weight"]
    q, o = (q.data, o.data) if isinstance(q, QArray) else (q, o)
    assert q.sharding.spec[0] == "tp" and len(q.sharding.device_set) == n, q.sharding
    assert {s.data.shape[0] for s in q.addressable_shards} == {q.shape[0] // n}
    assert o.sharding.spec[1] == "tp", o.sharding
    for k, v in engine._state.cache:  # page pools [P, Hkv, D, page], [P, Hkv, page, D]
        assert k.sharding.spec[1] == v.sharding.spec[1] == "tp", k.sharding
        assert {s.data.shape[1] for s in k.addressable_shards} == {k.shape[1] // n}
    for step in ("prefill", "decode"):
        assert_compiled_once(getattr(engine._steps, step), engine._steps.traces, step)
    check_empty_slots(engine)
    check_mesh_decode_local(engine)


def check_mesh_decode_local(engine: Engine) -> None:
    """The mesh's decode step works on each device's shards: it calls no native kernel (those
    have no partitioning rule) and gathers no quantized weight, only activations."""
    key = next(key for key in engine._steps.traces if key.startswith("decode/"))
    rows, kv_len = map(int, key.split("/")[1:])
    steps = jnp.ones((CONFIG.max_batch,), jnp.int32)
    lowered = engine._steps.decode.lower(engine._params, engine._state, steps, engine._all_allowed,
                                         engine._pages.tables, kv_len=kv_len, rows=rows)
    hlo = lowered.compile().as_text()
    assert "mrs_qmatmul" not in hlo and "mrs_decode_attention" not in hlo
    gathered = re.findall(r"= (\w+)\[[^\]]*\][^ ]* all-gather\(", hlo)
    assert not {"s8", "u8"} & set(gathered), gathered


def assert_compiled_once(jitted, traces: dict, prefix: str) -> None:
    """One compile per traced shape: the state keeps its devices and shardings from step to
    step (an equal but differently spelt sharding compiles again without tracing again)."""
    shapes = sum(1 for key in traces if key.startswith(prefix))
    if isinstance(jitted, CompiledStep):  # its executables compiled ahead, and those jit compiled on use
        compiled = len(jitted._executables) + jitted._jitted._cache_size()
    else:
        compiled = jitted._cache_size()
    assert compiled == shapes, (prefix, compiled, dict(traces))


def llama_checks() -> None:
    devices = jax.devices()
    checkpoint, _ = tiny_llama(layers=3)
    _, want = generate(checkpoint)

    spec = ["1:1;2:1"]  # layer 0 on device 1, layer 1 on device 2, the rest (2) on the host
    placement = resolve_placement(spec, None, num_layers=3, num_heads=4, num_kv_heads=2)
    layers = placement.layers.layers
    assert layers == (devices[1], devices[2], jax.devices("cpu")[0]), layers
    engine, got = generate(dataclasses.replace(checkpoint, placement=placement))
    assert_same(got, want, f"num_device_layers={spec}")
    check_stages(engine, layers, tied=False)
    print(f"OK num_device_layers={spec}", flush=True)

    # A second engine of this layout loads the last stage's steps from the executable cache:
    # each runs on one device of the four, and is loaded for that one alone.
    engine, got = generate(dataclasses.replace(checkpoint, placement=placement))
    assert_same(got, want, f"num_device_layers={spec} again")
    last_stage_traces = [key for key in engine._steps.traces if key.split("/")[0] in ("insert", "prefill", "decode")]
    assert not last_stage_traces, last_stage_traces
    print(f"OK num_device_layers={spec} from the executable cache", flush=True)

    # ["N"]: the first N layers on the first accelerator (device 3 here), the rest on the
    # host. On this CPU-only host the first accelerator is the host, so pass them in.
    dmap = device_map(["1"], 3, devices=devices[3:], host=devices[0])
    engine, got = generate(dataclasses.replace(checkpoint, placement=Placement(layers=dmap)))
    assert_same(got, want, "num_device_layers=['1']")
    check_stages(engine, (devices[3], devices[0], devices[0]), tied=False)
    print("OK num_device_layers=['1']", flush=True)


def gemma3_checks() -> None:
    """Through load_checkpoint (as mrs.load and the server do): Q8_0 weights, a tied head
    (its embedding table also on the last stage), tensor parallel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(hf_model("gemma3"), Path(tmp))

        def load(**fields) -> Checkpoint:
            source = ModelSource(model_id=str(path))
            return load_checkpoint(ModelEntry(model_id="g", model=source, in_situ_quant="Q8_0", **fields))

        _, want = generate(load())
        spec = ["1:2"]
        checkpoint = load(num_device_layers=spec)
        engine, got = generate(checkpoint)
        assert_same(got, want, f"gemma3 num_device_layers={spec}")
        host, device = jax.devices("cpu")[0], jax.devices()[1]
        check_stages(engine, (device, device, host, host), tied=True)
        print(f"OK num_device_layers={spec} gemma3 Q8_0", flush=True)

        engine, got = generate(load(tensor_parallel=2))
        assert_same(got, want, "gemma3 tensor_parallel=2")
        check_mesh(engine, 2)
        print("OK tensor_parallel=2 gemma3 Q8_0", flush=True)


if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    llama_checks()
    gemma3_checks()
