"""The engine's steps for a model laid out over several devices (``mrs.sharding.placement``).

- ``MeshSteps`` (tensor_parallel): the usual jitted steps; parameters and KV cache
  are sharded over the mesh and the rest of the decode state is replicated, so
  XLA's SPMD partitioner splits every layer's work over the devices. They trace
  with XLA's ops only (``mrs.quant.native.xla_only``): the native kernels have no
  partitioning rule.
- ``StagedSteps`` (num_device_layers): each stage's layers, parameters and KV cache
  on its own device. A lead stage (all but the last) runs its layers in its own jit
  (one compile per bucket shape) and hands its hidden states to the next device;
  the last stage is an ordinary ``Steps`` for its layers (final norm, head,
  sampling and the rest of the decode state, all on the last device). Stages run
  one after the other: this serves a model no single device holds, not faster.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable, TypeVar

import jax

from mrs.compile_cache import release_lowered_modules
from mrs.engine.sampling import SampleOut, SlotSampling
from mrs.engine.steps import DecodeState, Steps, chunk_positions, decode_inputs
from mrs.models.config import ModelConfig
from mrs.models.kv_cache import KVCache, KVGeometry, init_cache
from mrs.models.registry import build_model, get_arch
from mrs.quant import native
from mrs.sharding.device_map import DeviceMap, stage_params
from mrs.sharding.placement import Placement
from mrs.sharding.tensor_parallel import cache_shardings, shard_params

Array = jax.Array
T = TypeVar("T")


def build_steps(config: ModelConfig, max_batch: int, kv: KVGeometry, placement: Placement, decode_steps: int) -> Any:
    """``Steps`` or its multi-device counterpart; all share insert/prefill/decode/init_state/empty_slots/place_params
    and ``decode_steps`` (a staged model's is 1: each step passes through every stage)."""
    if placement.mesh is not None:
        return MeshSteps(config, max_batch, kv, placement.mesh, decode_steps)
    if placement.layers is not None:
        return StagedSteps(config, max_batch, kv, placement.layers)
    return _shared_steps(config, max_batch, kv, decode_steps)


@lru_cache(maxsize=8)
def _shared_steps(config: ModelConfig, max_batch: int, kv: KVGeometry, decode_steps: int) -> Steps:
    """One ``Steps`` per model and engine shape in this process: its jitted functions keep
    their compiled executables, so reloading an unloaded or evicted model (or a second
    engine of the same shape) neither traces nor compiles again. The parameters are
    arguments of the steps, never captured, so an unloaded model's weights are not kept."""
    return Steps(config, max_batch, kv, decode_steps=decode_steps)


class MeshSteps(Steps):
    def __init__(self, config: ModelConfig, max_batch: int, kv: KVGeometry, mesh: jax.sharding.Mesh,
                 decode_steps: int) -> None:
        super().__init__(config, max_batch, kv, decode_steps=decode_steps)
        self.mesh = mesh

    def place_params(self, params: Any) -> Any:
        return shard_params(params, self.mesh, get_arch(self.config.arch))

    def init_state(self) -> DecodeState:
        """Created in place on the mesh: no device ever holds the whole cache."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        shapes = jax.eval_shape(super().init_state)
        shardings = jax.tree.map(lambda _: replicated, shapes._replace(cache=()))
        shardings = shardings._replace(cache=cache_shardings(shapes.cache, self.mesh))
        return jax.jit(super().init_state, out_shardings=shardings)()

    def empty_slots(self, cache: KVCache) -> DecodeState:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        make = partial(Steps.empty_slots, self, ())
        shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(make))
        return jax.jit(make, out_shardings=shardings)()._replace(cache=cache)

    decode_reads_lengths = False  # XLA's attention only: its cost follows the static kv_len

    def _prefill(self, *args: Any, **kwargs: Any) -> tuple[DecodeState, SampleOut]:
        with native.xla_only():
            return super()._prefill(*args, **kwargs)

    def _decode(self, *args: Any, **kwargs: Any) -> tuple[DecodeState, SampleOut]:
        with native.xla_only():
            return super()._decode(*args, **kwargs)


def _on(device: Any, make: Callable[[], T]) -> T:
    """``make()``'s arrays created on ``device`` and committed to it (no copy)."""
    with jax.default_device(device):
        return jax.device_put(make(), device)


class _LeadStage:
    """The jitted layers of one stage before the last: ``(params, cache, x, ...) -> (hidden, cache)``."""

    def __init__(self, config: ModelConfig, device: Any, layers: range, traces: Any) -> None:
        self.device, self.layers, self._traces = device, layers, traces
        self._model = build_model(config, (layers.start, layers.stop))
        self.prefill = jax.jit(self._prefill, donate_argnums=(1,), static_argnames=("kv_len",))
        self.decode = jax.jit(self._decode, donate_argnums=(1,), static_argnames=("kv_len",))

    def _decode(self, params: Any, cache: KVCache, x: Array, positions: Array, pages: Array, *, kv_len: int):
        self._traces[f"stage{self.layers.start}/decode/{x.shape[0]}/{kv_len}"] += 1
        return self._model.apply({"params": params}, x, positions, cache, kv_len=kv_len, pages=pages[: x.shape[0]])

    def _prefill(self, params: Any, cache: KVCache, x: Array, start: Array, n_real: Array, pages: Array,
                 *, kv_len: int):
        self._traces[f"stage{self.layers.start}/prefill/{x.shape[1]}/{kv_len}"] += 1
        positions, _ = chunk_positions(x.shape[1], start, n_real)
        return self._model.apply({"params": params}, x, positions, cache, kv_len=kv_len, pages=pages)


class StagedSteps:
    """``Steps``' interface over the stages of a ``DeviceMap``; ``params`` is one tree per stage."""

    def __init__(self, config: ModelConfig, max_batch: int, kv: KVGeometry, dmap: DeviceMap) -> None:
        self.config = config
        self._stages = dmap.stages()
        *lead, (self._device, last) = self._stages
        self._last = Steps(config, max_batch, kv, stage=(last.start, last.stop))
        self.traces = self._last.traces
        self.decode_steps = self._last.decode_steps  # one
        self._leads = [_LeadStage(config, device, layers, self.traces) for device, layers in lead]
        self._inputs = jax.jit(decode_inputs, static_argnames=("rows",))
        # Every stage attends as the last one does (the same kernels, the same cache dtype).
        self.decode_reads_lengths = self._last.decode_reads_lengths

    def warm(self, step: str, params: list[dict], state: DecodeState, *args: Any, **kwargs: Any) -> DecodeState:
        """Compile ``step`` by running it: each stage's inputs are the previous stage's outputs
        on another device, so there is no one call to lower. Returns the state it leaves."""
        state, _ = getattr(self, step)(params, state, *args, **kwargs)
        release_lowered_modules()  # it ran: jit's dispatch cache keeps its executables
        return state

    def place_params(self, params: dict) -> list[dict]:
        embeddings = get_arch(self.config.arch).embeddings
        return [
            jax.device_put(stage_params(params, layers, self.config.num_layers, embeddings,
                                        self.config.tie_word_embeddings), device)
            for device, layers in self._stages
        ]

    def init_state(self) -> DecodeState:
        """Each stage's cache created on its device; the rest of the state on the last."""
        kv = self._last.kv
        lead: KVCache = ()
        for stage in self._leads:
            layers = (stage.layers.start, stage.layers.stop)
            lead += _on(stage.device, partial(init_cache, self.config, kv.pages, kv.page_size, kv.dtype, stage=layers))
        state = _on(self._device, self._last.init_state)
        return state._replace(cache=lead + state.cache)

    def empty_slots(self, cache: KVCache) -> DecodeState:
        return _on(self._device, partial(self._last.empty_slots, ()))._replace(cache=cache)

    def insert(self, state: DecodeState, slot: Array, row: SlotSampling) -> DecodeState:
        caches = self._split(state.cache)
        return self._joined(self._last.insert(state._replace(cache=caches[-1]), slot, row), caches)

    def prefill(self, params: list[dict], state: DecodeState, slot: Array, tokens: Array, start: Array,
                n_real: Array, final: Array, mask: Array, pages: Array, targets: Array | None = None, *,
                kv_len: int, score: bool = False) -> tuple[DecodeState, SampleOut]:
        caches = self._split(state.cache)
        inputs = self._run_leads(params, caches, tokens[None], lambda stage, p, cache, x: stage.prefill(
            p, cache, x, start, n_real, pages, kv_len=kv_len))
        state, out = self._last.prefill(params[-1], state._replace(cache=caches[-1]), slot, tokens, start, n_real,
                                        final, mask, pages, inputs, targets, kv_len=kv_len, score=score)
        return self._joined(state, caches), out

    def decode(self, params: list[dict], state: DecodeState, steps: Array, mask: Array, pages: Array, *,
               kv_len: int, rows: int) -> tuple[DecodeState, SampleOut]:
        caches = self._split(state.cache)
        tokens, positions = self._inputs(state.tokens, state.positions, steps > 0, rows=rows)
        inputs = self._run_leads(params, caches, tokens, lambda stage, p, cache, x: stage.decode(
            p, cache, x, jax.device_put(positions, stage.device), pages, kv_len=kv_len))
        state, out = self._last.decode(params[-1], state._replace(cache=caches[-1]), steps, mask, pages, inputs,
                                       kv_len=kv_len, rows=rows)
        return self._joined(state, caches), out

    def _run_leads(self, params: list[dict], caches: list[KVCache], x: Any, run: Callable) -> Array:
        """Run the lead stages in order (updating ``caches`` in place); the last stage's
        inputs on its device: hidden states, or ``x`` itself when there is one stage."""
        for k, stage in enumerate(self._leads):
            x, caches[k] = run(stage, params[k], caches[k], jax.device_put(x, stage.device))
        return jax.device_put(x, self._device)

    def _split(self, cache: KVCache) -> list[KVCache]:
        return [cache[layers.start:layers.stop] for _, layers in self._stages]

    @staticmethod
    def _joined(state: DecodeState, caches: list[KVCache]) -> DecodeState:
        return state._replace(cache=sum(caches[:-1], ()) + state.cache)
